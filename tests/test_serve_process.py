"""`fedprint serve` as a real process, with the shipped configuration: it speaks mutual TLS,
reports its address, serves health, refuses strangers at the handshake (each refusal in its log),
refuses to start without TLS unless told --insecure, and exits cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import datetime as dt
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedprint.clients import list_notifications
from fedprint.pki import DevCa, Role, TlsFiles, issue_dev_pki

CONFIG = Path(__file__).resolve().parents[1] / "config"


def serve(workdir: Path, *args: str) -> subprocess.Popen[bytes]:
    """`fedprint serve ice` in ``workdir`` (where the config's relative pki/ paths lead)."""
    return subprocess.Popen(
        [sys.executable, "-m", "cli", "serve", "ice", "--listen", "127.0.0.1:0", *args],
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def wait_ready(process: subprocess.Popen[bytes], ready: Path) -> str:
    deadline = time.monotonic() + 60
    while not (ready.exists() and ready.read_text().strip()):
        assert process.poll() is None, process.stdout.read() if process.stdout else ""
        assert time.monotonic() < deadline, "service did not start"
        time.sleep(0.05)
    return ready.read_text().strip()


def stop(process: subprocess.Popen[bytes]) -> str:
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    return process.stdout.read().decode() if process.stdout else ""


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    """A directory holding ``pki/`` from the development CA, as `fedprint certs pki` leaves it."""
    issue_dev_pki(tmp_path / "pki", oris=["XX0010000"])
    yield tmp_path


async def test_the_default_config_serves_mtls_and_refuses_every_stranger_at_the_handshake(
    workdir: Path,
) -> None:
    ready = workdir / "ready"
    process = serve(workdir, "--config", str(CONFIG / "ice.yaml"), "--ready-file", str(ready))
    try:
        address = await asyncio.to_thread(wait_ready, process, ready)
        ca = DevCa.load(workdir / "pki")
        # Allowed: ICE reads its queue.
        ice = ca.issue("ice-reader", Role.ICE)
        assert await list_notifications(address, tls=ice) == []
        now = dt.datetime.now(dt.UTC)
        expired = ca.issue(
            "agency-expired",
            Role.BOOKING_AGENCY,
            ori="XX0010000",
            not_before=now - dt.timedelta(days=10),
            not_after=now - dt.timedelta(days=1),
        )
        # Another CA's certificate, shown by a client that trusts this federation's server.
        foreign = DevCa.create(workdir / "other-ca").issue("ice", Role.ICE)
        stranger = TlsFiles(workdir / "pki" / "ca.pem", foreign.cert, foreign.key)
        # Refused at the handshake: plaintext, TLS without a certificate, another CA, expired.
        with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as plaintext:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert plaintext.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
        no_certificate = grpc.ssl_channel_credentials(
            root_certificates=(workdir / "pki" / "ca.pem").read_bytes()
        )
        with grpc.secure_channel(address, no_certificate) as ch, pytest.raises(grpc.RpcError) as anon:
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert anon.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
        for bad in (stranger, expired):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await list_notifications(address, tls=bad)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        # Admitted to the TLS session, refused by role: an agency reading ICE's queue.
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await list_notifications(address, tls=TlsFiles.in_dir(workdir / "pki", "agency-XX0010000"))
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        output = await asyncio.to_thread(stop, process) if process.poll() is None else ""
    # gRPC's TLS layer logs each refused handshake with its reason (no RPC and no verified identity
    # exist yet); the role refusal is a structured audit entry naming the certificate.
    handshakes = [line for line in output.splitlines() if "Handshake failed" in line]
    assert any("PEER_DID_NOT_RETURN_A_CERTIFICATE" in line for line in handshakes), output
    assert any("WRONG_VERSION_NUMBER" in line for line in handshakes), output  # the plaintext client
    assert any("certificate has expired" in line for line in handshakes), output
    # The other CA bears the same name as this one: its signature on the client's certificate fails.
    assert any("certificate signature failure" in line for line in handshakes), output
    denial = next(line for line in output.splitlines() if '"event": "access denied"' in line)
    assert '"subject": "CN=agency-XX0010000,O=fedprint development"' in denial
    assert '"role": "booking-agency"' in denial and '"audit": true' in denial
    assert '"event": "shutting down"' in output and (workdir / "data" / "ice" / "ice.sqlite").exists()


def test_without_tls_a_service_refuses_to_start_unless_told_insecure(workdir: Path) -> None:
    bare = workdir / "bare.yaml"
    bare.write_text("listen: 127.0.0.1:0\n")
    refused = serve(workdir, "--config", str(bare))
    assert refused.wait(timeout=60) != 0
    assert b"insecure" in (refused.stdout.read() if refused.stdout else b"")

    ready = workdir / "ready"
    process = serve(workdir, "--config", str(bare), "--insecure", "--ready-file", str(ready))
    try:
        address = wait_ready(process, ready)
        with grpc.insecure_channel(address) as channel:
            status = (
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
            )
        assert status == health_pb2.HealthCheckResponse.SERVING
    finally:
        output = stop(process)
    assert "PLAINTEXT" in output  # the warning at start
