"""Starting each of the four services from its configuration file."""

from __future__ import annotations

import asyncio
from pathlib import Path

from fedprint.config import CoordinatorConfig, IceConfig, NodeConfig
from fedprint.logging import configure
from fedprint.rpc import serve_until_signalled


async def run_service(
    role: str, config_path: Path | None, *, listen: str | None = None, ready_file: Path | None = None
) -> None:
    """Builds the service for ``role`` and serves until SIGTERM/SIGINT."""
    overrides = {"listen": listen} if listen else {}

    async def announce(address: str) -> None:
        if ready_file is not None:
            await asyncio.to_thread(ready_file.write_text, address + "\n")

    if role in ("iafis", "ident"):
        from nodes.gallery import build_node

        node_config = NodeConfig.load(config_path, node=role, **overrides)
        configure(node_config.log_level)
        node = build_node(node_config)

        async def node_started() -> None:
            await announce(node.host.address)

        async def node_stopping() -> None:
            await node.servicer.batcher.close()

        await serve_until_signalled(node.host, on_started=node_started, on_stopping=node_stopping)
        node.servicer.store.close()
    elif role == "coordinator":
        from federation.coordinator import build_coordinator

        coordinator_config = CoordinatorConfig.load(config_path, **overrides)
        configure(coordinator_config.log_level)
        service = build_coordinator(coordinator_config)

        async def coordinator_started() -> None:
            service.coordinator.outbox.start()
            await announce(service.host.address)

        async def coordinator_stopping() -> None:
            await service.coordinator.outbox.stop()

        await serve_until_signalled(
            service.host, on_started=coordinator_started, on_stopping=coordinator_stopping
        )
        for channel in service.channels:
            await channel.close(None)
        service.coordinator.store.close()
    elif role == "ice":
        from ice_service import build_ice

        ice_config = IceConfig.load(config_path, **overrides)
        configure(ice_config.log_level)
        ice = build_ice(ice_config)

        async def ice_started() -> None:
            await announce(ice.host.address)

        await serve_until_signalled(ice.host, on_started=ice_started)
        ice.server.store.close()
    else:
        raise ValueError(f"unknown service {role!r}")
