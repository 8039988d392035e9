"""Shared fixtures: a small synthetic population, a development PKI with an identity for every
role, and the four real services on loopback, each with its own certificate."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio

from federation.config import CoordinatorConfig
from federation.coordinator import CoordinatorService, build_coordinator
from federation.trust import NodeTrust
from fedprint.booking.v1 import booking_pb2 as bk
from fedprint.booking.v1 import booking_pb2_grpc as bk_grpc
from fedprint.clients import enroll, list_notifications, wait_for_notifications
from fedprint.ice.v1 import ice_pb2 as ice
from fedprint.pki import TlsFiles, agency_name, issue_dev_pki
from fedprint.rpc import open_channel
from fedprint.validation import booking_key
from ice_service import build_ice
from ice_service.config import IceConfig
from ice_service.server import IceService
from launcher.services import build_node
from nodes.gallery import GalleryNode
from nodes.gallery.config import NodeConfig
from synthetic.population import Population, generate_population
from tests.postgres import BINDIR_VARIABLE, server_binaries, throwaway_postgres

#: Identities the services call each other with; their channels make no gRPC retries of their own
#: (:func:`fedprint.rpc.open_channel`).
SERVICE_IDENTITIES = frozenset({"coordinator", "iafis", "ident"})


@pytest.fixture(scope="session")
def population() -> Population:
    """A small deterministic population; every category of booking appears in it."""
    return generate_population(seed=11, persons=80, bookings=24)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory, population: Population) -> dict[str, TlsFiles]:
    """A CA and an identity for every role: coordinator, iafis, ident, ice, admin, examiner, and
    ``agency-<ORI>`` for each agency that books in the population."""
    oris = sorted({b.booking.ori for b in population.bookings})
    return issue_dev_pki(tmp_path_factory.mktemp("pki"), oris=oris)


def key(booking: bk.Booking) -> str:
    """The booking's key in the coordinator's store: its ORI and TCN."""
    return booking_key(booking.ori, booking.tcn)


def kept_decision(coordinator: CoordinatorService, booking: bk.Booking) -> bk.BookingDecision:
    """``booking``'s decision as the coordinator keeps it: what its examiners, ICE and audit act
    on (an agency sees only its view of it, federation.disclosure.agency_view)."""
    decision = coordinator.coordinator.store.decision(key(booking))
    assert decision is not None, f"no decision kept for {booking.tcn}"
    return decision


@dataclass
class Federation:
    """The four services running in this process on 127.0.0.1, each a real gRPC server."""

    root: Path
    ice: IceService
    iafis: GalleryNode
    ident: GalleryNode
    coordinator: CoordinatorService
    coordinator_config: CoordinatorConfig
    #: mTLS identities of every role (see the ``pki`` fixture).
    pki: dict[str, TlsFiles]
    #: Channels handed out, kept referenced: grpc.aio closes a channel its owner drops when the
    #: garbage collector gets to it, which a stub alone does not prevent.
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    @property
    def address(self) -> str:
        return self.coordinator.host.address

    def channel(self, address: str, identity: str) -> grpc.aio.Channel:
        """A channel to ``address`` with the client certificate ``identity`` (``admin``, ``ice``,
        ``agency-<ORI>``, ...); kept referenced, since grpc.aio closes a channel it collects. With a
        service's identity it is that service's kind of channel: no gRPC retries."""
        channel = open_channel(address, self.pki[identity], retries=identity not in SERVICE_IDENTITIES)
        self.channels.append(channel)
        return channel

    def kept(self, booking: bk.Booking) -> bk.BookingDecision:
        return kept_decision(self.coordinator, booking)

    def booking_stub(self, ori: str) -> bk_grpc.BookingServiceAsyncStub:
        """The coordinator's booking service, called as the agency ``ori``."""
        return bk_grpc.BookingServiceStub(self.channel(self.address, agency_name(ori)))

    async def notifications(self) -> list[ice.ReceivedNotification]:
        return await list_notifications(self.ice.host.address, tls=self.pki["ice"])

    async def wait_for_notifications(self, expected: int) -> list[ice.ReceivedNotification]:
        return await wait_for_notifications(
            self.ice.host.address, expected, timeout_s=10, tls=self.pki["ice"]
        )

    async def restart_node(
        self, name: str, *, pin: bool = True, data_dir: Path | None = None, **settings: Any
    ) -> GalleryNode:
        """Starts a fresh node process-equivalent on the same port and data directory (or
        ``data_dir``), with ``settings`` (NodeConfig fields) changed. ``pin``: the coordinator is
        told to believe the node's calibration, as an operator deploying it would."""
        old: GalleryNode = getattr(self, name)
        config = NodeConfig(
            node=name,
            listen=old.host.address,
            data_dir=data_dir or self.root / name,
            tls=self.pki[name],
            **settings,
        )
        node = build_node(config)
        await node.host.start()
        setattr(self, name, node)
        if not pin:
            return node
        # The operator who deploys a node with another calibration pins it on the coordinator.
        client = getattr(self.coordinator.coordinator, name)
        pinned = NodeTrust(calibration=node.servicer.calibration_digest)
        setattr(self.coordinator.coordinator, name, dataclasses.replace(client, trust=pinned))
        return node

    async def restart_ice(self) -> IceService:
        ice = build_ice(
            IceConfig(listen=self.ice.host.address, data_dir=self.root / "ice", tls=self.pki["ice"])
        )
        await ice.host.start()
        self.ice = ice
        return ice


