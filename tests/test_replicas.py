"""Replicas sharing one database, on SQLite and on PostgreSQL: coordinator replicas never deliver or
retry the same row at once (they claim rows, and a dead replica's claims run out), and replicas of
a gallery node see each other's enrolments and removals."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pydantic import SecretStr

from federation.outbox import OutboxDeliverer
from federation.store import CoordinatorStore
from fedprint.booking.v1 import booking_pb2 as bk
from fedprint.clients import enroll, list_notifications
from fedprint.gallery.v1 import gallery_pb2 as gal
from fedprint.gallery.v1 import gallery_pb2_grpc as gal_grpc
from fedprint.ice.v1 import ice_pb2 as ice
from fedprint.ice.v1 import ice_pb2_grpc as ice_grpc
from fedprint.pki import TlsFiles
from fedprint.records.v1 import records_pb2 as rec
from fedprint.rpc import open_channel
from fedprint.validation import booking_key, booking_of
from ice_service import build_ice
from ice_service.config import IceConfig
from launcher.services import build_node
from nodes.gallery import GalleryNode
from nodes.gallery.config import NodeConfig
from synthetic.population import Population
from tests.waiting import eventually, eventually_blocking


def queued(store: CoordinatorStore, tcns: list[str]) -> None:
    for tcn in tcns:
        store.record_decision(
            bk.BookingDecision(
                tcn=tcn, ori="XX0010000", status=bk.COMPLETE, notification=bk.QUEUED, attempt=1
            ),
            ice.Notification(tcn=tcn, ori="XX0010000", level=rec.LEVEL_1, ident_match={"subject_id": "S-1"}),
        )


def incomplete(store: CoordinatorStore, tcns: list[str]) -> None:
    now = dt.datetime.now(dt.UTC)
    for tcn in tcns:
        store.record_decision(
            bk.BookingDecision(tcn=tcn, ori="XX0010000", status=bk.INCOMPLETE, attempt=1),
            None,
            sealed=(b"sealed booking", b"sealed evidence"),
            retry_at=now,
        )


@pytest.fixture
def replicas(database_url: str) -> list[CoordinatorStore]:
    """Two coordinator replicas' stores on one database."""
    stores = [CoordinatorStore(database_url), CoordinatorStore(database_url)]
    yield stores  # type: ignore[misc]
    for store in stores:
        store.close()


def test_two_replicas_never_claim_the_same_row(replicas: list[CoordinatorStore]) -> None:
    tcns = [f"TCN-Q-{i:03d}" for i in range(40)]
    queued(replicas[0], tcns)
    incomplete(replicas[1], [f"TCN-P-{i:03d}" for i in range(20)])

    start = threading.Barrier(2)

    def drain(store: CoordinatorStore) -> tuple[list[str], list[str]]:
        notifications, bookings = [], []
        start.wait()  # both replicas at once
        while batch := store.claim_due_notifications(lease_s=60, limit=3):
            notifications += [booking_of(n.tcn)[1] for n in batch]
            time.sleep(0.001)  # let the other replica in between claims
        while due := store.claim_due_bookings(lease_s=60, limit=2):
            bookings += [b.tcn for b in due]
            time.sleep(0.001)
        return notifications, bookings

    with ThreadPoolExecutor(2) as pool:
        (n0, b0), (n1, b1) = pool.map(drain, replicas)
    assert not set(n0) & set(n1) and sorted(n0 + n1) == tcns
    assert not set(b0) & set(b1) and len(b0 + b1) == 20


def test_a_dead_replicas_claims_run_out(replicas: list[CoordinatorStore]) -> None:
    first, second = replicas
    queued(first, ["TCN-D-1"])
    incomplete(first, ["TCN-D-2"])
    assert [n.tcn for n in first.claim_due_notifications(lease_s=0.5)] == ["XX0010000/TCN-D-1"]
    assert [b.tcn for b in first.claim_due_bookings(lease_s=0.5)] == ["XX0010000/TCN-D-2"]
    # The first replica dies holding them: the second waits for the claims, not for ever.
    assert second.claim_due_notifications(lease_s=60) == [] and second.claim_due_bookings(lease_s=60) == []
    due = second.next_due_at()
    assert due is not None and due > dt.datetime.now(dt.UTC)  # when the claim runs out, not now
    eventually_blocking(lambda: dt.datetime.now(dt.UTC) > due, what="the claims' leases running out")
    assert [n.tcn for n in second.claim_due_notifications(lease_s=60)] == ["XX0010000/TCN-D-1"]
    assert [b.tcn for b in second.claim_due_bookings(lease_s=60)] == ["XX0010000/TCN-D-2"]
    # An attempt's outcome ends the claim: the next retry is anyone's once due.
    second.reschedule_booking("XX0010000/TCN-D-2", dt.datetime.now(dt.UTC))
    assert [b.tcn for b in first.claim_due_bookings(lease_s=60)] == ["XX0010000/TCN-D-2"]


