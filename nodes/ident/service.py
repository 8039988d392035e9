"""The IDENT gallery service: the shared gallery server with the immigration-history record model."""

from __future__ import annotations

from nodes.gallery import GalleryNode, NodeConfig, build_gallery_node
from nodes.ident.records import ImmigrationHistoryStore


def build_node(config: NodeConfig, database_url: str | None = None) -> GalleryNode:
    """The IDENT node, configured and not yet started."""
    return build_gallery_node(config, ImmigrationHistoryStore(), database_url)
