"""Prometheus metrics and plaintext health of every service, scraped during a real federation run."""

from __future__ import annotations

import asyncio
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from fedprint.booking.v1 import booking_pb2 as bk
from fedprint.metrics import split_listen
from fedprint.rpc import ServiceHost
from nodes.gallery.metrics import score_buckets
from synthetic.population import Population
from tests.conftest import Federation
from tests.waiting import eventually

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(host: ServiceHost) -> Samples:
    """Every sample of the service's /metrics page, by name and labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{host.metrics.port}/metrics", timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name`` over the samples carrying ``labels`` (0 when there are none)."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


async def test_every_service_serves_metrics_and_the_counters_move(
    federation: Federation, population: Population
) -> None:
    hosts = {
        "coordinator": federation.coordinator.host,
        "iafis": federation.iafis.host,
        "ident": federation.ident.host,
        "ice": federation.ice.host,
    }
    before = {name: await asyncio.to_thread(scrape, host) for name, host in hosts.items()}
    assert value(before["iafis"], "fedprint_gallery_subjects", node="iafis") == len(population.iafis)
    assert value(before["ident"], "fedprint_gallery_subjects", node="ident") == len(population.ident)
    assert value(before["iafis"], "process_resident_memory_bytes") > 0

    notifying = next(b for b in population.bookings if b.truth.expect_notification)
    stub = federation.booking_stub(notifying.booking.ori)
    decision = await stub.SubmitBooking(notifying.booking, timeout=30)
    assert decision.notification == bk.QUEUED
    await federation.wait_for_notifications(1)
    bad = bk.Booking()
    bad.CopyFrom(notifying.booking)
    bad.tcn = ""
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.SubmitBooking(bad, timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # The outbox marks the delivery just after ICE acknowledges it.
    store = federation.coordinator.coordinator.store
    await eventually(lambda: store.stats().outbox_pending == 0, what="the outbox emptied")
    after = {name: await asyncio.to_thread(scrape, host) for name, host in hosts.items()}

    def moved(service: str, name: str, **labels: str) -> float:
        return value(after[service], name, **labels) - value(before[service], name, **labels)

    submit = {"grpc_service": "fedprint.booking.v1.BookingService", "grpc_method": "SubmitBooking"}
    assert moved("coordinator", "grpc_server_handled_total", **submit, grpc_code="OK") == 1
    assert moved("coordinator", "grpc_server_handled_total", **submit, grpc_code="INVALID_ARGUMENT") == 1
    assert moved("coordinator", "grpc_server_started_total", **submit) == 2
    assert moved("coordinator", "grpc_server_handling_seconds_count", **submit) == 2
    assert value(after["coordinator"], "fedprint_coordinator_decisions") == 1
    assert value(after["coordinator"], "fedprint_coordinator_outbox_pending") == 0
    assert value(after["coordinator"], "fedprint_coordinator_outbox_oldest_pending_age_seconds") == 0
    assert value(after["coordinator"], "fedprint_coordinator_dead_letters") == 0
    for node in ("iafis", "ident"):
        identify = {"grpc_method": "Identify", "grpc_code": "OK"}
        assert moved(node, "grpc_server_handled_total", **identify) == 1
        assert moved(node, "fedprint_gallery_batch_size_count", node=node) == 1
        assert moved(node, "fedprint_gallery_batch_size_sum", node=node) == 1
        assert moved(node, "fedprint_gallery_top_score_count", node=node) == 1
        assert moved(node, "fedprint_gallery_probe_decisions_total", node=node) == 1
        assert value(after[node], "fedprint_gallery_queue_depth", node=node) == 0
    assert moved("ident", "fedprint_gallery_probe_decisions_total", node="ident", band="HIT") == 1
    assert moved("ice", "grpc_server_handled_total", grpc_method="Notify", grpc_code="OK") >= 1
    # No identity reaches a label: not the TCN, ORI or any subject id.
    matched = federation.kept(notifying.booking).ident.candidates[0].subject_id
    identities = {notifying.booking.tcn, notifying.booking.ori, matched}
    for samples in after.values():
        for _, labels in samples:
            assert not identities & {v for _, v in labels}


async def test_plaintext_health_port_reports_what_the_mtls_server_reports(federation: Federation) -> None:
    for host in (federation.coordinator.host, federation.iafis.host, federation.ice.host):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{host.health_port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for service in ["", *host._names]:
                response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                assert response.status == health_pb2.HealthCheckResponse.SERVING
            # It carries the health service only: the API stays behind mTLS.
            unknown = channel.unary_unary("/fedprint.booking.v1.BookingService/GetDecision")
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await unknown(b"", timeout=5)
            assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_score_buckets_have_the_thresholds_as_edges() -> None:
    buckets = score_buckets(review=0.0152, hit=0.0155)
    assert 0.0152 in buckets and 0.0155 in buckets
    assert list(buckets) == sorted(set(buckets)) and buckets[-1] == 1.0


def test_listen_addresses_parse() -> None:
    assert split_listen("0.0.0.0:9090") == ("0.0.0.0", 9090)
    assert split_listen("[::]:9090") == ("::", 9090)
    with pytest.raises(ValueError, match="host:port"):
        split_listen("9090")
