"""OpenTelemetry traces: one booking is one trace, from the coordinator through both nodes,
found by its TCN, and carrying no biometric data or records."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from fedprint import tracing
from fedprint.booking.v1 import booking_pb2 as bk
from fedprint.logging import add_trace_context
from synthetic.population import Population
from tests.conftest import Federation


@pytest.fixture
def spans() -> Iterator[tuple[InMemorySpanExporter, TracerProvider]]:
    """Tracing on for this process, into memory (requested before `federation`, which it must
    precede: servers and channels take their interceptors when they are built)."""
    exporter = InMemorySpanExporter()
    provider = tracing.configure("test", None, exporter=exporter)
    assert provider is not None
    yield exporter, provider
    tracing.reset()


async def test_a_booking_is_one_trace_through_the_coordinator_and_both_nodes(
    spans: tuple[InMemorySpanExporter, TracerProvider], federation: Federation, population: Population
) -> None:
    exporter, provider = spans
    sample = next(b for b in population.bookings if b.truth.iafis_subject_id and b.truth.ident_subject_id)
    decision = await federation.booking_stub(sample.booking.ori).SubmitBooking(sample.booking, timeout=30)
    assert decision.status == bk.COMPLETE
    provider.force_flush()
    finished = exporter.get_finished_spans()
    (submit,) = [
        s
        for s in finished
        if s.name == "/fedprint.booking.v1.BookingService/SubmitBooking" and s.kind == SpanKind.SERVER
    ]
    assert submit.attributes is not None and submit.attributes[tracing.TCN_ATTRIBUTE] == sample.booking.tcn
    trace_id = submit.context.trace_id
    in_trace = [s for s in finished if s.context.trace_id == trace_id]
    identify_servers = [
        s
        for s in in_trace
        if s.name == "/fedprint.gallery.v1.GalleryService/Identify" and s.kind == SpanKind.SERVER
    ]
    identify_clients = [s for s in in_trace if s.name.endswith("/Identify") and s.kind == SpanKind.CLIENT]
    assert len(identify_servers) == len(identify_clients) == 2  # IAFIS and IDENT, at once
    for server in identify_servers:
        assert server.parent is not None
        assert server.parent.span_id in {c.context.span_id for c in identify_clients}
    for client in identify_clients:
        assert client.parent is not None and client.parent.span_id == submit.context.span_id
    # Nothing of a person: no subject id, name or template in any attribute.
    kept = federation.kept(sample.booking)
    matched = {kept.iafis.candidates[0].subject_id, kept.ident.candidates[0].subject_id}
    for s in in_trace:
        values = {str(v) for v in (s.attributes or {}).values()}
        assert not matched & values
        assert not any(len(v) > 200 for v in values)


def test_log_lines_carry_the_trace_they_belong_to() -> None:
    tracer = TracerProvider().get_tracer("test")
    assert "trace_id" not in add_trace_context(None, "info", {"event": "outside"})
    with tracer.start_as_current_span("inside") as span:
        event = add_trace_context(None, "info", {"event": "inside"})
    assert event["trace_id"] == format(span.get_span_context().trace_id, "032x")
    assert event["span_id"] == format(span.get_span_context().span_id, "016x")
    assert trace.get_current_span().get_span_context().is_valid is False


def test_tracing_is_off_unless_configured() -> None:
    tracing.reset()
    assert tracing.server_interceptors() == [] and tracing.client_interceptors() == []
    assert tracing.configure("ice", None) is None