def test_a_named_replica_restarted_after_a_crash_takes_back_its_claims_at_once(database_url: str) -> None:
    # Replica "a" dies holding claims with long leases; replica "b" holds one too.
    a, b = CoordinatorStore(database_url, replica_id="a"), CoordinatorStore(database_url, replica_id="b")
    queued(a, ["TCN-R-1", "TCN-R-2"])
    incomplete(a, ["TCN-R-3"])
    assert [n.tcn for n in a.claim_due_notifications(lease_s=600, limit=1)] == ["XX0010000/TCN-R-1"]
    assert [p.tcn for p in a.claim_due_bookings(lease_s=600)] == ["XX0010000/TCN-R-3"]
    assert [n.tcn for n in b.claim_due_notifications(lease_s=600)] == ["XX0010000/TCN-R-2"]
    a.close()
    # Its next life, under the same name, frees what the dead one held, and only that.
    again = CoordinatorStore(database_url, replica_id="a")
    assert again.release_own_claims() == 2
    assert [n.tcn for n in again.claim_due_notifications(lease_s=60)] == ["XX0010000/TCN-R-1"]
    assert [p.tcn for p in again.claim_due_bookings(lease_s=60)] == ["XX0010000/TCN-R-3"]
    # An unnamed replica frees nothing: its claims expire with their leases.
    unnamed = CoordinatorStore(database_url)
    assert unnamed.release_own_claims() == 0
    for store in (again, b, unnamed):
        store.close()


async def test_two_coordinator_replicas_deliver_each_notification_once(
    replicas: list[CoordinatorStore], tmp_path: Path, pki: dict[str, TlsFiles]
) -> None:
    tcns = [f"TCN-N-{i:03d}" for i in range(30)]
    queued(replicas[0], tcns)
    service = build_ice(IceConfig(data_dir=tmp_path / "ice", tls=pki["ice"]))
    await service.start()
    try:
        async with open_channel(service.host.address, pki["coordinator"], retries=False) as channel:
            deliverers = [
                OutboxDeliverer(
                    store,
                    ice_grpc.IceNotificationServiceStub(channel),
                    deadline_s=5.0,
                    retry_initial_s=0.05,
                    retry_max_s=0.5,
                    max_attempts=5,
                )
                for store in replicas
            ]
            # Both replicas work the outbox at the same time until it is empty.
            while sum(await asyncio.gather(*(d.deliver_due() for d in deliverers))):
                pass
        received = await list_notifications(service.host.address, tls=pki["ice"], limit=100)
    finally:
        await service.stop(0)
    assert sorted(r.notification.tcn for r in received) == tcns
    assert all(d.delivered for d in deliverers)  # both took part
    # Each notification went out once: one acknowledgement per TCN, none a duplicate.
    events = Counter(
        (event, detail)
        for tcn in tcns
        for event, detail in replicas[1].audit(booking_key("XX0010000", tcn))
        if event.startswith("notification")
    )
    assert events == {
        ("notification_queued", ""): len(tcns),
        ("notification_delivered", "acknowledged"): len(tcns),
    }
    assert replicas[1].stats().outbox_pending == 0


async def test_replicas_of_a_node_see_each_others_enrolments_and_removals(
    database_url: str, tmp_path: Path, population: Population, pki: dict[str, TlsFiles]
) -> None:
    nodes: list[GalleryNode] = []
    try:
        for name in ("a", "b"):
            node = build_node(
                NodeConfig(
                    node="iafis",
                    data_dir=tmp_path / name,
                    tls=pki["iafis"],
                    database_url=SecretStr(database_url),
                    sync_interval_s=0.2,
                )
            )
            await node.start()
            nodes.append(node)
        a, b = nodes
        await enroll(a.host.address, population.iafis[:5], tls=pki["admin"])
        await enroll(b.host.address, population.iafis[5:8], tls=pki["admin"])
        everyone = {e.subject_id for e in population.iafis[:8]}
        await eventually(lambda: all(set(n.servicer.gallery.contents()[0]) == everyone for n in nodes))

        # A search on b finds a subject that only a enrolled.
        sample = next(x for x in population.bookings if x.truth.iafis_subject_id in everyone)
        probe = gal.Probe(probe_id="P-1", tenprint=sample.booking.tenprint)
        async with open_channel(b.host.address, pki["coordinator"], retries=False) as channel:
            found = await gal_grpc.GalleryServiceStub(channel).Identify(
                gal.IdentifyRequest(probes=[probe]), timeout=30
            )
        assert found.results[0].candidates[0].subject_id == sample.truth.iafis_subject_id

        gone = population.iafis[0].subject_id
        async with open_channel(b.host.address, pki["admin"]) as channel:
            await gal_grpc.GalleryServiceStub(channel).Remove(
                gal.RemoveRequest(subject_ids=[gone]), timeout=10
            )
        await eventually(lambda: gone not in a.servicer.gallery.contents()[0])
        assert len(a.servicer.gallery) == len(b.servicer.gallery) == 7
    finally:
        for node in nodes:
            await node.stop(0)
