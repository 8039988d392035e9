"""The IDENT node: immigration records on the shared gallery server."""

from nodes.ident.records import ImmigrationHistoryStore

__all__ = ["ImmigrationHistoryStore"]
