"""What every fedprint gRPC server and client shares: hosting with health and
reflection, mutual TLS with certificates reloaded when their files change, access control
(:mod:`fedprint.access`), graceful shutdown, errors with ``google.rpc`` details, and channels.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

import grpc
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from google.protobuf import any_pb2
from google.protobuf.descriptor import ServiceDescriptor
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status

from fedprint import tracing
from fedprint.access import AccessInterceptor, AccessPolicy, DenialLedger
from fedprint.metrics import ServiceMetrics
from fedprint.pki import RevocationList, TlsFiles, service_host
from fedprint.validation import MAX_VIOLATIONS, FieldViolation, Violations

__all__ = [
    "IDEMPOTENT_METHODS",
    "MAX_MESSAGE_BYTES",
    "FieldViolation",
    "InsecureNotAllowed",
    "InvalidRequest",
    "ServiceHost",
    "abort_invalid",
    "bad_request_status",
    "exhausted_status",
    "field_violations",
    "open_channel",
    "service",
]

log = structlog.get_logger(__name__)

# Largest message a server accepts: a ten-print of templates is a few KB, a batch of
# probes or a ten-print of WSQ images a few MB. Larger requests get RESOURCE_EXHAUSTED.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
_SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


class InsecureNotAllowed(ValueError):
    """Plaintext was asked for (no TLS files) without saying ``insecure``."""

    def __init__(self, what: str) -> None:
        super().__init__(
            f"{what} has no TLS files (tls: ca, cert, key from `fedprint certs`); plaintext is only "
            "for local debugging and needs `insecure: true` in the config or --insecure"
        )


class InvalidRequest(ValueError):
    """A request failed validation; carries the field violations for the client (the first
    :data:`~fedprint.validation.MAX_VIOLATIONS`, then how many more)."""

    def __init__(
        self, violations: Sequence[FieldViolation] | Violations, message: str = "invalid request"
    ) -> None:
        if not isinstance(violations, Violations):
            collected = Violations()
            collected.extend(violations)
            violations = collected
        self.violations = violations.reported()
        shown = self.violations[: min(len(self.violations), MAX_VIOLATIONS)]
        super().__init__(f"{message}: " + "; ".join(f"{v.field}: {v.description}" for v in shown))
        self.message = message


def bad_request_status(error: InvalidRequest) -> grpc.Status:
    """An INVALID_ARGUMENT status carrying a ``google.rpc.BadRequest`` with every violation."""
    detail = any_pb2.Any()
    detail.Pack(
        error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in error.violations
            ]
        )
    )
    return rpc_status.to_status(
        status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=str(error), details=[detail])
    )


def exhausted_status(message: str, *, subject: str, description: str, retry_after_s: float) -> grpc.Status:
    """A RESOURCE_EXHAUSTED status carrying ``google.rpc.QuotaFailure`` (which limit: ``subject``,
    ``description``) and ``google.rpc.RetryInfo`` (when trying again may succeed; read it with
    :func:`fedprint.access.retry_delay`)."""
    quota, retry = any_pb2.Any(), any_pb2.Any()
    violation = error_details_pb2.QuotaFailure.Violation(subject=subject, description=description)
    quota.Pack(error_details_pb2.QuotaFailure(violations=[violation]))
    delay = error_details_pb2.RetryInfo()
    delay.retry_delay.FromNanoseconds(int(retry_after_s * 1e9))
    retry.Pack(delay)
    return rpc_status.to_status(
        status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message=message, details=[quota, retry])
    )


async def abort_invalid(context: grpc.aio.ServicerContext[Any, Any], error: InvalidRequest) -> NoReturn:
    """Ends the call with INVALID_ARGUMENT and field details; logs only field names."""
    log.warning("request rejected", fields=[v.field for v in error.violations])
    await context.abort_with_status(bad_request_status(error))  # type: ignore[attr-defined]
    raise AssertionError("abort_with_status returned")  # pragma: no cover


def field_violations(error: grpc.aio.AioRpcError | grpc.RpcError) -> list[FieldViolation]:
    """The ``BadRequest`` field violations of a failed call (empty when there are none)."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    found: list[FieldViolation] = []
    for detail in status.details if status is not None else []:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            found.extend(FieldViolation(v.field, v.description) for v in bad.field_violations)
    return found


