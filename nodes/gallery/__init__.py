"""What both gallery nodes share: the server, its store, the in-memory gallery, the micro-batcher,
and the router of a sharded node.

The names are loaded on first use: a router (:mod:`nodes.gallery.router`) holds no gallery and
must not pay for importing torch, which the server and the gallery need.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nodes.gallery.batcher import MicroBatcher
    from nodes.gallery.config import BatchingConfig, NodeConfig, ShortlistConfig
    from nodes.gallery.gallery import TEMPLATE_FORMAT_VERSION, Gallery, Match
    from nodes.gallery.records import RecordStore
    from nodes.gallery.router import GalleryRouterService, build_gallery_router
    from nodes.gallery.server import GalleryNode, GalleryServicer, build_gallery_node
    from nodes.gallery.store import Enrollment, GalleryStore

_HOMES = {
    "MicroBatcher": "batcher",
    "BatchingConfig": "config",
    "NodeConfig": "config",
    "ShortlistConfig": "config",
    "TEMPLATE_FORMAT_VERSION": "gallery",
    "Gallery": "gallery",
    "Match": "gallery",
    "RecordStore": "records",
    "GalleryRouterService": "router",
    "build_gallery_router": "router",
    "GalleryNode": "server",
    "GalleryServicer": "server",
    "build_gallery_node": "server",
    "Enrollment": "store",
    "GalleryStore": "store",
}

__all__ = [
    "TEMPLATE_FORMAT_VERSION",
    "BatchingConfig",
    "Enrollment",
    "Gallery",
    "GalleryNode",
    "GalleryRouterService",
    "GalleryServicer",
    "GalleryStore",
    "Match",
    "MicroBatcher",
    "NodeConfig",
    "RecordStore",
    "ShortlistConfig",
    "build_gallery_node",
    "build_gallery_router",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"nodes.gallery.{home}"), name)
