"""Misbehaving servers for fault tests: silent listeners, a connection-cutting proxy, a
wedging proxy (a server that stops answering without closing)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
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


FloodKind = Literal["literal", "line", "messages"]


@dataclass
class HostileImap:
    """Control of a running `hostile_imap_server`: where it listens and what it streamed."""

    port: int
    flood: FloodKind
    streamed: int = 0  # bytes of flood sent so far, over all connections
    floods: int = 0  # connections that reached the flood


def _flood_chunks(kind: FloodKind, chunk: int) -> Iterator[bytes]:
    """The endless part of a hostile FETCH answer, `chunk` bytes at a time."""
    if kind == "literal":
        # One message whose header literal announces 2 GB and never ends.
        yield (b"* 1 FETCH (UID 1 RFC822.SIZE 900 BODY[HEADER.FIELDS (X-SELFCHECK-ROUTE "
               b"X-SELFCHECK-ID DATE)] {2000000000}\r\n")
        line = b"X-Filler: " + b"x" * 100 + b"\r\n"
        block = line * (chunk // len(line) + 1)
        while True:
            yield block
    elif kind == "line":
        # A response line that never reaches its CRLF.
        yield b"* 1 FETCH (UID 1 RFC822.SIZE 900 "
        block = b"a" * chunk
        while True:
            yield block
    else:
        # Well-formed answers, each small, that never end with the tagged OK.
        uid = 0
        while True:
            parts = []
            for _ in range(max(chunk // 1100, 1)):
                uid += 1
                body = b"X-Selfcheck-Route: default\r\n" + b"X-Pad: " + b"p" * 1000 + b"\r\n\r\n"
                parts.append(b"* %d FETCH (UID %d RFC822.SIZE 900 BODY[HEADER.FIELDS "
                             b"(X-SELFCHECK-ROUTE X-SELFCHECK-ID DATE)] {%d}\r\n%s)\r\n"
                             % (uid, uid, len(body), body))
            yield b"".join(parts)


@contextlib.asynccontextmanager
async def hostile_imap_server(
    flood: FloodKind, *, flood_on: bytes = b"UID FETCH", limit: int | None = None,
    chunk: int = 64 * 1024,
) -> AsyncIterator[HostileImap]:
    """An IMAP server that greets, logs in, selects and finds one candidate like any other,
    then answers the first command containing `flood_on` with a flood that never ends: a
    literal announced at 2 GB (`literal`), a line without CRLF (`line`) or an endless run
    of small, well-formed FETCH answers (`messages`). It streams as fast as the client
    reads, `limit` bytes at most per connection (then it falls silent), until the client
    hangs up."""
    state = HostileImap(port=0, flood=flood)
    writers: list[asyncio.StreamWriter] = []
    capabilities = b"IMAP4rev1 IDLE UIDPLUS"

    def answer(tag: bytes, command: bytes) -> bytes:
        verb = command.split(b" ", 1)[0].upper()
        if verb == b"CAPABILITY":
            return b"* CAPABILITY " + capabilities + b"\r\n" + tag + b" OK done\r\n"
        if verb == b"SELECT":
            return (b"* 1 EXISTS\r\n* OK [UIDVALIDITY 1] ok\r\n" + tag
                    + b" OK [READ-WRITE] selected\r\n")
        if command.upper().startswith(b"UID SEARCH"):
            return b"* SEARCH 1\r\n" + tag + b" OK done\r\n"
        if verb == b"LOGOUT":
            return b"* BYE bye\r\n" + tag + b" OK done\r\n"
        return tag + b" OK done\r\n"

    async def stream(writer: asyncio.StreamWriter) -> None:
        state.floods += 1
        sent = 0
        for block in _flood_chunks(flood, chunk):
            if limit is not None and sent + len(block) > limit:
                block = block[:limit - sent]
            writer.write(block)
            await writer.drain()
            sent += len(block)
            state.streamed += len(block)
            if limit is not None and sent >= limit:
                return

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        with contextlib.suppress(ConnectionError):
            writer.write(b"* OK [CAPABILITY " + capabilities + b"] hostile IMAP ready\r\n")
            await writer.drain()
            while line := await reader.readline():
                tag, _, command = line.rstrip(b"\r\n").partition(b" ")
                if flood_on.upper() in command.upper():
                    await stream(writer)
                    break
                writer.write(answer(tag, command))
                await writer.drain()
            await reader.read()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    state.port = server.sockets[0].getsockname()[1]
    try:
        yield state
    finally:
        server.close()
        for w in writers:
            w.close()
        await server.wait_closed()


@contextlib.asynccontextmanager
async def endless_smtp_reply_server() -> AsyncIterator[int]:
    """An SMTP server whose greeting (`220 ...`) never reaches its end of line."""
    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        with contextlib.suppress(ConnectionError):
            writer.write(b"220 ")
            while True:
                writer.write(b"a" * 65536)
                await writer.drain()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for w in writers:
            w.close()
        await server.wait_closed()
