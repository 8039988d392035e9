"""Need to know, enforced on certificates: a client refuses a server whose certificate is another
service's; a revoked certificate is refused from the next call on, with no restart; refused calls
have a budget per caller, and their repeats are one audit entry, not one row each."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from typer.testing import CliRunner

from cli.app import app
from federation.config import CoordinatorConfig
from federation.coordinator import CoordinatorService, build_coordinator
from fedprint.access import OVER_BUDGET, DenialLedger, retry_delay
from fedprint.booking.v1 import booking_pb2 as bk
from fedprint.booking.v1 import booking_pb2_grpc as bk_grpc
from fedprint.ice.v1 import ice_pb2 as ice
from fedprint.ice.v1 import ice_pb2_grpc as ice_grpc
from fedprint.pki import DevCa, Role, TlsFiles, agency_name, identity_of, issue_dev_pki, service_host
from fedprint.rpc import open_channel
from ice_service import build_ice
from ice_service.config import IceConfig
from synthetic.population import Population
from tests.conftest import Federation, key
from tests.test_federation_e2e import pick, with_tcn
from tests.waiting import eventually, eventually_awaited

ORI = "XX0010000"
GET_STATS = "/fedprint.booking.v1.BookingService/GetStats"


def identify_calls(service: object) -> float:
    """How many Identify calls reached a gallery node's server (its own call counter)."""
    registry = service.host.metrics.registry  # type: ignore[attr-defined]
    value = registry.get_sample_value(
        "grpc_server_started_total",
        {
            "grpc_service": "fedprint.gallery.v1.GalleryService",
            "grpc_method": "Identify",
            "grpc_type": "unary",
        },
    )
    return float(value or 0.0)


async def test_a_coordinator_refuses_a_node_address_answered_with_another_services_certificate(
    federation: Federation, population: Population
) -> None:
    # The coordinator is told IAFIS is where IDENT runs: a real gallery node, with a certificate
    # from the same CA, but IDENT's. Before, the handshake checked the CA and the host name only,
    # and IAFIS searches went to IDENT.
    config = federation.coordinator_config.model_copy(
        update={"iafis_address": federation.ident.host.address, "data_dir": federation.root / "misled"}
    )
    misled = build_coordinator(config)
    await misled.start()
    try:
        searched_before = identify_calls(federation.ident)
        sample = pick(population, iafis=True, ident=True)
        booking = with_tcn(sample.booking, "TCN-IMPOSTOR-1")
        async with open_channel(
            misled.host.address, federation.pki[agency_name(booking.ori)], server="coordinator"
        ) as channel:
            await bk_grpc.BookingServiceStub(channel).SubmitBooking(booking, timeout=60)
        kept = misled.coordinator.store.decision(key(booking))
        assert kept is not None and kept.status == bk.INCOMPLETE
        assert kept.iafis.outcome == bk.UNAVAILABLE
        assert "the iafis service (iafis.fedprint)" in kept.iafis.error, kept.iafis.error  # names it
        assert kept.ident.outcome == bk.ANSWERED  # the real IDENT, at its own address, answered
        # IDENT counted the coordinator's one IDENT search, and no IAFIS search.
        assert identify_calls(federation.ident) == searched_before + 1
    finally:
        await misled.stop(0)


@pytest.mark.parametrize(
    ("expected", "impostor"), [("iafis", "ident"), ("iafis", "ice"), ("ice", "iafis"), ("coordinator", "ice")]
)
async def test_each_client_accepts_only_the_service_it_expects(
    tmp_path: Path, pki: dict[str, TlsFiles], expected: str, impostor: str
) -> None:
    # A real server (ICE's service) started with the impostor's certificate: what a leaked key or
    # a wrong address would put in the client's way.
    server = build_ice(IceConfig(data_dir=tmp_path / "ice", tls=pki[impostor]))
    await server.host.start()
    try:
        async with open_channel(
            server.host.address, pki["coordinator"], server=expected, retries=False
        ) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await ice_grpc.IceNotificationServiceStub(ch).Notify(
                    ice.Notification(tcn="TCN-NOTICE-1", ori=ORI, level=1), timeout=10
                )
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert service_host(expected) in (caught.value.details() or "")
        # Nothing reached it: its queue is empty (read without the service check, as ICE).
        async with open_channel(server.host.address, pki["ice"]) as ch:
            listed = await ice_grpc.IceNotificationServiceStub(ch).ListNotifications(
                ice.ListNotificationsRequest(), timeout=10
            )
        assert list(listed.notifications) == []
    finally:
        await server.stop(0)
    # The right certificate passes the same check.
    right = build_ice(IceConfig(data_dir=tmp_path / "right", tls=pki[expected]))
    await right.host.start()
    try:
        async with open_channel(right.host.address, pki["admin"], server=expected) as ch:
            from grpc_health.v1 import health_pb2, health_pb2_grpc

            answer = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await right.stop(0)


