"""Mutual TLS between services: a client without a certificate from the federation's CA is
refused at the handshake; one with a certificate gets through; renewed certificates are picked
up without a restart; a handshake that a loaded machine makes slow, and a peer that drops its
first connections, still end in an answer."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from fedprint.clients import list_notifications
from fedprint.pki import Role, TlsFiles, identity_of, issue_dev_pki
from ice_service import build_ice
from ice_service.config import IceConfig
from tests.loopback import tcp_proxy


async def test_services_speak_mtls_and_refuse_strangers(tmp_path: Path) -> None:
    issued = issue_dev_pki(tmp_path / "pki")
    stranger = issue_dev_pki(tmp_path / "other-ca")["ice"]
    ice = build_ice(IceConfig(data_dir=tmp_path / "ice", tls=issued["ice"]))
    await ice.host.start()
    try:
        assert await list_notifications(ice.host.address, tls=issued["ice"]) == []
        for bad in (None, stranger):  # plaintext, and a certificate from another CA
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await list_notifications(ice.host.address, tls=bad, insecure=bad is None)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await ice.stop(0)


async def test_a_server_picks_up_renewed_certificates_without_a_restart(tmp_path: Path) -> None:
    old = issue_dev_pki(tmp_path / "pki")
    ice = build_ice(IceConfig(data_dir=tmp_path / "ice", tls=old["ice"]))
    await ice.host.start()
    try:
        assert await list_notifications(ice.host.address, tls=old["ice"]) == []
        # A new CA replaces the old one: new files at the same paths, no restart.
        staged = issue_dev_pki(tmp_path / "renewed")
        for name in ("ca.pem", "ice.pem", "ice.key"):
            (tmp_path / "pki" / name).write_bytes((tmp_path / "renewed" / name).read_bytes())
        assert await list_notifications(ice.host.address, tls=staged["ice"]) == []
        assert ice.host.certificate_reloads == 1
        # Identities of the old CA no longer get in (the client trusts the new CA's server).
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await list_notifications(ice.host.address, tls=old["admin"])
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await ice.stop(0)


def test_dev_pki_writes_one_identity_per_role_and_agency(tmp_path: Path) -> None:
    issued = issue_dev_pki(tmp_path, oris=["XX0010000"])
    assert set(issued) == {"coordinator", "iafis", "ident", "ice", "admin", "examiner", "agency-XX0010000"}
    assert issued["iafis"] == TlsFiles.in_dir(tmp_path, "iafis")
    assert issued["iafis"].cert.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    assert issued["iafis"].key.stat().st_mode & 0o077 == 0  # private keys are private
    assert (tmp_path / "ca.key").stat().st_mode & 0o077 == 0
    agency = identity_of(issued["agency-XX0010000"].cert.read_bytes())
    assert (agency.role, agency.ori) == (Role.BOOKING_AGENCY, "XX0010000")
    assert identity_of(issued["admin"].cert.read_bytes()).role is Role.GALLERY_ADMIN
    assert identity_of(issued["coordinator"].cert.read_bytes()).ori is None
    # A second run reuses the CA, so identities issued earlier stay valid.
    again = issue_dev_pki(tmp_path, oris=["XX0020000"])
    assert again["agency-XX0020000"].ca.read_bytes() == issued["admin"].ca.read_bytes()


@pytest_asyncio.fixture
async def ice_service(tmp_path: Path) -> AsyncIterator[tuple[str, TlsFiles]]:
    """A running ICE service over mTLS: its address, and ICE's identity to call it with."""
    issued = issue_dev_pki(tmp_path / "pki")
    ice = build_ice(IceConfig(data_dir=tmp_path / "ice", tls=issued["ice"]))
    await ice.host.start()
    try:
        yield ice.host.address, issued["ice"]
    finally:
        await ice.stop(0)


async def test_a_mutual_tls_handshake_that_takes_seconds_still_connects(
    ice_service: tuple[str, TlsFiles],
) -> None:
    # On a loaded machine a handshake can take far longer than on a quiet one: the server's TLS
    # work and its certificate callback (which needs Python's lock) wait for a core. Channels once
    # gave every connection attempt 200 ms, and failed here with "Handshake read failed (Endpoint
    # closing)" although the server was ready; an attempt now has gRPC's 20 s.
    address, identity = ice_service
    async with tcp_proxy(address, delay_s=1.5) as slow:
        assert await list_notifications(slow.address, tls=identity) == []
    assert slow.accepted == 1  # the first attempt's handshake completed: no retry hid a failure


async def test_an_idempotent_call_rides_out_a_peer_that_drops_its_first_connection(
    ice_service: tuple[str, TlsFiles],
) -> None:
    # A peer that is restarting drops a connection; the channel's retry policy makes an
    # idempotent call again after a backoff instead of failing it UNAVAILABLE.
    address, identity = ice_service
    async with tcp_proxy(address, drop_first=1) as flaky:
        assert await list_notifications(flaky.address, tls=identity) == []
    assert flaky.dropped == 1 and flaky.accepted == 2


def test_the_retry_policy_names_only_methods_that_exist() -> None:
    # A renamed method would silently lose its retries; every name must resolve.
    from google.protobuf import descriptor_pool

    import fedprint.booking.v1.booking_pb2
    import fedprint.gallery.v1.gallery_pb2
    import fedprint.ice.v1.ice_pb2
    import fedprint.review.v1.review_pb2  # noqa: F401  (registers the services)
    from fedprint.rpc import IDEMPOTENT_METHODS

    pool = descriptor_pool.Default()
    for name, methods in IDEMPOTENT_METHODS.items():
        service = pool.FindServiceByName(name)
        assert set(methods) <= {m.name for m in service.methods}, name
