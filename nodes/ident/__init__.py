"""The IDENT node: immigration records on the shared gallery server."""

from nodes.ident.records import ImmigrationHistoryStore
from nodes.ident.service import build_node, build_router

__all__ = ["ImmigrationHistoryStore", "build_node", "build_router"]
