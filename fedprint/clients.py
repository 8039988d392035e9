"""Client calls the CLI, the demo, the benchmarks and the tests share: enrolling a
gallery (as a gallery administrator), submitting bookings concurrently (each as its agency),
reading the ICE queue (as ICE), reading a node's gallery statistics.

Every call speaks mutual TLS with the identity given; plaintext only with ``insecure=True``.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc

from fedprint.booking.v1 import booking_pb2 as bk
from fedprint.booking.v1 import booking_pb2_grpc as bk_grpc
from fedprint.gallery.v1 import gallery_pb2 as gal
from fedprint.gallery.v1 import gallery_pb2_grpc as gal_grpc
from fedprint.ice.v1 import ice_pb2 as ice
from fedprint.ice.v1 import ice_pb2_grpc as ice_grpc
from fedprint.pki import TlsFiles
from fedprint.rpc import open_channel

#: Subjects per Enroll stream: each stream is one transaction on the node.
ENROLL_CHUNK = 250


class Enrollable(Protocol):
    """Anything that knows its own ``Enroll`` message (e.g. a synthetic gallery entry)."""

    @property
    def subject_id(self) -> str: ...

    def enroll_request(self) -> gal.EnrollRequest: ...


async def enroll(
    address: str,
    entries: Sequence[Enrollable],
    *,
    deadline_s: float = 300.0,
    on_progress: Callable[[int], None] | None = None,
    tls: TlsFiles | None,
    insecure: bool = False,
    node: str | None = None,
) -> int:
    """Enrolls ``entries`` in streams of :data:`ENROLL_CHUNK`, as the gallery administrator ``tls``;
    returns the gallery size after. ``node`` (``iafis``, ``ident``): the node expected at
    ``address``; its certificate must say so (:func:`fedprint.rpc.open_channel`)."""
    size = 0
    async with open_channel(address, tls, server=node, insecure=insecure) as channel:
        stub = gal_grpc.GalleryServiceStub(channel)
        for start in range(0, len(entries), ENROLL_CHUNK):
            chunk = entries[start : start + ENROLL_CHUNK]

            def requests(chunk: Sequence[Enrollable] = chunk) -> Iterator[gal.EnrollRequest]:
                return (e.enroll_request() for e in chunk)

            response = await stub.Enroll(requests(), timeout=deadline_s)
            size = int(response.gallery_size)
            if on_progress is not None:
                on_progress(len(chunk))
    return size


async def gallery_stats(
    address: str, *, tls: TlsFiles | None, insecure: bool = False, node: str | None = None
) -> gal.GalleryStats:
    """A gallery node's (or router's) ``GetStats``, read as the gallery administrator ``tls``; from
    the node ``node`` only, when given."""
    async with open_channel(address, tls, server=node, insecure=insecure) as channel:
        return await gal_grpc.GalleryServiceStub(channel).GetStats(gal.GetStatsRequest(), timeout=30)


@dataclass(frozen=True)
class Submission:
    """The outcome of one booking's submission: a decision, or the last gRPC error; the latency
    runs from the first call to the answer, across every attempt."""

    tcn: str
    decision: bk.BookingDecision | None
    error: str
    latency_ms: float
    #: The status codes of the failed calls that were retried (empty: answered at the first).
    retried: tuple[str, ...] = ()

    @property
    def attempts(self) -> int:
        """SubmitBooking calls made."""
        return len(self.retried) + 1


#: Failures after which the same booking may simply be sent again: the coordinator was down or
#: restarting, did not answer in time, or refused the call under the agency's rate limit (before
#: reading the booking). Resending is safe because the TCN is the idempotency key: the
#: coordinator answers a resubmission with identical content from its stored decision (or
#: finishes an incomplete one), and refuses different content under the same TCN.
TRANSIENT_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
)


@dataclass(frozen=True)
class Retry:
    """How a client resends a booking after a transient failure (:data:`TRANSIENT_CODES`):
    exponential backoff with full jitter, up to ``attempts`` calls in all."""

    attempts: int = 8
    initial_s: float = 0.25
    max_s: float = 5.0

    def backoff_s(self, failures: int) -> float:
        return random.uniform(0.5, 1.0) * min(self.max_s, self.initial_s * 2.0 ** (failures - 1))


async def submit_bookings(
    address: str,
    bookings: Sequence[bk.Booking],
    *,
    concurrency: int = 8,
    deadline_s: float = 60.0,
    on_done: Callable[[Submission], None] | None = None,
    agencies: Mapping[str, TlsFiles] | None,
    insecure: bool = False,
    retry: Retry | None = None,
) -> list[Submission]:
    """Submits every booking, ``concurrency`` at a time, each with the certificate of its ORI's
    agency (``agencies``: ORI -> identity); results follow the input order. With ``retry``, a
    booking whose call fails transiently is sent again (same TCN, same content) after a backoff,
    within its slot of the concurrency limit, so that a coordinator restart loses no booking."""
    limit = asyncio.Semaphore(concurrency)
    oris = sorted({b.ori for b in bookings})
    if agencies is not None and (missing := [o for o in oris if o not in agencies]):
        raise KeyError(f"no booking-agency certificate for ORI {', '.join(missing)}")
    channels = {
        ori: open_channel(
            address, agencies[ori] if agencies is not None else None, server="coordinator", insecure=insecure
        )
        for ori in oris
    }
    try:
        stubs = {ori: bk_grpc.BookingServiceStub(channel) for ori, channel in channels.items()}

        async def one(booking: bk.Booking) -> Submission:
            failures: list[str] = []
            # A booking keeps its slot through its retries: while the coordinator is down, the
            # bookings in flight wait it out, and the ones queued behind them are not all spent
            # on failing calls (each then retried at the back of the queue).
            async with limit:
                started = time.perf_counter()
                while True:
                    try:
                        decision = await stubs[booking.ori].SubmitBooking(booking, timeout=deadline_s)
                    except grpc.aio.AioRpcError as error:
                        decision, failure = None, error
                    latency_ms = (time.perf_counter() - started) * 1000
                    if decision is not None:
                        result = Submission(booking.tcn, decision, "", latency_ms, tuple(failures))
                        break
                    failures.append(failure.code().name)
                    if (
                        retry is None
                        or len(failures) >= retry.attempts
                        or failure.code() not in TRANSIENT_CODES
                    ):
                        error_text = f"{failure.code().name}: {failure.details()}"
                        result = Submission(booking.tcn, None, error_text, latency_ms, tuple(failures[:-1]))
                        break
                    await asyncio.sleep(retry.backoff_s(len(failures)))
            if on_done is not None:
                on_done(result)
            return result

        return list(await asyncio.gather(*(one(b) for b in bookings)))
    finally:
        for channel in channels.values():
            await channel.close(None)


async def list_notifications(
    address: str, limit: int = 1000, *, tls: TlsFiles | None, insecure: bool = False
) -> list[ice.ReceivedNotification]:
    """The ICE queue, level 1 first, then by time received (read as ICE: ``tls``), from a server
    whose certificate is ICE's."""
    async with open_channel(address, tls, server="ice", insecure=insecure) as channel:
        response = await ice_grpc.IceNotificationServiceStub(channel).ListNotifications(
            ice.ListNotificationsRequest(limit=limit), timeout=10
        )
        return list(response.notifications)


async def wait_for_notifications(
    address: str, expected: int, timeout_s: float, *, tls: TlsFiles | None, insecure: bool = False
) -> list[ice.ReceivedNotification]:
    """Polls the ICE queue until it holds ``expected`` notifications or the time is up."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            received = await list_notifications(address, tls=tls, insecure=insecure)
        except grpc.aio.AioRpcError as error:
            # A service that has just (re)started may refuse the first connection.
            if error.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            received = []
        if len(received) >= expected or time.monotonic() > deadline:
            return received
        await asyncio.sleep(0.1)
