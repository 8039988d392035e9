"""Who may call what: the role table, the caller's identity, and the server interceptor that
enforces both before a request is decoded.

Every server of the federation runs :class:`AccessInterceptor` (``ServiceHost`` installs it).
For each call it reads the peer's certificate from the TLS session, takes the role (and for an
agency the ORI) from it (:func:`fedprint.pki.identity_of`), refuses a certificate the CA revoked
(:class:`fedprint.pki.RevocationList`, re-read when its file changes), and looks the method up in
:data:`ACCESS`. A method missing from the table is refused (fail closed). A refusal is
``PERMISSION_DENIED``, logged as an ``access denied`` entry with the caller's certificate
subject, role, ORI and address, and handed to the service's audit sink when it has one. Only
then is the request decoded: an undecodable one is ``INVALID_ARGUMENT``, never a crash.

Refusals are not free to ask for: each caller (its certificate, or its address without one) has a
budget of refused calls (:class:`DenialLedger`); past it a refused call is ``RESOURCE_EXHAUSTED``
with a retry delay. Repeats of one refusal (same caller, method, reason and TCN) within a window
are one audit entry: the first at once, the others counted in a second entry when the window
closes, so a caller cannot grow the audit trail by one row a call.

Servicers learn the caller through :func:`current_caller` (an agency may only act for its own
ORI) and refuse with :func:`deny`, which audits the same way.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

import grpc
import structlog
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from fedprint.pki import Identity, RevocationList, Role, identity_of

log = structlog.get_logger(__name__)

_BOOKING = "/fedprint.booking.v1.BookingService/"
_GALLERY = "/fedprint.gallery.v1.GalleryService/"
_ICE = "/fedprint.ice.v1.IceNotificationService/"
_REVIEW = "/fedprint.review.v1.ReviewService/"
#: Every role: health checking and reflection answer any authenticated caller.
ANY_ROLE = frozenset(Role)

#: RPC full method name -> roles allowed to call it (DESIGN.md section 8; the README's table).
ACCESS: Mapping[str, frozenset[Role]] = {
    # The coordinator answers booking agencies; GetDecision and WatchDecisions further keep each
    # agency to its own ORI's decisions.
    _BOOKING + "SubmitBooking": frozenset({Role.BOOKING_AGENCY}),
    _BOOKING + "GetDecision": frozenset({Role.BOOKING_AGENCY}),
    _BOOKING + "WatchDecisions": frozenset({Role.BOOKING_AGENCY}),
    # The coordinator's queues (retried bookings, outbox, dead letters) are for the system's
    # administrators, the same role that runs the galleries; the counts name no one.
    _BOOKING + "GetStats": frozenset({Role.GALLERY_ADMIN}),
    # Gallery nodes search for the coordinator only; gallery administrators curate the gallery.
    # Agencies never call nodes. A sharded node's router calls its shards with the node's own
    # certificate (role gallery-node), passing on the coordinator's searches and the
    # administrators' changes: the shard itself admits only its own node's certificate, and a
    # router or unsharded node refuses the gallery-node role (nodes.gallery.server, .router).
    _GALLERY + "Identify": frozenset({Role.COORDINATOR, Role.GALLERY_NODE}),
    _GALLERY + "Enroll": frozenset({Role.GALLERY_ADMIN, Role.GALLERY_NODE}),
    _GALLERY + "Remove": frozenset({Role.GALLERY_ADMIN, Role.GALLERY_NODE}),
    _GALLERY + "GetStats": frozenset({Role.GALLERY_ADMIN, Role.GALLERY_NODE}),
    # A subject's prints and record leave a node only for the coordinator, which asks when an
    # examiner claims a review of that subject (and a router, passing that on to the owning shard).
    _GALLERY + "GetSubject": frozenset({Role.COORDINATOR, Role.GALLERY_NODE}),
    # Examiners work the reviews of borderline matches.
    _REVIEW + "ListReviews": frozenset({Role.EXAMINER}),
    _REVIEW + "ClaimReview": frozenset({Role.EXAMINER}),
    _REVIEW + "DecideReview": frozenset({Role.EXAMINER}),
    # ICE receives notifications from the coordinator; only ICE reads them.
    _ICE + "Notify": frozenset({Role.COORDINATOR}),
    _ICE + "ListNotifications": frozenset({Role.ICE}),
    "/grpc.health.v1.Health/Check": ANY_ROLE,
    "/grpc.health.v1.Health/Watch": ANY_ROLE,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": ANY_ROLE,
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": ANY_ROLE,
}


def table_without(role: Role, table: Mapping[str, frozenset[Role]] = ACCESS) -> dict[str, frozenset[Role]]:
    """``table`` with ``role`` taken from every method that does not admit every role: for a server
    that must refuse that role before a request is decoded (a whole gallery node or a router
    refuses the gallery-node role, which only a shard answers)."""
    return {method: roles if roles == ANY_ROLE else roles - {role} for method, roles in table.items()}


@dataclass(frozen=True)
class Caller:
    """Who is calling: the certificate's identity, or None on a plaintext (``--insecure``) server."""

    identity: Identity | None
    method: str
    peer: str

    def acts_for(self, ori: str) -> bool:
        """Whether this caller may act for agency ``ori``: an agency for its own ORI only."""
        return self.identity is None or self.identity.ori == ori

    def describe(self) -> dict[str, str]:
        found = self.identity.describe() if self.identity else {"subject": "", "role": "", "ori": ""}
        return {**found, "peer": self.peer, "method": self.method}

    def budget_key(self) -> str:
        """Whose budget of refused calls this call spends: the certificate's (by serial, so that a
        renewed certificate starts afresh and a revoked one keeps its own), else the peer's
        address without its port (a new connection is not a new budget)."""
        if self.identity is not None:
            return f"serial:{self.identity.serial:x}"
        return "peer:" + self.peer.rsplit(":", 1)[0]


