"""Misbehaving servers for fault tests: silent listeners and a connection-cutting proxy."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


@contextlib.asynccontextmanager
async def silent_server() -> AsyncIterator[int]:
    """Accepts TCP connections and never says a word (a hung SMTP or IMAP server)."""
    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        with contextlib.suppress(ConnectionError):
            await reader.read()  # hold the connection open until the client leaves

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for w in writers:
            w.close()
        await server.wait_closed()


@contextlib.asynccontextmanager
async def cutting_proxy(
    target_port: int, cut_on: bytes, hold: float = 0.0
) -> AsyncIterator[int]:
    """A TCP proxy to `target_port` that drops both sides once the client sends `cut_on`.

    The offending command is withheld from the server for `hold` seconds first.
    """
    conns: list[asyncio.StreamWriter] = []

    async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, inspect: bool,
                   other: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                if inspect and cut_on in data:
                    await asyncio.sleep(hold)
                    break
                dst.write(data)
                await dst.drain()
        except ConnectionError:
            pass
        finally:
            dst.close()
            other.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target_port)
        conns.extend([writer, up_writer])
        await asyncio.gather(
            pipe(reader, up_writer, True, writer), pipe(up_reader, writer, False, up_writer)
        )

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for w in conns:
            w.close()
        await server.wait_closed()
