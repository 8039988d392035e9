"""OpenTelemetry traces across the services: one trace per booking, from the coordinator's
``SubmitBooking`` through its ``Identify`` calls to the gallery nodes (and, with sharding, on to
the shards), carried between processes in W3C ``traceparent`` gRPC metadata.

:func:`configure` (once per process, by the launcher from the service's ``tracing`` settings)
chooses the exporter; from then on every :class:`~fedprint.rpc.ServiceHost` built in the process
gets a server interceptor (``opentelemetry-instrumentation-grpc``), every channel from
:func:`~fedprint.rpc.open_channel` client interceptors, and a server span whose request carries a
TCN gets it as the attribute ``fedprint.tcn``. Spans carry method names, status codes, peers and
TCNs: never templates, records or scores. Without :func:`configure`, nothing is traced and
nothing is added to a call.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Literal

import grpc
from opentelemetry import trace
from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from pydantic import BaseModel, Field

__all__ = [
    "TCN_ATTRIBUTE",
    "TracingSettings",
    "client_interceptors",
    "configure",
    "reset",
    "server_interceptors",
]

TCN_ATTRIBUTE = "fedprint.tcn"


class TracingSettings(BaseModel):
    """Where a service sends its spans (the ``tracing:`` section of its config; off when absent)."""

    exporter: Literal["otlp", "console"] = Field(
        default="otlp", description="otlp: OTLP over gRPC to `endpoint`; console: JSON lines on stdout"
    )
    endpoint: str | None = Field(
        default=None,
        description="OTLP collector, e.g. http://otel-collector:4317; OTEL_EXPORTER_OTLP_ENDPOINT if unset",
    )
    insecure: bool = Field(default=False, description="plaintext to the collector (no TLS)")
    sample_ratio: float = Field(
        default=1.0, ge=0.0, le=1.0, description="share of new traces kept; a caller's decision is followed"
    )


_provider: TracerProvider | None = None


def configure(
    service: str, settings: TracingSettings | None, *, exporter: SpanExporter | None = None
) -> TracerProvider | None:
    """Starts tracing for this process as ``service`` (or leaves it off when ``settings`` is None
    and no ``exporter`` is given; tests pass their own exporter)."""
    global _provider
    reset()
    if settings is None and exporter is None:
        return None
    settings = settings or TracingSettings()
    if exporter is None:
        if settings.exporter == "console":
            exporter = ConsoleSpanExporter(service_name=service)
        else:
            # Imported here: the OTLP exporter is only loaded where it is used.
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter(endpoint=settings.endpoint, insecure=settings.insecure)
    provider = TracerProvider(
        resource=Resource.create({"service.name": f"fedprint-{service}", "service.namespace": "fedprint"}),
        sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)),
    )
    provider.add_span_processor(BatchSpanProcessor(exporter))
    _provider = provider
    return provider


def reset() -> None:
    """Flushes and stops tracing (services built afterwards are not traced)."""
    global _provider
    if _provider is not None:
        _provider.shutdown()
        _provider = None


def server_interceptors() -> list[Any]:
    """Interceptors a traced server adds around everything else (none when tracing is off): the
    call's span, so that refused calls are traced too."""
    if _provider is None:
        return []
    return [aio_server_interceptor(tracer_provider=_provider)]  # type: ignore[no-untyped-call]


def request_interceptors() -> list[Any]:
    """Interceptors a traced server adds innermost, where requests arrive decoded (after the
    access check, which decodes only admitted calls): the TCN on the call's span."""
    if _provider is None:
        return []
    return [_TcnAttribute()]


def client_interceptors() -> list[Any]:
    """Interceptors a traced channel adds (none when tracing is off)."""
    if _provider is None:
        return []
    return list(aio_client_interceptors(tracer_provider=_provider))  # type: ignore[no-untyped-call]


if TYPE_CHECKING:  # generic in the type stubs only
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _ServerInterceptor = grpc.aio.ServerInterceptor


class _TcnAttribute(_ServerInterceptor):
    """Puts the TCN of a unary request that has one (``Booking``, ``GetDecisionRequest``,
    ``Notification``) on the call's server span, so a booking's trace is found by its TCN."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler: grpc.RpcMethodHandler[Any, Any] | None = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler  # type: ignore[return-value]  # no streaming request carries a TCN
        behavior: Any = handler.unary_unary

        async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            tcn = getattr(request, "tcn", None)
            if isinstance(tcn, str) and tcn:
                trace.get_current_span().set_attribute(TCN_ATTRIBUTE, tcn)
            result = behavior(request, context)
            return await result if inspect.isawaitable(result) else result

        return grpc.unary_unary_rpc_method_handler(
            unary,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