def test_service_certificates_name_their_service_and_their_own_hosts_only(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["certs", str(tmp_path), "--host", "localhost", "--host", "iafis=iafis.example", "--ori", ORI]
    )
    assert result.exit_code == 0, result.output

    def dns_names(name: str) -> list[str]:
        from cryptography import x509

        cert = x509.load_pem_x509_certificate((tmp_path / f"{name}.pem").read_bytes())
        try:
            alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            return []
        return list(alt.get_values_for_type(x509.DNSName))

    assert dns_names("iafis") == ["iafis.fedprint", "localhost", "iafis.example"]
    assert dns_names("ident") == ["ident.fedprint", "localhost"]
    assert dns_names("admin") == dns_names(agency_name(ORI)) == []  # clients serve nothing
    # A host named like a service would pass for it: refused.
    refused = CliRunner().invoke(app, ["certs", str(tmp_path), "--host", "ice=iafis.fedprint"])
    assert refused.exit_code != 0


def coordinator_config(root: Path, tls: TlsFiles) -> CoordinatorConfig:
    """A coordinator on its own PKI; no node is reached in these tests (GetStats reads its store)."""
    return CoordinatorConfig(
        data_dir=root / "coordinator",
        iafis_address="127.0.0.1:1",
        ident_address="127.0.0.1:1",
        ice_address="127.0.0.1:1",
        tls=tls,
    )


@pytest_asyncio.fixture
async def own_pki_coordinator(
    tmp_path: Path,
) -> AsyncIterator[tuple[CoordinatorService, dict[str, TlsFiles]]]:
    """A running coordinator and a PKI of its own (revoking in it touches no other test)."""
    pki = issue_dev_pki(tmp_path / "pki", oris=[ORI])
    pki["admin-2"] = DevCa.load(tmp_path / "pki").issue("admin-2", Role.GALLERY_ADMIN)
    service = build_coordinator(coordinator_config(tmp_path, pki["coordinator"]))
    await service.start()
    try:
        yield service, pki
    finally:
        await service.stop(0)


async def test_a_revoked_certificate_is_refused_within_a_second_without_a_restart(
    own_pki_coordinator: tuple[CoordinatorService, dict[str, TlsFiles]],
) -> None:
    service, pki = own_pki_coordinator
    async with (
        open_channel(service.host.address, pki["admin"], server="coordinator") as revoked_channel,
        open_channel(service.host.address, pki["admin-2"], server="coordinator") as other_channel,
    ):
        revoked, other = (
            bk_grpc.BookingServiceStub(revoked_channel),
            bk_grpc.BookingServiceStub(other_channel),
        )
        await revoked.GetStats(bk.GetStatsRequest(), timeout=10)  # in, on an open connection
        serial = identity_of(pki["admin"].cert.read_bytes()).serial

        result = CliRunner().invoke(
            app, ["certs", "revoke", "admin", "--tls-dir", str(pki["admin"].ca.parent)]
        )
        assert result.exit_code == 0, result.output
        changed = time.monotonic()

        async def code() -> grpc.StatusCode:
            try:
                await revoked.GetStats(bk.GetStatsRequest(), timeout=10)
            except grpc.aio.AioRpcError as error:
                return error.code()
            return grpc.StatusCode.OK

        assert (
            await eventually_awaited(code, lambda c: c != grpc.StatusCode.OK)
            == grpc.StatusCode.PERMISSION_DENIED
        )
        assert time.monotonic() - changed < 1.0  # the same connection, no server restart
        await other.GetStats(bk.GetStatsRequest(), timeout=10)  # another administrator: unaffected
    # Audited like every refusal, with the certificate's identity and the reason.
    [(event, detail)] = service.coordinator.store.audit("")
    assert event == "access_denied"
    assert f"serial={serial:x}" in detail and "revoked" in detail and "CN=admin" in detail


