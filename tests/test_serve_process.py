"""`fedprint serve` as a real process: it reports its address, serves health, and exits
cleanly on SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def test_serve_answers_health_and_shuts_down_gracefully_on_sigterm(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    config = tmp_path / "ice.yaml"
    config.write_text(f"listen: 127.0.0.1:0\ndata_dir: {tmp_path / 'data'}\n")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cli",
            "serve",
            "ice",
            "--config",
            str(config),
            "--ready-file",
            str(ready),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while not (ready.exists() and ready.read_text().strip()):
            assert process.poll() is None, process.stdout.read() if process.stdout else ""
            assert time.monotonic() < deadline, "service did not start"
            time.sleep(0.05)
        with grpc.insecure_channel(ready.read_text().strip()) as channel:
            status = (
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
            )
        assert status == health_pb2.HealthCheckResponse.SERVING
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
    output = process.stdout.read().decode() if process.stdout else ""
    assert '"event": "shutting down"' in output
    assert (tmp_path / "data" / "ice.sqlite").exists()