@dataclass(frozen=True)
class Denial:
    """A refused call, as audited; or, with ``count`` > 1, that many refusals of one kind."""

    caller: Caller
    reason: str
    #: The booking the call was about, when it named one.
    tcn: str = ""
    #: How many refused calls the entry stands for: a window's repeats are one entry.
    count: int = 1
    #: The length of the window the repeats fell in (seconds), in a summary.
    window_s: float = 0.0

    def fields(self) -> dict[str, str]:
        found = {**self.caller.describe(), "reason": self.reason, "tcn": self.tcn}
        if self.count != 1:
            found |= {"count": str(self.count), "window_s": f"{self.window_s:g}"}
        return found


#: Where a service keeps its denials besides the log (the coordinator: its audit trail).
AuditSink = Callable[[Denial], Awaitable[None]]


class TokenBuckets:
    """Rate limits per key (an agency's ORI): ``per_second`` sustained, ``burst`` at once."""

    def __init__(self, per_second: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        if per_second <= 0 or burst < 1:
            raise ValueError("a rate limit needs per_second > 0 and burst >= 1")
        self.per_second = per_second
        self.burst = burst
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, key: str) -> float:
        """Takes one token from ``key``'s bucket: 0.0 when there was one, else the seconds until
        there will be."""
        now = self._clock()
        tokens, then = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - then) * self.per_second)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1.0 - tokens) / self.per_second


#: The reason a refusal past the caller's budget is counted under (one entry per window).
OVER_BUDGET = "over its budget of refused calls"


@dataclass
class _Window:
    first: Denial
    opened: float
    repeats: int = 0