@pytest_asyncio.fixture
async def federation(
    tmp_path: Path, population: Population, pki: dict[str, TlsFiles]
) -> AsyncIterator[Federation]:
    fed: Federation | None = None
    started: list[IceService | GalleryNode | CoordinatorService] = []
    # Every service serves /metrics and plaintext health on ports of its own, as in the Helm chart.
    ops = {"metrics_listen": "127.0.0.1:0", "health_listen": "127.0.0.1:0"}
    try:
        ice = build_ice(IceConfig(data_dir=tmp_path / "ice", tls=pki["ice"], **ops))
        started.append(ice)
        await ice.host.start()
        nodes = []
        for name in ("iafis", "ident"):
            node = build_node(NodeConfig(node=name, data_dir=tmp_path / name, tls=pki[name], **ops))
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
            retry_initial_s=0.2,
            retry_max_s=1.0,
            authorized_oris=sorted({b.booking.ori for b in population.bookings}),
            tls=pki["coordinator"],
            **ops,
        )
        coordinator = build_coordinator(config)
        started.append(coordinator)
        await coordinator.start()
        await enroll(nodes[0].host.address, population.iafis, tls=pki["admin"])
        await enroll(nodes[1].host.address, population.ident, tls=pki["admin"])
        fed = Federation(tmp_path, ice, nodes[0], nodes[1], coordinator, config, pki)
        yield fed
    finally:
        # Whatever a test restarted replaces what the fixture started.
        current = [fed.coordinator, fed.iafis, fed.ident, fed.ice] if fed is not None else []
        for service in [*current, *reversed(started)]:
            await service.stop(0)
        for channel in fed.channels if fed is not None else []:
            await channel.close(None)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """URL of a throwaway PostgreSQL server. Where no server binaries are installed the tests that
    need it are skipped on a user's machine (the reason shows in the summary), and fail in CI
    (``CI`` set): CI installs them, so their absence there is a broken setup, not a pass."""
    bindir = server_binaries()
    if bindir is None:
        reason = (
            "PostgreSQL server binaries (initdb, pg_ctl) are not installed under /usr/lib/postgresql "
            f"nor named by {BINDIR_VARIABLE}"
        )
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{reason}; CI must run the PostgreSQL tests (.ci/run installs the Debian package)")
        pytest.skip(f"{reason} (.ci/run installs them)")
    with throwaway_postgres(bindir) as url:
        yield url


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    """A fresh, empty database on the throwaway server for one test."""
    import uuid

    from sqlalchemy import create_engine, text

    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(postgres_server, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield postgres_server.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database for one store test, once on SQLite and once on PostgreSQL (a
    throwaway server; that run is skipped where no server binaries are installed)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.sqlite'}"
    url: str = request.getfixturevalue("postgres_url")
    return url
