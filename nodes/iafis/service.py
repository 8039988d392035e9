"""The IAFIS gallery service: the shared gallery server with the criminal-history record model."""

from __future__ import annotations

from nodes.gallery import GalleryNode, NodeConfig, build_gallery_node
from nodes.iafis.records import CriminalHistoryStore


def build_node(config: NodeConfig, database_url: str | None = None) -> GalleryNode:
    """The IAFIS node, configured and not yet started."""
    return build_gallery_node(config, CriminalHistoryStore(), database_url)