class DenialLedger:
    """Budgets of refused calls per caller, and repeated refusals folded into one audit entry.

    ``per_second`` and ``burst`` bound each caller's refusals (:meth:`take`); :meth:`note` says which
    entries to audit: a refusal unlike any in the last ``window_s`` at once; a repeat (same caller,
    method, reason and TCN) only counted, and the count audited as one entry when its window closes
    (:meth:`closed`). What one caller adds to the audit trail is then bounded by its budget and
    the window, whatever it sends.
    """

    def __init__(
        self,
        per_second: float = 1.0,
        burst: int = 30,
        window_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if window_s <= 0:
            raise ValueError("a denial window needs window_s > 0")
        self.budget = TokenBuckets(per_second, burst, clock)
        self.window_s = window_s
        self.clock = clock
        # Insertion order is opening order: the oldest window is always first.
        self._windows: dict[tuple[str, str, str, str], _Window] = {}
        self.flusher: asyncio.Task[None] | None = None

    def take(self, caller: Caller) -> float:
        """Spends one of ``caller``'s refusals: 0.0 within budget, else seconds until there is one."""
        return self.budget.take(caller.budget_key())

    def note(self, denial: Denial) -> list[Denial]:
        """Counts ``denial``; returns what to audit now: the summaries of windows that closed, and
        ``denial`` itself unless it repeats one of an open window."""
        now = self.clock()
        due = self.closed(now)
        key = (denial.caller.budget_key(), denial.caller.method, denial.reason, denial.tcn)
        window = self._windows.get(key)
        if window is not None:
            window.repeats += 1
            return due
        self._windows[key] = _Window(denial, now)
        return [*due, denial]

    def closed(self, now: float | None = None) -> list[Denial]:
        """Closes the windows that ended by ``now`` (all of them when None); the summaries of those
        that counted repeats."""
        summaries: list[Denial] = []
        while self._windows:
            key, window = next(iter(self._windows.items()))
            if now is not None and window.opened + self.window_s > now:
                break
            del self._windows[key]
            if window.repeats:
                summaries.append(
                    Denial(
                        window.first.caller,
                        window.first.reason,
                        window.first.tcn,
                        count=window.repeats,
                        window_s=self.window_s,
                    )
                )
        return summaries

    def next_close(self) -> float | None:
        """When the oldest window with repeats to report closes (clock time), None when none has."""
        pending = [w.opened for w in self._windows.values() if w.repeats]
        return min(pending) + self.window_s if pending else None


@dataclass
class AccessPolicy:
    """What a server's interceptor enforces."""

    table: Mapping[str, frozenset[Role]] = field(default_factory=lambda: ACCESS)
    #: False only on a plaintext server (``insecure: true``): no certificate, so no identity.
    authenticate: bool = True
    #: Calls per agency ORI; None for no limit.
    rate_limit: TokenBuckets | None = None
    audit: AuditSink | None = None
    #: The CA's revoked certificates (``ServiceHost`` sets it from ``tls.crl``); None: none.
    revocation: RevocationList | None = None
    #: Budgets of refused calls and their summaries in the audit trail.
    denials: DenialLedger = field(default_factory=DenialLedger)

    async def close(self) -> None:
        """Audits the repeats still counted (a server stopping): no refusal goes unrecorded."""
        flusher, self.denials.flusher = self.denials.flusher, None
        if flusher is not None:
            flusher.cancel()
        for summary in self.denials.closed():
            await _record(summary, self)


@dataclass(frozen=True)
class _Scope:
    caller: Caller
    policy: AccessPolicy


_SCOPE: contextvars.ContextVar[_Scope] = contextvars.ContextVar("fedprint_access_scope")


def current_caller() -> Caller:
    """The caller of the RPC being served (set by :class:`AccessInterceptor`)."""
    return _SCOPE.get().caller


async def _record(denial: Denial, policy: AccessPolicy) -> None:
    log.warning("access denied", audit=True, **denial.fields())
    if policy.audit is not None:
        try:
            await policy.audit(denial)
        except Exception:  # the refusal stands even when its audit record could not be written
            log.exception("could not record the denial in the audit trail", **denial.fields())


async def _summarise_when_due(policy: AccessPolicy) -> None:
    """Audits each window's count of repeats when the window closes, while any is counting."""
    ledger = policy.denials
    while (due := ledger.next_close()) is not None:
        await asyncio.sleep(max(0.0, due - ledger.clock()))
        for summary in ledger.closed(ledger.clock()):
            await _record(summary, policy)


async def audit_denial(denial: Denial, policy: AccessPolicy) -> None:
    """Logs a denial with the caller's identity and hands it to the service's audit sink; a repeat
    of one in the current window is counted instead, and audited with its count when the window
    closes (:class:`DenialLedger`)."""
    for entry in policy.denials.note(denial):
        await _record(entry, policy)
    if policy.denials.next_close() is not None and (
        policy.denials.flusher is None or policy.denials.flusher.done()
    ):
        policy.denials.flusher = asyncio.get_running_loop().create_task(_summarise_when_due(policy))


async def refuse(
    context: grpc.aio.ServicerContext[Any, Any], denial: Denial, policy: AccessPolicy
) -> NoReturn:
    """Ends a refused call: PERMISSION_DENIED, audited (:func:`audit_denial`); or, past the caller's
    budget of refusals, RESOURCE_EXHAUSTED with a retry delay, counted under :data:`OVER_BUDGET`."""
    wait = policy.denials.take(denial.caller)
    if wait > 0.0:
        await audit_denial(Denial(denial.caller, OVER_BUDGET), policy)
        await context.abort_with_status(  # type: ignore[attr-defined]
            _retry_status(wait, "too many refused calls from this caller; retry later")
        )
        raise AssertionError("abort returned")  # pragma: no cover
    await audit_denial(denial, policy)
    await context.abort(grpc.StatusCode.PERMISSION_DENIED, denial.reason)
    raise AssertionError("abort returned")  # pragma: no cover


async def deny(context: grpc.aio.ServicerContext[Any, Any], reason: str, *, tcn: str = "") -> NoReturn:
    """Refuses the current call with PERMISSION_DENIED, audited with the caller's identity (within
    the caller's budget of refusals: :func:`refuse`)."""
    scope = _SCOPE.get()
    await refuse(context, Denial(scope.caller, reason, tcn), scope.policy)


def _retry_status(seconds: float, message: str) -> grpc.Status:
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(int(seconds * 1e9))
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    return rpc_status.to_status(
        status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message=message, details=[detail])
    )


