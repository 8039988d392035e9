"""Shared fixtures: a small synthetic population and the four real services on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from federation.coordinator import CoordinatorService, build_coordinator
from fedprint.booking.v1 import booking_pb2_grpc as bk_grpc
from fedprint.clients import enroll
from fedprint.config import CoordinatorConfig, IceConfig, NodeConfig
from fedprint.rpc import insecure_channel
from ice_service import build_ice
from ice_service.server import IceService
from nodes.gallery import GalleryNode, build_node
from synthetic.population import Population, generate_population


@pytest.fixture(scope="session")
def population() -> Population:
    """A small deterministic population; every category of booking appears in it."""
    return generate_population(seed=11, persons=80, bookings=24)


@dataclass
class Federation:
    """The four services running in this process on 127.0.0.1, each a real gRPC server."""

    root: Path
    ice: IceService
    iafis: GalleryNode
    ident: GalleryNode
    coordinator: CoordinatorService
    coordinator_config: CoordinatorConfig

    @property
    def address(self) -> str:
        return self.coordinator.host.address

    def booking_stub(self) -> bk_grpc.BookingServiceAsyncStub:
        return bk_grpc.BookingServiceStub(insecure_channel(self.address))

    async def restart_node(self, name: str) -> GalleryNode:
        """Starts a fresh node process-equivalent on the same port and data directory."""
        old: GalleryNode = getattr(self, name)
        config = NodeConfig(node=name, listen=old.host.address, data_dir=self.root / name)  # type: ignore[arg-type]
        node = build_node(config)
        await node.host.start()
        setattr(self, name, node)
        return node

    async def restart_ice(self) -> IceService:
        ice = build_ice(IceConfig(listen=self.ice.host.address, data_dir=self.root / "ice"))
        await ice.host.start()
        self.ice = ice
        return ice


@pytest_asyncio.fixture
async def federation(tmp_path: Path, population: Population) -> AsyncIterator[Federation]:
    fed: Federation | None = None
    started: list[IceService | GalleryNode | CoordinatorService] = []
    try:
        ice = build_ice(IceConfig(data_dir=tmp_path / "ice"))
        started.append(ice)
        await ice.host.start()
        nodes = []
        for name in ("iafis", "ident"):
            node = build_node(NodeConfig(node=name, data_dir=tmp_path / name))  # type: ignore[arg-type]
            started.append(node)
            await node.host.start()
            nodes.append(node)
        config = CoordinatorConfig(
            data_dir=tmp_path / "coordinator",
            iafis_address=nodes[0].host.address,
            ident_address=nodes[1].host.address,
            ice_address=ice.host.address,
            node_deadline_s=10.0,
            outbox_retry_initial_s=0.05,
            outbox_retry_max_s=0.5,
            authorized_oris=sorted({b.booking.ori for b in population.bookings}),
        )
        coordinator = build_coordinator(config)
        started.append(coordinator)
        await coordinator.start()
        await enroll(nodes[0].host.address, population.iafis)
        await enroll(nodes[1].host.address, population.ident)
        fed = Federation(tmp_path, ice, nodes[0], nodes[1], coordinator, config)
        yield fed
    finally:
        # Whatever a test restarted replaces what the fixture started.
        current = [fed.coordinator, fed.iafis, fed.ident, fed.ice] if fed is not None else []
        for service in [*current, *reversed(started)]:
            await service.stop(0)
