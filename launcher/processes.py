"""Services as processes: ``fedprint serve ROLE`` started, awaited and stopped, and the whole
federation (ICE, both nodes, the coordinator) brought up on 127.0.0.1 over mTLS, each service with
its own identity from the development PKI."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fedprint.pki import TlsFiles

STARTUP_TIMEOUT_S = 90.0


@dataclass
class ServiceProcess:
    role: str
    process: asyncio.subprocess.Process
    address: str
    log: Path


async def start_service(role: str, config: dict[str, Any], workdir: Path) -> ServiceProcess:
    """Starts ``fedprint serve ROLE`` and waits until it reports its bound address."""
    config_path = workdir / f"{role}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    ready = workdir / f"{role}.ready"
    ready.unlink(missing_ok=True)
    log = workdir / f"{role}.log"
    with log.open("wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "cli",
            "serve",
            role,
            "--config",
            str(config_path),
            "--ready-file",
            str(ready),
            stdout=log_file,
            stderr=log_file,
            stdin=asyncio.subprocess.DEVNULL,
        )
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not ready.exists() or not ready.read_text().strip():
        if process.returncode is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{role} did not start; see {log}")
        await asyncio.sleep(0.1)
    return ServiceProcess(role, process, ready.read_text().strip(), log)


async def stop_service(service: ServiceProcess, timeout_s: float = 15.0) -> int:
    """SIGTERM, then wait for a graceful exit (SIGKILL past the timeout); returns the exit code."""
    if service.process.returncode is None:
        service.process.terminate()
        try:
            await asyncio.wait_for(service.process.wait(), timeout_s)
        except TimeoutError:
            service.process.kill()
            await service.process.wait()
    return service.process.returncode or 0


@contextlib.asynccontextmanager
async def federation(workdir: Path, pki: dict[str, TlsFiles]) -> AsyncIterator[dict[str, str]]:
    """The four services as processes speaking mTLS, each with its own certificate from ``pki``
    (:func:`fedprint.pki.issue_dev_pki`); yields their addresses by role and stops them all on exit."""
    started: list[ServiceProcess] = []
    common = {"listen": "127.0.0.1:0", "log_level": "info"}

    def tls(role: str) -> dict[str, str]:
        files = pki[role]
        return {"ca": str(files.ca), "cert": str(files.cert), "key": str(files.key)}

    try:
        started.append(
            await start_service(
                "ice", {**common, "data_dir": str(workdir / "ice"), "tls": tls("ice")}, workdir
            )
        )
        nodes = await asyncio.gather(
            *(
                start_service(
                    node,
                    {
                        **common,
                        "node": node,
                        "data_dir": str(workdir / node),
                        "tls": tls(node),
                        # Both nodes share this machine's cores: one torch thread each.
                        "torch_threads": 1,
                    },
                    workdir,
                )
                for node in ("iafis", "ident")
            )
        )
        started.extend(nodes)
        addresses = {s.role: s.address for s in started}
        coordinator = {
            **common,
            "data_dir": str(workdir / "coordinator"),
            "iafis_address": addresses["iafis"],
            "ident_address": addresses["ident"],
            "ice_address": addresses["ice"],
            "node_deadline_s": 60.0,
            "tls": tls("coordinator"),
        }
        started.append(await start_service("coordinator", coordinator, workdir))
        yield {s.role: s.address for s in started}
    finally:
        # The coordinator first, so nothing new reaches the nodes while they stop.
        codes = [await stop_service(s) for s in reversed(started)]
        bad = [s.role for s, code in zip(reversed(started), codes, strict=True) if code not in (0, -15)]
        if bad:
            raise RuntimeError(f"services exited uncleanly: {bad}")
