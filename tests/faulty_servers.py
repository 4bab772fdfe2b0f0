"""Misbehaving servers for fault tests: silent listeners, a connection-cutting proxy, a
wedging proxy (a server that stops answering without closing)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal


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
    target_port: int, cut_on: bytes, hold: float = 0.0, connections: int | None = None,
) -> AsyncIterator[int]:
    """A TCP proxy to `target_port` that drops both sides once the client sends `cut_on`.

    The offending command is withheld from the server for `hold` seconds first.
    Only the first `connections` connections are cut (all when None).
    """
    conns: list[asyncio.StreamWriter] = []
    accepted = 0

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
        nonlocal accepted
        accepted += 1
        cut = connections is None or accepted <= connections
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target_port)
        conns.extend([writer, up_writer])
        await asyncio.gather(
            pipe(reader, up_writer, cut, writer), pipe(up_reader, writer, False, up_writer)
        )

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for w in conns:
            w.close()
        await server.wait_closed()


@dataclass
class WedgingProxy:
    """Control of a running `wedging_proxy`: where it listens and what it has wedged."""

    port: int
    wedge_on: bytes | None
    wedged: int = 0  # connections wedged so far
    sent: bytes = b""  # everything clients sent through the proxy


@contextlib.asynccontextmanager
async def wedging_proxy(
    target_port: int, wedge_on: bytes | None = None,
) -> AsyncIterator[WedgingProxy]:
    """A TCP proxy to `target_port` that wedges a connection once the client sends `wedge_on`.

    A wedged connection stays open but nothing more is forwarded in either
    direction (the offending command never reaches the server): a server that
    stopped answering. Set `proxy.wedge_on = None` to make new data pass again;
    `proxy.sent` shows what clients said.
    """
    proxy = WedgingProxy(port=0, wedge_on=wedge_on)
    conns: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target_port)
        conns.extend([writer, up_writer])
        wedged = False

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                       from_client: bool) -> None:
            nonlocal wedged
            with contextlib.suppress(ConnectionError):
                while data := await src.read(65536):
                    if from_client:
                        proxy.sent += data
                    if from_client and not wedged and proxy.wedge_on is not None \
                            and proxy.wedge_on in data:
                        wedged = True
                        proxy.wedged += 1
                    if wedged:
                        continue  # swallowed: the connection is wedged, not closed
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    proxy.port = server.sockets[0].getsockname()[1]
    try:
        yield proxy
    finally:
        server.close()
        for w in conns:
            w.close()
        await server.wait_closed()


@contextlib.asynccontextmanager
async def greeting_only_server(close_on_command: bool) -> AsyncIterator[int]:
    """An IMAP server that greets, then never answers the first command (or hangs up on it)."""
    async with scripted_imap_server(b"* OK IMAP4rev1 ready\r\n",
                                    close="on_command" if close_on_command else "never") as port:
        yield port


@contextlib.asynccontextmanager
async def scripted_imap_server(
    greeting: bytes, *, replies: tuple[bytes, ...] = (),
    close: Literal["never", "at_once", "on_command", "after_replies"] = "never",
) -> AsyncIterator[int]:
    """An IMAP server that greets with `greeting` (`* OK ...`, or a `* BYE ...` refusal),
    answers the first commands with `replies` in turn (`{tag}` becomes the command's
    tag), and then closes (at once after the greeting, on the first command, after its
    replies) or stays silent."""
    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        with contextlib.suppress(ConnectionError):
            writer.write(greeting)
            await writer.drain()
            if close == "at_once":
                writer.close()
                return
            for i, reply in enumerate(replies or (None,)):
                command = await reader.readline()
                if close == "on_command" and i == 0:
                    writer.close()
                    return
                if reply is not None:
                    writer.write(reply.replace(b"{tag}", command.split(b" ", 1)[0]))
                    await writer.drain()
            if close == "after_replies":
                writer.close()
                return
            await reader.read()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for w in writers:
            w.close()
        await server.wait_closed()
