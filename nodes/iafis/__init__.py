"""The IAFIS node: criminal-history records on the shared gallery server."""

from nodes.iafis.records import CriminalHistoryStore

__all__ = ["CriminalHistoryStore"]