Registrar = Callable[[grpc.aio.Server], None]


def service(
    descriptor: ServiceDescriptor, add_servicer: Callable[[Any, grpc.aio.Server], None], servicer: object
) -> tuple[str, Registrar]:
    """The (full name, registrar) pair :class:`ServiceHost` takes for one generated service."""
    return descriptor.full_name, lambda server: add_servicer(servicer, server)


class _CertificateReloader:
    """Serves a server's certificate, key and CA, re-read when their files change.

    gRPC calls :meth:`fetch` before each TLS handshake (``dynamic_ssl_server_credentials``); it
    answers None (keep the current configuration) unless a file's size, modification time or inode
    changed and the new certificate and key belong together, so a renewal written in two steps is
    picked up once both files are in place.
    """

    def __init__(self, tls: TlsFiles) -> None:
        self.tls = tls
        self._lock = threading.Lock()
        self._seen = self._signature()
        self.reloads = 0
        self.initial = self._configuration(*self._read())

    def _signature(self) -> tuple[tuple[int, int, int], ...]:
        stats = [os.stat(p) for p in (self.tls.ca, self.tls.cert, self.tls.key)]
        return tuple((s.st_mtime_ns, s.st_size, s.st_ino) for s in stats)

    def _read(self) -> tuple[bytes, bytes, bytes]:
        ca, cert, key = (p.read_bytes() for p in (self.tls.ca, self.tls.cert, self.tls.key))
        certificate = x509.load_pem_x509_certificate(cert)
        private = serialization.load_pem_private_key(key, password=None)
        public = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        if certificate.public_key().public_bytes(*public) != private.public_key().public_bytes(*public):
            raise ValueError(f"{self.tls.key} is not the key of {self.tls.cert}")
        x509.load_pem_x509_certificates(ca)
        return ca, cert, key

    @staticmethod
    def _configuration(ca: bytes, cert: bytes, key: bytes) -> Any:
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def fetch(self) -> Any:
        with self._lock:
            try:
                signature = self._signature()
                if signature == self._seen:
                    return None
                files = self._read()
            except (OSError, ValueError) as error:
                # Half-written or mismatched files: keep serving with what we have, try again later.
                log.warning("certificate files not reloaded", cert=str(self.tls.cert), error=str(error))
                return None
            self._seen = signature
            self.reloads += 1
        log.info("certificates reloaded", cert=str(self.tls.cert), ca=str(self.tls.ca))
        return self._configuration(*files)