async def test_a_revocation_list_not_signed_by_the_ca_changes_nothing(
    own_pki_coordinator: tuple[CoordinatorService, dict[str, TlsFiles]], tmp_path: Path
) -> None:
    service, pki = own_pki_coordinator
    # Another CA's list revoking the administrator, written where the coordinator reads its own.
    foreign = issue_dev_pki(tmp_path / "foreign")
    (tmp_path / "foreign" / "admin.pem").write_bytes(pki["admin"].cert.read_bytes())
    result = CliRunner().invoke(app, ["certs", "revoke", "admin", "--tls-dir", str(tmp_path / "foreign")])
    assert result.exit_code == 0, result.output
    assert foreign["admin"].crl is not None and pki["admin"].crl is not None
    pki["admin"].crl.write_bytes(foreign["admin"].crl.read_bytes())
    revocation = service.host.access.revocation
    assert revocation is not None
    async with open_channel(service.host.address, pki["admin"], server="coordinator") as channel:
        await bk_grpc.BookingServiceStub(channel).GetStats(bk.GetStatsRequest(), timeout=10)
    assert "signature" in revocation.error or "revocation list" in revocation.error


def audited_count(detail: str) -> int:
    """How many refusals one audit entry stands for (``count=N`` in a summary, else one)."""
    for part in detail.split("; "):
        if part.startswith("count="):
            return int(part.removeprefix("count="))
    return 1


async def test_repeated_refusals_run_out_of_budget_and_are_audited_by_the_window(
    tmp_path: Path,
) -> None:
    pki = issue_dev_pki(tmp_path / "pki", oris=[ORI, "XX0020000"])
    service = build_coordinator(coordinator_config(tmp_path, pki["coordinator"]))
    burst, window_s = 20, 1.0
    # A small budget and a short window, so the test sees both (the defaults: 30, and a minute).
    service.host.access.denials = DenialLedger(per_second=0.5, burst=burst, window_s=window_s)
    await service.start()
    store = service.coordinator.store
    attempts = 300
    try:
        rows_before = len(store.audit(""))
        codes: list[grpc.StatusCode] = []
        delays: list[float | None] = []
        started = time.monotonic()
        async with open_channel(service.host.address, pki[agency_name(ORI)], server="coordinator") as channel:
            stub = bk_grpc.BookingServiceStub(channel)
            for _ in range(attempts):  # an agency may not read the coordinator's queues
                try:
                    await stub.GetStats(bk.GetStatsRequest(), timeout=10)
                except grpc.aio.AioRpcError as error:
                    codes.append(error.code())
                    delays.append(retry_delay(error))
        elapsed = time.monotonic() - started
        denied = codes.count(grpc.StatusCode.PERMISSION_DENIED)
        assert codes[:burst] == [grpc.StatusCode.PERMISSION_DENIED] * burst
        assert codes[burst] == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert denied + codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == attempts
        assert denied <= burst + 0.5 * elapsed + 1  # the budget, and what it refilled meanwhile
        assert all(
            d is not None and d > 0
            for d, c in zip(delays, codes, strict=True)
            if c.name == "RESOURCE_EXHAUSTED"
        )
        # Another agency has a budget of its own: refused, not exhausted.
        async with open_channel(
            service.host.address, pki[agency_name("XX0020000")], server="coordinator"
        ) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await bk_grpc.BookingServiceStub(ch).GetStats(bk.GetStatsRequest(), timeout=10)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED

        def first_agency_rows() -> list[tuple[str, str]]:
            return [(e, d) for e, d in store.audit("")[rows_before:] if f"ori={ORI}" in d]

        # Each window's repeats arrive as one entry with their count when it closes: every refusal
        # is accounted for, in a few rows.
        rows = await eventually(
            first_agency_rows,
            lambda r: sum(audited_count(d) for _, d in r) == attempts,
            what="the summaries of every refused call",
        )
    finally:
        await service.stop(0)
    windows = elapsed / window_s + 2
    assert len(rows) <= 2 * 2 * windows  # two kinds (refused, over budget), first + summary each
    assert len(rows) < attempts / 10
    assert all(e == "access_denied" and GET_STATS in d for e, d in rows)
    assert any(OVER_BUDGET in d and audited_count(d) > 1 for _, d in rows)
    assert any("may not call" in d and audited_count(d) > 1 for _, d in rows)


