"""Mutual TLS between services: a client without a certificate from the federation's CA
is refused at the handshake; one with a certificate gets through."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from fedprint.clients import list_notifications
from fedprint.pki import TlsFiles, issue_dev_pki
from ice_service import build_ice
from ice_service.config import IceConfig


async def test_services_speak_mtls_and_refuse_strangers(tmp_path: Path) -> None:
    issued = issue_dev_pki(tmp_path / "pki")
    stranger = issue_dev_pki(tmp_path / "other-ca", services=["booking-system"])["booking-system"]
    ice = build_ice(IceConfig(data_dir=tmp_path / "ice", tls=issued["ice"]))
    await ice.host.start()
    try:
        assert await list_notifications(ice.host.address, tls=issued["booking-system"]) == []
        for bad in (None, stranger):  # plaintext, and a certificate from another CA
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await list_notifications(ice.host.address, tls=bad)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await ice.stop(0)


def test_dev_pki_writes_one_identity_per_service(tmp_path: Path) -> None:
    issued = issue_dev_pki(tmp_path, services=["coordinator", "iafis"])
    assert issued["iafis"] == TlsFiles.in_dir(tmp_path, "iafis")
    assert issued["iafis"].cert.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    assert issued["iafis"].key.stat().st_mode & 0o077 == 0  # private keys are private
