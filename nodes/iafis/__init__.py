"""The IAFIS node: criminal-history records on the shared gallery server."""

from nodes.iafis.records import CriminalHistoryStore
from nodes.iafis.service import build_node, build_router

__all__ = ["CriminalHistoryStore", "build_node", "build_router"]
