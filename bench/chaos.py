"""Chaos for the federation bench: a seeded schedule of SIGKILLs and restarts of the services
while bookings are being submitted, and the accounting afterwards: every booking decided and
final, every IDENT hit in the ICE queue exactly once.

A kill is a SIGKILL (a crash: no graceful stop), and the service comes back on the same address
over the same database files, as a supervisor would restart it. Each service is killed at moments
drawn from the seed, as fractions of the bookings answered so far, so a run is reproducible up to
the timing of the machine.
"""

from __future__ import annotations

import asyncio
import collections
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import grpc

from fedprint.biometrics.v1 import biometrics_pb2 as bio
from fedprint.booking.v1 import booking_pb2 as bk
from fedprint.booking.v1 import booking_pb2_grpc as bk_grpc
from fedprint.ice.v1 import ice_pb2 as ice
from fedprint.ice.v1 import ice_pb2_grpc as ice_grpc
from fedprint.pki import TlsFiles
from fedprint.records.v1 import records_pb2 as rec
from fedprint.rpc import open_channel
from launcher.processes import ServiceProcess

#: The services a chaos run kills: both gallery nodes, the ICE service and the coordinator.
CHAOS_SERVICES = ("iafis", "ident", "ice", "coordinator")
#: Notification states of a decision whose IDENT hit ICE is to receive.
_TO_NOTIFY = frozenset({bk.QUEUED, bk.DELIVERED, bk.UNDELIVERABLE})
#: Most notices ListNotifications returns in one call (per threat level here).
_LIST_LIMIT = 1000


@dataclass(frozen=True)
class ChaosConfig:
    """What a chaos run kills, when, and for how long."""

    seed: int = 0
    services: tuple[str, ...] = CHAOS_SERVICES
    kills_per_service: int = 1
    #: Kills fall between these fractions of the bookings answered.
    window: tuple[float, float] = (0.1, 0.8)
    #: How long a killed service stays down before its restart begins, seconds (drawn uniformly).
    down_s: tuple[float, float] = (0.5, 3.0)
    #: Longest wait, after the last booking, for retries to finish and the outbox to drain.
    settle_timeout_s: float = 300.0


@dataclass(frozen=True)
class ChaosEvent:
    """One planned kill: ``service`` dies once ``after_fraction`` of the bookings are answered
    and is restarted ``down_s`` later."""

    service: str
    after_fraction: float
    down_s: float


@dataclass(frozen=True)
class ChaosRecord:
    """One kill as it happened (times in seconds from the start of the submissions)."""

    service: str
    killed_at_s: float
    after_bookings: int
    down_s: float
    #: From the restart's launch to the service reporting its address again.
    restart_s: float
    during_submissions: bool


def chaos_schedule(config: ChaosConfig) -> list[ChaosEvent]:
    """The kills of a run, in order of their moments; the same seed gives the same schedule."""
    rng = random.Random(config.seed)
    low, high = config.window
    events = [
        ChaosEvent(service, rng.uniform(low, high), rng.uniform(*config.down_s))
        for service in config.services
        for _ in range(config.kills_per_service)
    ]
    return sorted(events, key=lambda e: e.after_fraction)


class ChaosMonkey:
    """Carries out a schedule against running services while :meth:`answered` counts progress.
    One task per service (a service's kills happen one after another; different services' may
    overlap, as independent failures do)."""

    def __init__(self, services: Mapping[str, ServiceProcess], schedule: Sequence[ChaosEvent], total: int):
        unknown = sorted({e.service for e in schedule} - set(services))
        if unknown:
            raise KeyError(f"no such service to kill: {', '.join(unknown)}")
        self._services = services
        self._schedule = schedule
        self._total = total
        self._answered = 0
        self._submitting = True
        self._progress = asyncio.Event()
        self._started = time.perf_counter()
        self.records: list[ChaosRecord] = []

    def answered(self) -> None:
        """One more booking answered (decision or final error)."""
        self._answered += 1
        self._progress.set()

    def submissions_done(self) -> None:
        """Every booking is answered: kills still due happen at once."""
        self._submitting = False
        self._progress.set()

    async def _reached(self, fraction: float) -> None:
        while self._submitting and self._answered < fraction * self._total:
            self._progress.clear()
            await self._progress.wait()

    async def _run_service(self, events: list[ChaosEvent]) -> None:
        for event in events:
            await self._reached(event.after_fraction)
            service = self._services[event.service]
            killed_at = time.perf_counter() - self._started
            after, during = self._answered, self._submitting
            await service.kill()
            await asyncio.sleep(event.down_s)
            launched = time.perf_counter()
            await service.restart()
            self.records.append(
                ChaosRecord(
                    event.service,
                    round(killed_at, 3),
                    after,
                    round(event.down_s, 3),
                    round(time.perf_counter() - launched, 3),
                    during,
                )
            )

    async def run(self) -> None:
        """Every kill and restart of the schedule; returns once all services are back."""
        self._started = time.perf_counter()
        by_service: dict[str, list[ChaosEvent]] = collections.defaultdict(list)
        for event in self._schedule:
            by_service[event.service].append(event)
        await asyncio.gather(*(self._run_service(events) for events in by_service.values()))

    def kills(self) -> dict[str, int]:
        """Kills per service, as carried out."""
        return dict(collections.Counter(r.service for r in self.records))

    def report(self) -> list[dict[str, object]]:
        return [asdict(r) for r in sorted(self.records, key=lambda r: r.killed_at_s)]


