"""The wiring of services into processes: each of the four services built from its
configuration file, and run until it is told to stop."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from federation.config import CoordinatorConfig
from fedprint import tracing
from fedprint.logging import configure
from fedprint.private import require_private_key
from fedprint.rpc import ServiceHost
from fedprint.settings import ServiceSettings
from ice_service.config import IceConfig

if TYPE_CHECKING:
    from nodes.gallery import GalleryNode, GalleryRouterService, NodeConfig

log = structlog.get_logger(__name__)


class Service(Protocol):
    """What every fedprint service offers its supervisor."""

    host: ServiceHost

    async def start(self) -> int: ...

    async def stop(self, grace_s: float = 5.0) -> None: ...


#: The gallery nodes this federation runs, each a package that hands its record model to the
#: shared gallery server.
GALLERY_NODES = ("iafis", "ident")


def _node_package(name: str) -> Any:
    # Imported here: the coordinator's and ICE's processes never load a node's code.
    if name == "iafis":
        from nodes import iafis

        return iafis
    if name == "ident":
        from nodes import ident

        return ident
    raise ValueError(f"unknown gallery node {name!r}; known: {', '.join(GALLERY_NODES)}")


def build_node(config: NodeConfig) -> GalleryNode:
    """The gallery node ``config.node`` names, whole or one shard of it (``role``), configured and
    not yet started (on the database its settings name, else its SQLite file)."""
    node: GalleryNode = _node_package(config.node).build_node(config, config.resolved_database_url())
    return node


def build_router(config: NodeConfig) -> GalleryRouterService:
    """The router of the sharded gallery node ``config.node`` names, not yet started."""
    router: GalleryRouterService = _node_package(config.node).build_router(
        config, config.resolved_database_url()
    )
    return router


def require_private_tls_key(settings: ServiceSettings) -> None:
    """Refuses a TLS private key that others may read (:func:`fedprint.private.require_private_key`)."""
    if settings.tls is not None:
        require_private_key(settings.tls.key, "TLS private key")


def build_service(role: str, config_path: Path | None, **overrides: Any) -> Service:
    """The service for ``role`` (coordinator, iafis, ident, ice), configured and not yet started.
    It does not start on a key file others may read (its TLS key; the coordinator's booking and
    audit keys as well)."""
    if role in GALLERY_NODES:
        from nodes.gallery.config import NodeConfig

        node_config = NodeConfig.load(config_path, node=role, **overrides)
        configure(node_config.log_level)
        require_private_tls_key(node_config)
        tracing.configure(role, node_config.tracing)
        if node_config.role == "router":
            return build_router(node_config)
        return build_node(node_config)
    if role == "coordinator":
        from federation.coordinator import build_coordinator

        coordinator_config = CoordinatorConfig.load(config_path, **overrides)
        configure(coordinator_config.log_level)
        require_private_tls_key(coordinator_config)
        tracing.configure(role, coordinator_config.tracing)
        return build_coordinator(coordinator_config, coordinator_config.resolved_database_url())
    if role == "ice":
        from ice_service import build_ice

        ice_config = IceConfig.load(config_path, **overrides)
        configure(ice_config.log_level)
        require_private_tls_key(ice_config)
        tracing.configure(role, ice_config.tracing)
        return build_ice(ice_config, ice_config.resolved_database_url())
    raise ValueError(f"unknown service {role!r}")


async def run_service(
    role: str,
    config_path: Path | None,
    *,
    listen: str | None = None,
    ready_file: Path | None = None,
    insecure: bool = False,
) -> None:
    """Runs one service until SIGTERM or SIGINT, then shuts it down gracefully.

    ``ready_file`` receives the bound address once the service is serving (supervisors and
    the demo wait for it; with ``listen: host:0`` it is the only way to learn the port).
    ``insecure`` serves plaintext (as ``insecure: true`` in the config does); without it, and
    without a ``tls`` section, the service refuses to start.
    """
    overrides: dict[str, Any] = {}
    if listen:
        overrides["listen"] = listen
    if insecure:
        overrides["insecure"] = True
    service = build_service(role, config_path, **overrides)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    port = await service.start()
    if ready_file is not None:
        await asyncio.to_thread(ready_file.write_text, service.host.address + "\n")
    log.info("serving", role=role, address=service.host.address, port=port)
    await stop.wait()
    log.info("shutting down", role=role, address=service.host.address)
    await service.stop()
    tracing.reset()  # flushes the spans still buffered