class ServiceHost:
    """A ``grpc.aio`` server with health checking and reflection for the given services, speaking
    mutual TLS (every client shows a certificate from the federation's CA) and admitting each
    call by the caller's role (:class:`fedprint.access.AccessInterceptor`).

    Without ``tls`` it refuses to exist unless ``insecure`` is set; a plaintext server then warns
    at every start and admits every caller. ``services`` pairs each full service name with the
    function that adds its servicer. Health reports SERVING from :meth:`start` until :meth:`stop`.

    Every call is counted and timed in :attr:`metrics` (the service adds its own metrics to
    ``metrics.registry``), served over HTTP at ``/metrics`` when ``metrics_listen`` is given, and
    traced when the process traces (:mod:`fedprint.tracing`).
    ``health_listen`` opens a second, plaintext gRPC server carrying only the health service, with
    the same statuses: Kubernetes' gRPC probes speak no TLS, and it reveals nothing but them.
    """

    def __init__(
        self,
        listen: str,
        services: Sequence[tuple[str, Registrar]],
        tls: TlsFiles | None,
        *,
        insecure: bool = False,
        access: AccessPolicy | None = None,
        denials: DenialLedger | None = None,
        metrics_listen: str | None = None,
        health_listen: str | None = None,
    ) -> None:
        if tls is None and not insecure:
            raise InsecureNotAllowed(f"the server for {', '.join(name for name, _ in services)}")
        self.listen = listen
        self.tls = tls
        self.access = access or AccessPolicy()
        if denials is not None:  # the service's configured budget of refused calls
            self.access.denials = denials
        self.access.authenticate = tls is not None
        if tls is not None and tls.crl is not None and self.access.revocation is None:
            # Callers are checked against the CA's revocation list before the access table.
            self.access.revocation = RevocationList(tls.crl, tls.ca)
        self._reloader = _CertificateReloader(tls) if tls is not None else None
        self.metrics = ServiceMetrics()
        self.metrics_listen = metrics_listen
        self.health_listen = health_listen
        self.health_port = 0
        # Metrics and the trace span outermost, so that refused calls are counted and traced
        # too; then access, which decodes only admitted calls; then what reads the request.
        self._server = grpc.aio.server(
            options=_SERVER_OPTIONS,
            interceptors=[
                self.metrics.interceptor(),
                *tracing.server_interceptors(),
                AccessInterceptor(self.access),
                *tracing.request_interceptors(),
            ],
        )
        self._health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self._health_server: grpc.aio.Server | None = None
        if health_listen is not None:
            self._health_server = grpc.aio.server()
            health_pb2_grpc.add_HealthServicer_to_server(self._health, self._health_server)
        self._names = [name for name, _ in services]
        for _, register in services:
            register(self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection(
            [*self._names, health.SERVICE_NAME, reflection.SERVICE_NAME], self._server
        )
        self.port = 0

    @property
    def certificate_reloads(self) -> int:
        """How often the TLS files were re-read since start-up."""
        return self._reloader.reloads if self._reloader is not None else 0

    async def start(self) -> int:
        """Binds and starts serving; returns the bound port (useful with port 0)."""
        if self._reloader is None:
            log.warning(
                "PLAINTEXT: serving without TLS and without checking who calls (insecure mode, "
                "for local debugging only)",
                listen=self.listen,
                services=self._names,
            )
            self.port = self._server.add_insecure_port(self.listen)
        else:
            # mTLS: clients must present a certificate signed by the CA; the files are re-read when
            # they change (certificate renewal without a restart).
            credentials = grpc.dynamic_ssl_server_credentials(
                self._reloader.initial, self._reloader.fetch, require_client_authentication=True
            )
            self.port = self._server.add_secure_port(self.listen, credentials)
        if self.port == 0:
            raise OSError(f"could not bind {self.listen}")
        if self._health_server is not None and self.health_listen is not None:
            self.health_port = self._health_server.add_insecure_port(self.health_listen)
            if self.health_port == 0:
                raise OSError(f"could not bind {self.health_listen}")
            await self._health_server.start()
        if self.metrics_listen is not None:
            self.metrics.serve(self.metrics_listen)
        await self._server.start()
        for name in ["", *self._names]:
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return self.port

    @property
    def address(self) -> str:
        host = self.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    async def stop(self, grace_s: float = 5.0) -> None:
        """Reports NOT_SERVING, lets in-flight calls finish for ``grace_s``, then stops."""
        await self._health.enter_graceful_shutdown()
        await self._server.stop(grace_s)
        await self.access.close()  # repeated denials still counted are audited, not lost
        if self._health_server is not None:
            await self._health_server.stop(0)
        self.metrics.stop()

    async def wait(self) -> None:
        await self._server.wait_for_termination()


# Calls that may simply be made again when they fail UNAVAILABLE: reads, and writes that are
# idempotent by key (a booking by its TCN, a notice by its TCN, an enrolment replaces the
# subject's earlier one, a removal of a removed subject removes nothing). A claim or a verdict
# on a review is not among them: the caller decides whether to repeat it.
IDEMPOTENT_METHODS: dict[str, tuple[str, ...]] = {
    "fedprint.gallery.v1.GalleryService": ("Identify", "Enroll", "Remove", "GetStats", "GetSubject"),
    "fedprint.booking.v1.BookingService": ("SubmitBooking", "GetDecision", "WatchDecisions", "GetStats"),
    "fedprint.ice.v1.IceNotificationService": ("Notify", "ListNotifications"),
    "fedprint.review.v1.ReviewService": ("ListReviews",),
}

# gRPC's own retry (the channel's service config), on the channels of callers that have no retry
# of their own (the command line, the demo, the tests): a call that fails UNAVAILABLE (a peer
# restarting, a connection cut) is made again after a short backoff, within the caller's deadline.
_RETRY_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [
                    {"service": name, "method": method}
                    for name, methods in IDEMPOTENT_METHODS.items()
                    for method in methods
                ],
                "retryPolicy": {
                    # gRPC waits a random time up to the backoff: these spread five attempts
                    # over a few seconds, past a restarting peer's own reconnect backoff.
                    "maxAttempts": 5,
                    "initialBackoff": "0.5s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)

# A peer that restarts should be reachable again within about a second, not after gRPC's default
# reconnect backoff (up to two minutes). Only the backoff between attempts is shortened, never
# the time one attempt may take: gRPC reads "grpc.min_reconnect_backoff_ms" as the connection
# attempt's deadline (20 s by default), and set to 200 ms it cut short every mutual-TLS handshake
# that a loaded machine took longer than that over ("Handshake read failed (Endpoint closing)",
# UNAVAILABLE on a server that was ready).
_CHANNEL_OPTIONS = [
    *_SERVER_OPTIONS,
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]
_RETRYING_OPTIONS = [
    *_CHANNEL_OPTIONS,
    ("grpc.enable_retries", 1),
    ("grpc.service_config", _RETRY_SERVICE_CONFIG),
]


if TYPE_CHECKING:
    _UnaryUnaryClientInterceptor = grpc.aio.UnaryUnaryClientInterceptor[Any, Any]
else:  # generic only in the type stubs
    _UnaryUnaryClientInterceptor = grpc.aio.UnaryUnaryClientInterceptor


class _NamesExpectedService(_UnaryUnaryClientInterceptor):
    """Says, in a call's error, which service a handshake expected when the server's certificate was
    not that service's: gRPC's own words ("Hostname Verification Check failed") name neither, and
    the coordinator keeps the error in an incomplete decision for an operator to act on."""

    def __init__(self, address: str, server: str) -> None:
        self.note = (
            f"the server at {address} showed no certificate of the {server} service "
            f"({service_host(server)}): another service's certificate, or the wrong address"
        )

    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        call = await continuation(client_call_details, request)
        try:
            await call
        except grpc.aio.AioRpcError as error:
            details = error.details() or ""
            if error.code() != grpc.StatusCode.UNAVAILABLE or "Verification" not in details:
                raise
            raise grpc.aio.AioRpcError(  # no metadata: a call whose handshake failed received none
                error.code(),
                grpc.aio.Metadata(),
                grpc.aio.Metadata(),
                f"{self.note}; {details}",
                error.debug_error_string(),
            ) from error
        return call


def open_channel(
    address: str,
    tls: TlsFiles | None,
    *,
    server: str | None = None,
    insecure: bool = False,
    balanced: bool = False,
    retries: bool = True,
) -> grpc.aio.Channel:
    """A client channel: mutual TLS with ``tls`` (the server's certificate is verified against its
    CA), the servers' message-size limits, and a short reconnect backoff. Plaintext only when
    ``tls`` is None and ``insecure`` is set. ``balanced``: spread calls round robin over every
    address the name resolves to (a headless Service's ready pods: the replicas of a shard).

    ``server``: the service expected at ``address`` (``coordinator``, ``iafis``, ``ident``, ``ice``).
    The handshake then verifies the server's certificate against that service's name
    (:func:`fedprint.pki.service_host`) instead of the address's host, so another service's
    certificate from the same CA fails it (UNAVAILABLE; a unary call's error names the service
    expected). Without it only the host name is checked. Ignored in plaintext.

    ``retries``: idempotent calls (:data:`IDEMPOTENT_METHODS`) that fail UNAVAILABLE are made again
    by gRPC. A service calling another service turns this off: it already handles a peer that did
    not answer (a partial answer, an incomplete decision retried durably), and retrying at every
    layer of coordinator -> router -> shard would multiply one outage's wait past every deadline."""
    interceptors = tracing.client_interceptors()  # none unless the process traces
    options = _RETRYING_OPTIONS if retries else _CHANNEL_OPTIONS
    if balanced:
        options = [*options, ("grpc.lb_policy_name", "round_robin")]
    if tls is None:
        if not insecure:
            raise InsecureNotAllowed(f"a channel to {address}")
        return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
    if server is not None:
        options = [*options, ("grpc.ssl_target_name_override", service_host(server))]
        interceptors = [*interceptors, _NamesExpectedService(address, server)]
    credentials = grpc.ssl_channel_credentials(
        root_certificates=tls.ca.read_bytes(),
        private_key=tls.key.read_bytes(),
        certificate_chain=tls.cert.read_bytes(),
    )
    return grpc.aio.secure_channel(address, credentials, options=options, interceptors=interceptors)
