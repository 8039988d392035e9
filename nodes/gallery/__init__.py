"""What both gallery nodes share: the server, its store, the in-memory gallery, the micro-batcher."""

from nodes.gallery.batcher import MicroBatcher
from nodes.gallery.config import BatchingConfig, NodeConfig, ShortlistConfig
from nodes.gallery.gallery import TEMPLATE_FORMAT_VERSION, Gallery, Match
from nodes.gallery.records import RecordStore
from nodes.gallery.server import GalleryNode, GalleryServicer, build_gallery_node
from nodes.gallery.store import Enrollment, GalleryStore

__all__ = [
    "TEMPLATE_FORMAT_VERSION",
    "BatchingConfig",
    "Enrollment",
    "Gallery",
    "GalleryNode",
    "GalleryServicer",
    "GalleryStore",
    "Match",
    "MicroBatcher",
    "NodeConfig",
    "RecordStore",
    "ShortlistConfig",
    "build_gallery_node",
]
