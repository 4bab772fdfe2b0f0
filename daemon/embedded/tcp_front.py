"""A TCP front for a local cluster: one fixed address, each connection to a live task.

The local stand-in for the load balancer in front of smtp-out: the tasks listen
on ports of their own (a replacement on a new one), the route's SMTP settings
name this front. A connection goes to the first backend that accepts; every
byte is piped both ways, each side bounded by an idle timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

Backends = Callable[[], list[tuple[str, int]]]
CONNECT_TIMEOUT = 5.0
IDLE_TIMEOUT = 120.0
CHUNK = 65536


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            async with asyncio.timeout(IDLE_TIMEOUT):
                data = await reader.read(CHUNK)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except (OSError, TimeoutError):
        pass
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def tcp_front(backends: Backends, host: str = "127.0.0.1",
                    port: int = 0) -> AsyncIterator[tuple[str, int]]:
    """Listen on host:port until the block ends; yields the bound address."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        for b_host, b_port in backends():
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    upstream = await asyncio.open_connection(b_host, b_port)
                break
            except (OSError, TimeoutError):
                continue
        if upstream is None:
            writer.close()
            return
        up_reader, up_writer = upstream
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    server = await asyncio.start_server(handle, host, port)
    try:
        sock = server.sockets[0].getsockname()
        yield str(sock[0]), int(sock[1])
    finally:
        server.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                await server.wait_closed()
