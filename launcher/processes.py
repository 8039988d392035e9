"""Services as processes: ``fedprint serve ROLE`` started, awaited and stopped, and the whole
federation (ICE, both nodes, the coordinator) brought up on 127.0.0.1 over mTLS, each service with
its own identity from the development PKI; each node whole, or sharded into a router and its
shard processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import AsyncIterator, Mapping
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


async def start_service(
    role: str,
    config: dict[str, Any],
    workdir: Path,
    *,
    name: str | None = None,
    env: Mapping[str, str] | None = None,
) -> ServiceProcess:
    """Starts ``fedprint serve ROLE`` and waits until it reports its bound address. ``name`` (the
    role by default) names its config, log and ready files; ``env`` is added to its environment
    (secrets such as ``FEDPRINT_DATABASE_URL`` go there, never into the config file)."""
    name = name or role
    config_path = workdir / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    ready = workdir / f"{name}.ready"
    ready.unlink(missing_ok=True)
    log = workdir / f"{name}.log"
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
            env={**os.environ, **(env or {})},
        )
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not ready.exists() or not ready.read_text().strip():
        if process.returncode is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not start; see {log}")
        await asyncio.sleep(0.1)
    return ServiceProcess(name, process, ready.read_text().strip(), log)


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
async def federation(
    workdir: Path,
    pki: dict[str, TlsFiles],
    *,
    shards: int = 1,
    database_urls: Mapping[str, str] | None = None,
) -> AsyncIterator[dict[str, str]]:
    """The four services as processes speaking mTLS, each with its own certificate from ``pki``
    (:func:`fedprint.pki.issue_dev_pki`); yields their addresses by name and stops them all on exit.

    With ``shards`` > 1 each node runs as a router (its address is the node's) in front of that
    many shard processes (``iafis-shard-0``, ...), which share the node's database and data
    directory. ``database_urls`` maps a service (coordinator, iafis, ident, ice) to the database
    it uses instead of its SQLite file, given in its environment.
    """
    started: list[ServiceProcess] = []
    common = {"listen": "127.0.0.1:0", "log_level": "info"}
    urls = database_urls or {}

    def tls(role: str) -> dict[str, str]:
        files = pki[role]
        return {"ca": str(files.ca), "cert": str(files.cert), "key": str(files.key)}

    def env(role: str) -> dict[str, str]:
        return {"FEDPRINT_DATABASE_URL": urls[role]} if role in urls else {}

    async def node(name: str) -> list[ServiceProcess]:
        config = {
            **common,
            "node": name,
            "data_dir": str(workdir / name),
            "tls": tls(name),
            # The nodes (and shards) share this machine's cores: one torch thread each.
            "torch_threads": 1,
        }
        if shards <= 1:
            return [await start_service(name, config, workdir, env=env(name))]
        parts = await asyncio.gather(
            *(
                start_service(
                    name,
                    {**config, "role": "shard", "shard": {"count": shards, "index": i}},
                    workdir,
                    name=f"{name}-shard-{i}",
                    env=env(name),
                )
                for i in range(shards)
            )
        )
        router = {
            **common,
            "node": name,
            "role": "router",
            "shards": [p.address for p in parts],
            "data_dir": str(workdir / f"{name}-router"),
            "tls": tls(name),
        }
        return [*parts, await start_service(name, router, workdir, env=env(name))]

    try:
        started.append(
            await start_service(
                "ice",
                {**common, "data_dir": str(workdir / "ice"), "tls": tls("ice")},
                workdir,
                env=env("ice"),
            )
        )
        for processes in await asyncio.gather(node("iafis"), node("ident")):
            started.extend(processes)
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
        started.append(await start_service("coordinator", coordinator, workdir, env=env("coordinator")))
        yield {s.role: s.address for s in started}
    finally:
        # The coordinator first, so nothing new reaches the nodes while they stop; routers before
        # their shards.
        codes = [await stop_service(s) for s in reversed(started)]
        bad = [s.role for s, code in zip(reversed(started), codes, strict=True) if code not in (0, -15)]
        if bad:
            raise RuntimeError(f"services exited uncleanly: {bad}")
