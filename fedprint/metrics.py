"""Prometheus metrics of one service: its gRPC calls, its process, and what the service adds.

Every :class:`~fedprint.rpc.ServiceHost` owns a :class:`ServiceMetrics` with a registry of its own
(several services may share a process, as in the tests). A gRPC interceptor counts and times
every call by service, method and status code under the names operators' dashboards already
know from other gRPC servers (``grpc_server_started_total``, ``grpc_server_handled_total``,
``grpc_server_handling_seconds``). With ``metrics_listen`` set, the registry is served over
HTTP at ``/metrics``. Labels never carry identities: no TCN, ORI, subject id or score of a
named person.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)

__all__ = ["RpcMetricsInterceptor", "ServiceMetrics", "split_listen"]

#: Latency buckets (seconds) from a health check (sub-millisecond) to a slow gallery search.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

_RPC_LABELS = ["grpc_service", "grpc_method", "grpc_type"]


def split_listen(listen: str) -> tuple[str, int]:
    """``host:port`` (IPv6 in brackets) as (host, port)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{listen!r} is not host:port")
    return host.strip("[]") or "0.0.0.0", int(port)


class ServiceMetrics:
    """The metrics registry of one service, and its ``/metrics`` HTTP endpoint."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.started = Counter(
            "grpc_server_started_total", "gRPC calls started", _RPC_LABELS, registry=self.registry
        )
        self.handled = Counter(
            "grpc_server_handled_total",
            "gRPC calls finished, by status code",
            [*_RPC_LABELS, "grpc_code"],
            registry=self.registry,
        )
        self.handling = Histogram(
            "grpc_server_handling_seconds",
            "time from a call's start to its status, by status code",
            [*_RPC_LABELS, "grpc_code"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._http: WSGIServer | None = None
        self.port = 0

    def interceptor(self) -> RpcMetricsInterceptor:
        """A server interceptor recording every call into this registry."""
        return RpcMetricsInterceptor(self)

    def serve(self, listen: str) -> int:
        """Serves ``/metrics`` on ``listen`` (``host:port``, port 0 picks one) in a daemon thread;
        returns the bound port."""
        host, port = split_listen(listen)
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        self.port = int(self._http.server_port)
        return self.port

    def stop(self) -> None:
        """Stops the HTTP endpoint (if serving)."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


def _split_method(full: str) -> tuple[str, str]:
    """``/fedprint.gallery.v1.GalleryService/Identify`` -> (service, method)."""
    service, _, method = full.lstrip("/").rpartition("/")
    return service or "unknown", method or "unknown"


def _code_after(context: grpc.aio.ServicerContext[Any, Any], error: BaseException | None) -> str:
    """The status a call ended with: the code the handler set or aborted with; else OK when it
    returned, CANCELLED when it was cancelled, UNKNOWN when it raised (what gRPC sends then)."""
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if error is None:
        return "OK"
    return "CANCELLED" if isinstance(error, asyncio.CancelledError) else "UNKNOWN"


if TYPE_CHECKING:  # generic in the type stubs only
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _ServerInterceptor = grpc.aio.ServerInterceptor


class RpcMetricsInterceptor(_ServerInterceptor):
    """Counts and times every call of a ``grpc.aio`` server, by method and status code."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self.metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler: grpc.RpcMethodHandler[Any, Any] | None = await continuation(handler_call_details)
        if handler is None:  # an unknown method: gRPC answers UNIMPLEMENTED itself
            return handler  # type: ignore[return-value]
        service, method = _split_method(handler_call_details.method)
        kind = (
            ("bidi_stream" if handler.response_streaming else "client_stream")
            if handler.request_streaming
            else ("server_stream" if handler.response_streaming else "unary")
        )
        labels = (service, method, kind)
        behavior: Any = (
            handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
        )
        metrics = self.metrics

        def finish(
            context: grpc.aio.ServicerContext[Any, Any], started: float, error: BaseException | None
        ) -> None:
            code = _code_after(context, error)
            metrics.handled.labels(*labels, code).inc()
            metrics.handling.labels(*labels, code).observe(time.perf_counter() - started)

        if inspect.isasyncgenfunction(behavior):

            async def streaming(
                request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                metrics.started.labels(*labels).inc()
                started = time.perf_counter()
                try:
                    async for response in behavior(request, context):
                        yield response
                except BaseException as error:
                    finish(context, started, error)
                    raise
                finish(context, started, None)

            wrapped: Any = streaming
        else:

            async def single(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                metrics.started.labels(*labels).inc()
                started = time.perf_counter()
                try:
                    result = behavior(request, context)
                    if inspect.isawaitable(result):
                        result = await result
                except BaseException as error:
                    finish(context, started, error)
                    raise
                finish(context, started, None)
                return result

            wrapped = single
        factory = {
            "unary": grpc.unary_unary_rpc_method_handler,
            "server_stream": grpc.unary_stream_rpc_method_handler,
            "client_stream": grpc.stream_unary_rpc_method_handler,
            "bidi_stream": grpc.stream_stream_rpc_method_handler,
        }[kind]
        return factory(
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