async def settle(coordinator: str, admin: TlsFiles, timeout_s: float) -> tuple[bool, float]:
    """Waits until the coordinator has nothing left to do (no incomplete booking, no retry, no
    undelivered notification) or ``timeout_s`` passes; returns (settled, seconds waited)."""
    started = time.monotonic()
    async with open_channel(coordinator, admin, server="coordinator") as channel:
        stub = bk_grpc.BookingServiceStub(channel)
        while True:
            try:
                stats = await stub.GetStats(bk.GetStatsRequest(), timeout=10)
                if stats.incomplete == 0 and stats.retrying_bookings == 0 and stats.outbox_pending == 0:
                    return True, time.monotonic() - started
            except grpc.aio.AioRpcError as error:
                if error.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise
            if time.monotonic() - started > timeout_s:
                return False, time.monotonic() - started
            await asyncio.sleep(0.5)


@dataclass(frozen=True)
class Accounting:
    """What the federation holds after the run, booking by booking."""

    #: Submitted bookings without a stored decision.
    lost: int
    #: Decisions still INCOMPLETE.
    not_final: int
    #: Final decisions with an IDENT hit that ICE is to receive (not suppressed).
    ident_hits: int
    ident_hits_notified_once: int
    notified_zero: int
    notified_more_than_once: int
    #: IDENT hits that a suppression rule withheld (ICE must not have them).
    ident_hits_suppressed: int
    #: Notices in the ICE queue for TCNs that are not such a hit.
    notified_unexpected: int
    notifications: int


async def account(
    coordinator: str,
    ice_address: str,
    tcns_by_ori: Mapping[str, Sequence[str]],
    agencies: Mapping[str, TlsFiles],
    ice_identity: TlsFiles,
    kept: Callable[[Iterable[tuple[str, str]]], Mapping[tuple[str, str], bk.BookingDecision]],
) -> Accounting:
    """Reads every booking's decision (each as its own agency: a booking it cannot read is lost)
    and the ICE queue, and compares the coordinator's IDENT hits, as it keeps them (``kept``:
    bookings (ORI, TCN) to the coordinator's own record; an agency is not told of IDENT), with
    ICE's notices by booking."""
    answered: list[tuple[str, str]] = []
    lost = 0
    for ori, tcns in tcns_by_ori.items():
        async with open_channel(coordinator, agencies[ori], server="coordinator") as channel:
            stub = bk_grpc.BookingServiceStub(channel)
            for tcn in tcns:
                if await _decision(stub, tcn) is None:
                    lost += 1
                else:
                    answered.append((ori, tcn))
    decisions = dict(kept(answered))
    hits = {
        booking
        for booking, d in decisions.items()
        if d.status == bk.COMPLETE and d.ident.band == bio.HIT and d.notification in _TO_NOTIFY
    }
    suppressed = sum(
        1
        for d in decisions.values()
        if d.status == bk.COMPLETE and d.ident.band == bio.HIT and d.notification == bk.SUPPRESSED
    )
    notices: collections.Counter[tuple[str, str]] = collections.Counter()
    for level in (rec.LEVEL_1, rec.LEVEL_2, rec.LEVEL_3):
        received = await _list_level(ice_address, ice_identity, level)
        notices.update((n.notification.ori, n.notification.tcn) for n in received)
    return Accounting(
        lost=lost,
        not_final=sum(1 for d in decisions.values() if d.status != bk.COMPLETE),
        ident_hits=len(hits),
        ident_hits_notified_once=sum(1 for t in hits if notices[t] == 1),
        notified_zero=sum(1 for t in hits if notices[t] == 0),
        notified_more_than_once=sum(1 for t in hits if notices[t] > 1),
        ident_hits_suppressed=suppressed,
        notified_unexpected=sum(n for t, n in notices.items() if t not in hits),
        notifications=sum(notices.values()),
    )


async def _decision(stub: bk_grpc.BookingServiceAsyncStub, tcn: str) -> bk.BookingDecision | None:
    """The stored decision of ``tcn`` (None: there is none), read at the pace the agency's rate
    limit allows."""
    while True:
        try:
            return await stub.GetDecision(bk.GetDecisionRequest(tcn=tcn), timeout=10)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                return None
            if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
            await asyncio.sleep(0.5)


async def _list_level(
    address: str, identity: TlsFiles, level: rec.ThreatLevel.ValueType
) -> list[ice.ReceivedNotification]:
    """One threat level's notices (the queue is read a level at a time: one call returns 1000)."""
    async with open_channel(address, identity, server="ice") as channel:
        response = await ice_grpc.IceNotificationServiceStub(channel).ListNotifications(
            ice.ListNotificationsRequest(limit=_LIST_LIMIT, level=level), timeout=30
        )
    if len(response.notifications) >= _LIST_LIMIT:
        raise RuntimeError(f"ICE holds {_LIST_LIMIT} or more level-{level} notices: too many to count here")
    return list(response.notifications)
