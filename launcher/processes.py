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
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from federation.store import CoordinatorStore
from fedprint.booking.v1 import booking_pb2 as bk
from fedprint.pki import TlsFiles
from fedprint.validation import booking_key

STARTUP_TIMEOUT_S = 90.0


@dataclass
class ServiceProcess:
    """A running ``fedprint serve`` process, and what it takes to start it again as the same
    service: the config file it was started with (kept), its environment and its ready file."""

    #: The service's name (its role, or e.g. ``iafis-shard-0``).
    role: str
    process: asyncio.subprocess.Process
    address: str
    log: Path
    #: What ``fedprint serve`` runs (coordinator, iafis, ident, ice).
    serve: str
    config_path: Path
    ready: Path
    env: Mapping[str, str]
    #: Times this service was killed (:meth:`kill`) and started again (:meth:`restart`).
    kills: int = 0
    restarts: int = 0

    async def kill(self) -> None:
        """SIGKILL, the way a crash or an OOM kill ends a process: no graceful stop, no flush,
        no goodbye to its clients; waits until it is gone."""
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        self.kills += 1

    async def restart(self) -> None:
        """Starts the service again after it died (:meth:`kill`), with the same config, hence
        the same data directory and database files, and on the same address (its clients keep
        their channels and reconnect)."""
        if self.process.returncode is None:
            raise RuntimeError(f"{self.role} is still running; kill or stop it first")
        self.process = await _spawn(
            self.serve, self.config_path, self.ready, self.log, self.env, listen=self.address
        )
        await _wait_ready(self.role, self.process, self.ready, self.log)
        self.restarts += 1


async def _spawn(
    role: str, config_path: Path, ready: Path, log: Path, env: Mapping[str, str], *, listen: str | None = None
) -> asyncio.subprocess.Process:
    """Starts ``fedprint serve ROLE``; its log is appended to, so that a restarted service's log
    follows its earlier life."""
    _address(ready, clear=True)
    with log.open("ab") as log_file:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "cli",
            "serve",
            role,
            "--config",
            str(config_path),
            "--ready-file",
            str(ready),
            *(["--listen", listen] if listen else []),
            stdout=log_file,
            stderr=log_file,
            stdin=asyncio.subprocess.DEVNULL,
            env={**os.environ, **env},
        )


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
    log = workdir / f"{name}.log"
    log.unlink(missing_ok=True)
    process = await _spawn(role, config_path, ready, log, env or {})
    address = await _wait_ready(name, process, ready, log)
    return ServiceProcess(name, process, address, log, role, config_path, ready, dict(env or {}))


async def _wait_ready(name: str, process: asyncio.subprocess.Process, ready: Path, log: Path) -> str:
    """Waits until the service writes its bound address into ``ready``; returns it."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not (address := _address(ready)):
        if process.returncode is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not start; see {log}")
        await asyncio.sleep(0.1)
    return address


def _address(ready: Path, *, clear: bool = False) -> str:
    """The address a service wrote into its ready file ("" while there is none); ``clear``
    removes the file of an earlier start first."""
    if clear:
        ready.unlink(missing_ok=True)
    return ready.read_text().strip() if ready.exists() else ""


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


class Federation(Mapping[str, str]):
    """The running federation: a mapping of service name to address (what most callers need),
    and the processes behind them (:attr:`services`) for callers that kill and restart them."""

    def __init__(self, services: Sequence[ServiceProcess], coordinator_database: str) -> None:
        self.services: dict[str, ServiceProcess] = {s.role: s for s in services}
        #: The coordinator's database URL.
        self.coordinator_database = coordinator_database

    def kept_decisions(
        self, bookings: Iterable[tuple[str, str]]
    ) -> dict[tuple[str, str], bk.BookingDecision]:
        """The coordinator's own record of these bookings' decisions (by ORI and TCN), read from its
        database: what its operators, examiners and auditors see (an agency sees only its view)."""
        store = CoordinatorStore(self.coordinator_database)
        try:
            return {b: d for b in bookings if (d := store.decision(booking_key(*b))) is not None}
        finally:
            store.close()

    def __getitem__(self, name: str) -> str:
        return self.services[name].address

    def __iter__(self) -> Iterator[str]:
        return iter(self.services)

    def __len__(self) -> int:
        return len(self.services)


@contextlib.asynccontextmanager
async def federation(
    workdir: Path,
    pki: dict[str, TlsFiles],
    *,
    shards: int = 1,
    database_urls: Mapping[str, str] | None = None,
) -> AsyncIterator[Federation]:
    """The four services as processes speaking mTLS, each with its own certificate from ``pki``
    (:func:`fedprint.pki.issue_dev_pki`); yields them (their addresses by name, and the processes:
    :class:`Federation`) and stops them all on exit. A service killed and restarted meanwhile
    (:meth:`ServiceProcess.kill`, :meth:`ServiceProcess.restart`) is stopped as it is then.

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
        found = {"ca": str(files.ca), "cert": str(files.cert), "key": str(files.key)}
        # The CA's revocation list: `fedprint certs revoke` reaches the running services.
        return found | ({"crl": str(files.crl)} if files.crl is not None else {})

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
            # The node's database (its SQLite file here): the router keeps what it returned there.
            "data_dir": str(workdir / name),
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
            # A stable name: restarted after a crash, it takes back the claims its last life held.
            "replica_id": "coordinator",
        }
        started.append(await start_service("coordinator", coordinator, workdir, env=env("coordinator")))
        database = urls.get("coordinator", f"sqlite:///{workdir / 'coordinator' / 'coordinator.sqlite'}")
        yield Federation(started, database)
    finally:
        # The coordinator first, so nothing new reaches the nodes while they stop; routers before
        # their shards.
        codes = [await stop_service(s) for s in reversed(started)]
        bad = [s.role for s, code in zip(reversed(started), codes, strict=True) if code not in (0, -15)]
        if bad:
            raise RuntimeError(f"services exited uncleanly: {bad}")
