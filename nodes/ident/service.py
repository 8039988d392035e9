"""The IDENT gallery service: the shared gallery server with the immigration-history record model, as one
process holding the whole gallery, as a shard holding one partition, or as the router in front of
the shards."""

from __future__ import annotations

from typing import TYPE_CHECKING

from nodes.gallery.config import NodeConfig
from nodes.ident.records import ImmigrationHistoryStore

if TYPE_CHECKING:
    from nodes.gallery.router import GalleryRouterService
    from nodes.gallery.server import GalleryNode


def build_node(config: NodeConfig, database_url: str | None = None) -> GalleryNode:
    """The IDENT node (whole, or a shard), configured and not yet started."""
    from nodes.gallery.server import build_gallery_node  # torch: only processes holding a gallery

    return build_gallery_node(config, ImmigrationHistoryStore(), database_url)


def build_router(config: NodeConfig, database_url: str | None = None) -> GalleryRouterService:
    """The IDENT router in front of the shards its config names, not yet started (keeping its record
    of what it returned to whom on the node's database, else its SQLite file)."""
    from nodes.gallery.router import build_gallery_router

    return build_gallery_router(config, ImmigrationHistoryStore(), database_url)