def retry_delay(error: grpc.aio.AioRpcError | grpc.RpcError) -> float | None:
    """The ``google.rpc.RetryInfo`` delay (seconds) of a failed call, None when it carries none."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    for detail in status.details if status is not None else []:
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            return float(info.retry_delay.ToNanoseconds()) / 1e9
    return None


class _Undecodable(Exception):
    """A streamed request message that is not a valid message of its type."""


def _decoder(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
    def decode(raw: bytes) -> Any:
        if deserializer is None:
            return raw
        try:
            return deserializer(raw)
        except Exception as error:  # DecodeError, or nesting past protobuf's recursion limit
            raise _Undecodable(type(error).__name__) from error

    return decode


async def _decoded_stream(raw: AsyncIterator[bytes], decode: Callable[[bytes], Any]) -> AsyncIterator[Any]:
    async for message in raw:
        yield decode(message)


if TYPE_CHECKING:
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
    _Handler = grpc.RpcMethodHandler[Any, Any]
else:  # generic only in the type stubs
    _ServerInterceptor = grpc.aio.ServerInterceptor
    _Handler = grpc.RpcMethodHandler


class AccessInterceptor(_ServerInterceptor):
    """Admits a call by the caller's certificate and :data:`ACCESS`, then decodes its request."""

    def __init__(self, policy: AccessPolicy) -> None:
        self.policy = policy

    async def _admit(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> _Scope:
        peer = context.peer()
        if not self.policy.authenticate:
            return _Scope(Caller(None, method, peer), self.policy)
        pem = list(context.auth_context().get("x509_pem_cert", []))
        identity = identity_of(pem[0]) if pem else None
        caller = Caller(identity, method, peer)
        allowed = self.policy.table.get(method)
        reason = ""
        if identity is None:
            reason = "no client certificate"
        elif self.policy.revocation is not None and self.policy.revocation.revoked(identity.serial):
            # Before the table: a revoked certificate gets nothing, health checks included.
            reason = f"the certificate (serial {identity.serial:x}) is revoked"
        elif identity.role is None:
            reason = "the certificate names no single known role"
        elif identity.role is Role.BOOKING_AGENCY and identity.ori is None:
            reason = "the booking-agency certificate names no valid ORI"
        elif allowed is None:
            reason = f"{method} is not in the access table"
        elif identity.role not in allowed:
            reason = f"role {identity.role.value} may not call {method}"
        if reason:
            await refuse(context, Denial(caller, reason), self.policy)
        if self.policy.rate_limit is not None and identity is not None and identity.ori is not None:
            wait = self.policy.rate_limit.take(identity.ori)
            if wait > 0.0:
                log.warning("rate limited", ori=identity.ori, method=method, retry_after_s=round(wait, 3))
                await context.abort_with_status(  # type: ignore[attr-defined]
                    _retry_status(wait, f"ORI {identity.ori} is over its rate limit; retry later")
                )
        return _Scope(caller, self.policy)

    @staticmethod
    async def _invalid(context: grpc.aio.ServicerContext[Any, Any], method: str, why: str) -> NoReturn:
        log.warning("undecodable request", method=method, error=why)
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid message ({why})")
        raise AssertionError("abort returned")  # pragma: no cover

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[_Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> _Handler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler  # unknown method: gRPC answers UNIMPLEMENTED
        method: str = handler_call_details.method
        decode = _decoder(handler.request_deserializer)
        serializer = handler.response_serializer
        admit, invalid = self._admit, self._invalid
        # The wrapped handlers receive raw bytes (no deserializer): the caller is admitted first.
        if not handler.request_streaming and not handler.response_streaming:
            unary_unary: Any = handler.unary_unary

            async def unary_unary_call(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                scope = await admit(method, context)
                try:
                    request = decode(raw)
                except _Undecodable as error:
                    await invalid(context, method, str(error))
                _SCOPE.set(scope)
                return await unary_unary(request, context)

            return grpc.unary_unary_rpc_method_handler(unary_unary_call, None, serializer)
        if not handler.request_streaming:
            unary_stream: Any = handler.unary_stream

            async def unary_stream_start(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                scope = await admit(method, context)
                try:
                    request = decode(raw)
                except _Undecodable as error:
                    await invalid(context, method, str(error))
                _SCOPE.set(scope)
                return request

            if inspect.isasyncgenfunction(unary_stream):

                async def unary_stream_gen(
                    raw: bytes, context: grpc.aio.ServicerContext[Any, Any]
                ) -> AsyncIterator[Any]:
                    request = await unary_stream_start(raw, context)
                    async for response in unary_stream(request, context):
                        yield response

                return grpc.unary_stream_rpc_method_handler(unary_stream_gen, None, serializer)

            async def unary_stream_call(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> None:
                request = await unary_stream_start(raw, context)
                await unary_stream(request, context)

            return grpc.unary_stream_rpc_method_handler(unary_stream_call, None, serializer)
        if not handler.response_streaming:
            stream_unary: Any = handler.stream_unary

            async def stream_unary_call(
                raw: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
            ) -> Any:
                _SCOPE.set(await admit(method, context))
                try:
                    return await stream_unary(_decoded_stream(raw, decode), context)
                except _Undecodable as error:
                    await invalid(context, method, str(error))

            return grpc.stream_unary_rpc_method_handler(stream_unary_call, None, serializer)
        stream_stream: Any = handler.stream_stream
        if inspect.isasyncgenfunction(stream_stream):

            async def stream_stream_gen(
                raw: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                _SCOPE.set(await admit(method, context))
                try:
                    async for response in stream_stream(_decoded_stream(raw, decode), context):
                        yield response
                except _Undecodable as error:
                    await invalid(context, method, str(error))

            return grpc.stream_stream_rpc_method_handler(stream_stream_gen, None, serializer)

        async def stream_stream_call(
            raw: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
        ) -> None:
            _SCOPE.set(await admit(method, context))
            try:
                await stream_stream(_decoded_stream(raw, decode), context)
            except _Undecodable as error:
                await invalid(context, method, str(error))

        return grpc.stream_stream_rpc_method_handler(stream_stream_call, None, serializer)
