"""A TCP proxy on loopback that stands for a slow or flaky network path between a client and a
real server: it can hold back the server's first bytes (a handshake that a loaded machine takes
long over) or drop the first connections it accepts (a peer that is restarting)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass


@dataclass
class Proxy:
    """Where the proxy listens, and how many connections it has accepted and dropped."""

    address: str
    accepted: int = 0
    dropped: int = 0


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter, delay_s: float) -> None:
    first = True
    try:
        while data := await source.read(65536):
            if first and delay_s:
                await asyncio.sleep(delay_s)  # the delay being modelled, not a wait for an event
            first = False
            sink.write(data)
            await sink.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        sink.close()


@asynccontextmanager
async def tcp_proxy(target: str, *, delay_s: float = 0.0, drop_first: int = 0) -> AsyncIterator[Proxy]:
    """Forwards 127.0.0.1:<port> to ``target``. ``delay_s``: the server's first bytes on each
    connection reach the client that much later; ``drop_first``: that many connections are
    closed as soon as they are accepted."""
    host, port = target.rsplit(":", 1)
    tasks: set[asyncio.Task[None]] = set()
    proxy = Proxy("")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        proxy.accepted += 1
        if proxy.dropped < drop_first:
            proxy.dropped += 1
            writer.close()
            return
        upstream_reader, upstream_writer = await asyncio.open_connection(host, int(port))
        await asyncio.gather(_pipe(reader, upstream_writer, 0.0), _pipe(upstream_reader, writer, delay_s))

    def track(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(handle(reader, writer))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    server = await asyncio.start_server(track, "127.0.0.1", 0)
    proxy.address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        yield proxy
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        for task in list(tasks):
            with suppress(asyncio.CancelledError, ConnectionError):
                await task
        await server.wait_closed()
