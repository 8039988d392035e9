"""A federation whose gallery nodes run sharded, in this process on 127.0.0.1: per node a router
(the address the coordinator calls) in front of N shard servers that share the node's database
(as does the router, for its record of what it returned to whom), each a real gRPC server with
the node's certificate."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from federation.config import CoordinatorConfig
from federation.coordinator import CoordinatorService, build_coordinator
from fedprint.booking.v1 import booking_pb2 as bk
from fedprint.booking.v1 import booking_pb2_grpc as bk_grpc
from fedprint.clients import enroll
from fedprint.pki import TlsFiles, agency_name
from fedprint.rpc import open_channel
from ice_service import build_ice
from ice_service.config import IceConfig
from ice_service.server import IceService
from launcher.services import build_node, build_router
from nodes.gallery import GalleryNode, GalleryRouterService
from nodes.gallery.config import NodeConfig
from synthetic.population import Population
from tests.conftest import SERVICE_IDENTITIES, kept_decision


@dataclass
class ShardedNode:
    """A node's router and its shards (shard ``i`` holds partition ``i``)."""

    name: str
    router: GalleryRouterService
    shards: list[GalleryNode]
    configs: list[NodeConfig]

    @property
    def address(self) -> str:
        return self.router.host.address

    async def restart_shard(self, index: int) -> GalleryNode:
        """Starts shard ``index`` again on its port, from the node's database."""
        shard = build_node(self.configs[index])
        await shard.start()
        self.shards[index] = shard
        return shard


@dataclass
class ShardedFederation:
    """ICE, both nodes sharded, and the coordinator."""

    ice: IceService
    iafis: ShardedNode
    ident: ShardedNode
    coordinator: CoordinatorService
    pki: dict[str, TlsFiles]
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    @property
    def address(self) -> str:
        return self.coordinator.host.address

    def channel(self, address: str, identity: str) -> grpc.aio.Channel:
        channel = open_channel(address, self.pki[identity], retries=identity not in SERVICE_IDENTITIES)
        self.channels.append(channel)
        return channel

    def kept(self, booking: bk.Booking) -> bk.BookingDecision:
        return kept_decision(self.coordinator, booking)

    def booking_stub(self, ori: str) -> bk_grpc.BookingServiceAsyncStub:
        return bk_grpc.BookingServiceStub(self.channel(self.address, agency_name(ori)))


def shard_config(name: str, root: Path, pki: dict[str, TlsFiles], count: int, index: int) -> NodeConfig:
    """Shard ``index`` of ``count`` of node ``name``: the node's data directory and database."""
    return NodeConfig(
        node=name,
        role="shard",
        shard={"count": count, "index": index},
        data_dir=root / name,
        tls=pki[name],
        sync_interval_s=0.2,
    )


@contextlib.asynccontextmanager
async def sharded_federation(
    root: Path,
    population: Population,
    pki: dict[str, TlsFiles],
    shards: int,
    *,
    node_deadline_s: float = 10.0,
) -> AsyncIterator[ShardedFederation]:
    """The federation with each node split into ``shards`` partitions, galleries enrolled through
    the routers; stops everything on exit (whatever a test restarted included)."""
    started: list[IceService | GalleryNode | GalleryRouterService | CoordinatorService] = []
    fed: ShardedFederation | None = None
    try:
        ice = build_ice(IceConfig(data_dir=root / "ice", tls=pki["ice"]))
        started.append(ice)
        await ice.start()
        nodes = {}
        for name in ("iafis", "ident"):
            configs = [shard_config(name, root, pki, shards, i) for i in range(shards)]
            parts = []
            for config in configs:
                part = build_node(config)
                started.append(part)
                await part.start()
                parts.append(part)
            # The shards' configs name their bound ports from now on, so a restart reuses them.
            configs = [
                c.model_copy(update={"listen": p.host.address}) for c, p in zip(configs, parts, strict=True)
            ]
            router = build_router(
                NodeConfig(
                    node=name,
                    role="router",
                    shards=[p.host.address for p in parts],
                    data_dir=root / name,  # the node's database: the router keeps what it returned there
                    tls=pki[name],
                )
            )
            started.append(router)
            await router.start()
            nodes[name] = ShardedNode(name, router, parts, configs)
        config = CoordinatorConfig(
            data_dir=root / "coordinator",
            iafis_address=nodes["iafis"].address,
            ident_address=nodes["ident"].address,
            ice_address=ice.host.address,
            node_deadline_s=node_deadline_s,
            outbox_retry_initial_s=0.05,
            outbox_retry_max_s=0.5,
            retry_initial_s=0.2,
            retry_max_s=1.0,
            tls=pki["coordinator"],
        )
        coordinator = build_coordinator(config)
        started.append(coordinator)
        await coordinator.start()
        await enroll(nodes["iafis"].address, population.iafis, tls=pki["admin"])
        await enroll(nodes["ident"].address, population.ident, tls=pki["admin"])
        fed = ShardedFederation(ice, nodes["iafis"], nodes["ident"], coordinator, pki)
        yield fed
    finally:
        restarted = [s for n in (fed.iafis, fed.ident) for s in n.shards] if fed is not None else []
        for service in [*reversed(started), *restarted]:
            await service.stop(0)
        for channel in fed.channels if fed is not None else []:
            await channel.close(None)