def test_the_revoke_command_names_what_it_revoked_and_keeps_earlier_entries(tmp_path: Path) -> None:
    pki = issue_dev_pki(tmp_path, oris=[ORI])
    first = identity_of(pki["examiner"].cert.read_bytes()).serial
    second = identity_of(pki[agency_name(ORI)].cert.read_bytes()).serial
    runner = CliRunner()
    assert runner.invoke(app, ["certs", "revoke", "examiner", "--tls-dir", str(tmp_path)]).exit_code == 0
    result = runner.invoke(app, ["certs", "revoke", f"{second:x}", "--tls-dir", str(tmp_path)])
    assert result.exit_code == 0 and f"{second:x}" in result.output
    from fedprint.pki import RevocationList

    assert pki["examiner"].crl is not None
    crl = RevocationList(pki["examiner"].crl, pki["examiner"].ca)
    assert crl.revoked(first) and crl.revoked(second)
    assert not crl.revoked(identity_of(pki["admin"].cert.read_bytes()).serial)
    # Renewing gives the examiner a new certificate; the revoked one stays revoked.
    assert runner.invoke(app, ["certs", str(tmp_path), "--ori", ORI]).exit_code == 0
    renewed = identity_of(pki["examiner"].cert.read_bytes()).serial
    assert renewed != first and not crl.revoked(renewed) and crl.revoked(first)
    assert runner.invoke(app, ["certs", "revoke", "nobody", "--tls-dir", str(tmp_path)]).exit_code != 0


def test_a_caller_without_a_certificate_spends_its_address_budget_whatever_its_port() -> None:
    from fedprint.access import Caller

    one, other = (
        Caller(None, GET_STATS, "ipv4:10.0.0.7:50000"),
        Caller(None, GET_STATS, "ipv4:10.0.0.7:50001"),
    )
    assert one.budget_key() == other.budget_key() == "peer:ipv4:10.0.0.7"
    assert Caller(None, GET_STATS, "ipv6:[::1]:50000").budget_key() == "peer:ipv6:[::1]"


def test_a_window_audits_the_first_refusal_at_once_and_its_repeats_as_one_count() -> None:
    from fedprint.access import Caller, Denial

    now = [0.0]
    ledger = DenialLedger(per_second=1.0, burst=2, window_s=10.0, clock=lambda: now[0])
    caller = Caller(None, GET_STATS, "ipv4:10.0.0.7:50000")
    first = Denial(caller, "no client certificate")
    assert ledger.note(first) == [first]
    assert [ledger.note(first) for _ in range(5)] == [[]] * 5  # counted, not audited
    other = Denial(caller, "no client certificate", tcn="TCN-2")  # another booking: its own entry
    assert ledger.note(other) == [other]
    assert ledger.take(caller) == 0.0 and ledger.take(caller) == 0.0 and ledger.take(caller) > 0.0
    assert ledger.next_close() == 10.0
    now[0] = 10.0
    [summary] = ledger.closed(now[0])  # the window with repeats; the other had none
    assert (summary.count, summary.reason, summary.fields()["count"]) == (5, first.reason, "5")
    assert ledger.note(first) == [first]  # a new window


async def test_a_service_takes_its_refusal_budget_from_its_settings(
    tmp_path: Path, pki: dict[str, TlsFiles]
) -> None:
    config = IceConfig(
        data_dir=tmp_path / "ice",
        tls=pki["ice"],
        refusals={"per_second": 0.5, "burst": 3, "window_s": 5.0},
    )
    ledger = build_ice(config).host.access.denials
    assert (ledger.budget.per_second, ledger.budget.burst, ledger.window_s) == (0.5, 3, 5.0)
    # The default: 30 refusals at once, then one a second, repeats audited once a minute.
    default = build_ice(IceConfig(data_dir=tmp_path / "ice2", tls=pki["ice"])).host.access.denials
    assert (default.budget.per_second, default.budget.burst, default.window_s) == (1.0, 30, 60.0)
