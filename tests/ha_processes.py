"""Real `selfcheckd run` processes for the two-task tests, and a TCP proxy that can cut one off.

`Proc` starts the daemon as ECS would (its own process, SIGTERM/SIGKILL), reads its JSON
log lines as they come and asks its /status. `Cutter` is a TCP proxy in front of moto:
`cut()` stops forwarding (connections stay open, bytes are held, new ones are accepted
and held too), `heal()` forwards what was held, late, as a network that delayed packets
would. `LeakFeed` writes leak lines into moto's CloudWatch Logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiobotocore.session import get_session

from tests.logwatch.aws_fakes import AWS_ENV

GROUP = "/ecs/cabal-smtp-out"
STREAM = "smtp-out/smtp-out/abc"
LEAK = ("2026-11-23T19:31:53.567357+00:00 ip-10-0-1-5 sendmail[11287]: {qid}: to=<{rcpt}>, "
        "delay=00:00:00, xdelay=00:00:00, mailer=smtp, pri=30237, relay=25, dsn=5.1.2, "
        "stat=Deferred")


class Proc:
    """One `selfcheckd run` process and what it has logged so far."""

    def __init__(self, name: str, config: Path, env: dict[str, str]) -> None:
        self.name = name
        self.config = config
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self.port: int | None = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> Proc:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "daemon.cli", "run", "--config", str(self.config),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, **AWS_ENV, **self.env})
        self._reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            text = line.decode(errors="replace").rstrip("\n")
            self.raw.append(text)
            try:
                entry = json.loads(text)
            except ValueError:
                continue
            if not isinstance(entry, dict):
                continue
            self.lines.append(entry)
            if entry.get("event") == "selfcheckd_started":
                self.port = int(str(entry["listen"]).rpartition(":")[2])

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.lines if e.get("event") == name]

    def first(self, name: str) -> dict[str, Any] | None:
        found = self.events(name)
        return found[0] if found else None

    async def status(self) -> dict[str, Any] | None:
        """/status, or None while it does not answer."""
        if self.port is None:
            return None
        try:
            async with aiohttp.ClientSession() as http, http.get(
                    f"http://127.0.0.1:{self.port}/status",
                    timeout=aiohttp.ClientTimeout(total=2)) as resp:
                body: dict[str, Any] = await resp.json()
                return body
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None

    async def role(self) -> str | None:
        status = await self.status()
        return None if status is None else str(status["role"])

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait(self, timeout: float) -> int:
        assert self.proc is not None
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        if self._reader is not None:
            await asyncio.wait_for(self._reader, 5)
        return code

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within 15 s (a clean stop closes its
        IMAP sessions before the test's mail stack goes away)."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 15)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self._reader is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._reader, 5)

    def log_text(self) -> str:
        return "\n".join(self.raw[-200:])


def stamp(entry: dict[str, Any]) -> float:
    """The epoch time of a JSON log line's `timestamp` (ISO 8601, UTC)."""
    from datetime import datetime

    return datetime.fromisoformat(str(entry["timestamp"]).replace("Z", "+00:00")).timestamp()


@dataclass
class LeakFeed:
    """Writes one leak line every `every` s into moto's CloudWatch Logs, numbered."""

    endpoint: str
    every: float = 0.25
    written: list[tuple[str, str]] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None

    async def setup(self) -> None:
        async with self._client() as client:
            await client.create_log_group(logGroupName=GROUP)
            await client.create_log_stream(logGroupName=GROUP, logStreamName=STREAM)

    def _client(self) -> Any:
        return get_session().create_client("logs", region_name="us-east-1",
                                           endpoint_url=self.endpoint)

    async def write(self, count: int = 1) -> None:
        async with self._client() as client:
            for _ in range(count):
                n = len(self.written) + 1
                qid, rcpt = f"HAqq{n:04d}{n:06d}", f"leak-{n}@sinkhole.test"
                await client.put_log_events(
                    logGroupName=GROUP, logStreamName=STREAM,
                    logEvents=[{"timestamp": int(time.time() * 1000),
                                "message": LEAK.format(qid=qid, rcpt=rcpt)}])
                self.written.append((qid, rcpt))

    def start(self) -> None:
        async def feed() -> None:
            while True:
                await self.write()
                await asyncio.sleep(self.every)
        self._task = asyncio.create_task(feed())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


class Cutter:
    """A TCP proxy to `upstream` (host, port) whose forwarding can be cut and healed."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.open = asyncio.Event()
        self.open.set()
        self.server: asyncio.Server | None = None
        self.port = 0
        self.held_bytes = 0  # read while cut: forwarded late at heal
        self.late_answers: list[bytes] = []  # first line of each answer to late bytes
        self._tasks: set[asyncio.Task[None]] = set()
        self._late = False

    async def start(self) -> Cutter:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cut(self) -> None:
        self.open.clear()

    def heal(self) -> None:
        self._late = True
        self.open.set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        up_writer: asyncio.StreamWriter | None = None
        try:
            late = [not self.open.is_set()]  # made while cut: all of it arrives late
            # What the client sends while cut is in the network: held and delivered at
            # heal even if the client gives up and resets the connection meanwhile.
            held = await self._hold(reader) if late[0] else b""
            self.held_bytes += len(held)
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            if held:
                up_writer.write(held)
                await up_writer.drain()

            async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                           answers: bool) -> None:
                try:
                    while data := await src.read(65536):
                        if not self.open.is_set():
                            self.held_bytes += len(data)
                            late[0] = True
                        await self.open.wait()
                        if answers and late[0]:
                            self.late_answers.append(data.split(b"\r\n", 1)[0])
                        dst.write(data)
                        with contextlib.suppress(ConnectionError):
                            await dst.drain()
                finally:
                    with contextlib.suppress(Exception):
                        dst.write_eof()

            await asyncio.gather(pipe(reader, up_writer, False),
                                 pipe(up_reader, writer, True), return_exceptions=True)
        except OSError:
            pass
        finally:
            for w in (writer, up_writer):
                if w is not None:
                    w.close()
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(w.wait_closed(), 1)
            self._tasks.discard(task)

    async def _hold(self, reader: asyncio.StreamReader) -> bytes:
        """Read what a connection made while cut sends, until the heal."""
        held = bytearray()

        async def read() -> None:
            with contextlib.suppress(OSError):  # a reset: what came before it is held
                while data := await reader.read(65536):
                    held.extend(data)

        reading = asyncio.ensure_future(read())
        healed = asyncio.ensure_future(self.open.wait())
        await asyncio.wait({reading, healed}, return_when=asyncio.FIRST_COMPLETED)
        if not healed.done():  # the client closed first: its bytes still arrive at heal
            await healed
        reading.cancel()
        await asyncio.wait({reading})
        return bytes(held)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)


@contextlib.asynccontextmanager
async def processes(*procs: Proc) -> AsyncIterator[tuple[Proc, ...]]:
    """Start all at the same instant; kill whatever is left at the end."""
    try:
        await asyncio.gather(*(p.start() for p in procs))
        yield procs
    finally:
        await asyncio.gather(*(p.stop() for p in procs))


async def wait_started(*procs: Proc, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while any(p.port is None for p in procs):
        for p in procs:
            if p.proc is not None and p.proc.returncode is not None:
                raise AssertionError(f"{p.name} exited {p.proc.returncode}:\n{p.log_text()}")
        if time.monotonic() > deadline:
            raise AssertionError("not started:\n" + "\n".join(p.log_text() for p in procs))
        await asyncio.sleep(0.05)
