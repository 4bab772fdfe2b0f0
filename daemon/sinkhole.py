"""`selfcheckd sinkhole`: the test harness's SMTP listener (Cabalmail's sinkhole), on aiosmtpd.

Its answer to every recipient depends on a mode, read from an SSM parameter
(`/cabal/sinkhole_mode`) or from a file (its first word), re-read on each new
connection through a cache of `mode_cache` seconds:

* `defer`: 421 4.3.2 to every RCPT (the default, and what any unknown value,
  an unreadable file or an unreachable SSM means: never accept by accident);
* `bounce`: 550 5.1.1 to every RCPT;
* `accept`: 250, the message is discarded;
* `accept-log`: 250, and the envelope and headers (never the body) printed as
  one JSON line on stdout;
* `greylist`: 421 on a client IP's first attempt, 250 on its attempts within
  the next 30 minutes.

No EHLO extensions, no TLS, no AUTH, as the harness plan says. Memory is
bounded whatever a client sends: a message size limit (aiosmtpd drops the data
past it), a recipient limit per message, a connection limit, an idle timeout,
and a bounded greylist table.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from email.policy import compat32
from pathlib import Path
from typing import Any, Protocol, TextIO

import structlog
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from aiosmtpd.smtp import SMTP, Envelope, Session

log = structlog.get_logger("daemon.sinkhole")

MODES = ("defer", "bounce", "accept", "accept-log", "greylist")
DEFAULT_MODE = "defer"

DEFER_REPLY = "421 4.3.2 Service temporarily unavailable"
BOUNCE_REPLY = "550 5.1.1 User unknown"
RCPT_OK = "250 2.1.5 OK"
ACCEPT_REPLY = "250 2.0.0 Message accepted for discard"
TOO_MANY_RCPTS = "452 4.5.3 Too many recipients"
TOO_MANY_CONNECTIONS = "421 4.3.2 Too many connections, try again later"

MODE_CACHE = 30.0  # seconds a mode reading is reused (the harness plan's cache)
GREYLIST_WINDOW = 30 * 60.0  # after a first refused attempt, an IP passes for this long
MAX_GREYLIST_ENTRIES = 10_000
MAX_MESSAGE_SIZE = 10 * 1024 * 1024
MAX_HEADER_BYTES = 64 * 1024  # what accept-log parses and prints of a message's head
MAX_RECIPIENTS = 100
MAX_CONNECTIONS = 100
IDLE_TIMEOUT = 60.0
READ_TIMEOUT = 5.0  # one mode read (SSM call or file read), all retries included

Clock = Callable[[], float]


class ModeSource(Protocol):
    """Where the mode is read from."""

    def describe(self) -> str:
        """What is read, for log lines (`ssm:/cabal/sinkhole_mode`, `file:/path`)."""

    async def read(self) -> str:
        """The raw value; raises on any failure to read."""


@dataclass(frozen=True)
class FileModeSource:
    """The mode as the first word of a file (what a local cluster or the demo flips)."""

    path: Path

    def describe(self) -> str:
        return f"file:{self.path}"

    async def read(self) -> str:
        text = await asyncio.to_thread(_read_head, self.path)
        words = text.split()
        return words[0] if words else ""


def _read_head(path: Path) -> str:
    with path.open("rb") as fh:  # a mode is one word: never read a huge file whole
        return fh.read(256).decode("utf-8", errors="replace")


@dataclass(frozen=True)
class SsmModeSource:
    """The mode as an SSM parameter (`/cabal/sinkhole_mode`), one GetParameter per read."""

    parameter: str
    region: str | None = None
    endpoint_url: str | None = None
    timeout: float = READ_TIMEOUT

    def describe(self) -> str:
        return f"ssm:{self.parameter}"

    async def read(self) -> str:
        config = AioConfig(retries={"mode": "standard", "max_attempts": 2},
                           connect_timeout=self.timeout, read_timeout=self.timeout)
        async with asyncio.timeout(self.timeout), get_session().create_client(
                "ssm", region_name=self.region, endpoint_url=self.endpoint_url,
                config=config) as client:
            resp = await client.get_parameter(Name=self.parameter)
        return str(resp["Parameter"]["Value"])


class ModeCache:
    """The current mode: read through `source` at most once per `ttl` seconds.

    A failed read or an unknown value is `defer` (with a warning, once per
    distinct problem): a sinkhole that cannot tell must never accept.
    """

    def __init__(self, source: ModeSource, ttl: float = MODE_CACHE,
                 clock: Clock = time.monotonic, timeout: float = READ_TIMEOUT) -> None:
        self.source = source
        self.ttl = ttl
        self.clock = clock
        self.timeout = timeout
        self._value: str | None = None
        self._read_at = 0.0
        self._lock = asyncio.Lock()
        self._warned: str | None = None
        self.reads = 0

    async def current(self) -> str:
        async with self._lock:  # one read at a time, however many connections arrive
            now = self.clock()
            if self._value is None or now - self._read_at >= self.ttl:
                self._value = await self._read()
                self._read_at = self.clock()
            return self._value

    async def _read(self) -> str:
        self.reads += 1
        try:
            async with asyncio.timeout(self.timeout):
                raw = await self.source.read()
        except Exception as exc:  # any failure means "defer" (said once), never a crash
            self._warn("sinkhole_mode_unreadable", f"{type(exc).__name__}",
                       error=f"{type(exc).__name__}: {exc}"[:300])
            return DEFAULT_MODE
        mode = raw.strip().lower()
        if mode not in MODES:
            self._warn("sinkhole_mode_unknown", f"unknown:{mode}", value=mode[:100])
            return DEFAULT_MODE
        if self._warned is not None:
            log.info("sinkhole_mode_readable_again", source=self.source.describe(), mode=mode)
            self._warned = None
        return mode

    def _warn(self, event: str, key: str, **fields: Any) -> None:
        if self._warned != key:
            self._warned = key
            log.warning(event, source=self.source.describe(), answering=DEFAULT_MODE, **fields)


class Greylist:
    """Client IPs seen refused once: each passes for `window` seconds after its first try."""

    def __init__(self, clock: Clock, window: float = GREYLIST_WINDOW,
                 max_entries: int = MAX_GREYLIST_ENTRIES) -> None:
        self.clock = clock
        self.window = window
        self.max_entries = max_entries
        self._first: OrderedDict[str, float] = OrderedDict()

    def passes(self, ip: str) -> bool:
        """True when `ip` tried before within the window; otherwise its try is recorded."""
        now = self.clock()
        first = self._first.get(ip)
        if first is not None and now - first <= self.window:
            return True
        self._first.pop(ip, None)
        self._first[ip] = now
        while len(self._first) > self.max_entries:
            self._first.popitem(last=False)  # the oldest attempt goes first
        return False


class SinkholeHandler:
    """aiosmtpd handler: one mode per connection, answered on every RCPT."""

    def __init__(self, modes: ModeCache, *, clock: Clock = time.monotonic,
                 out: TextIO | None = None, max_recipients: int = MAX_RECIPIENTS,
                 wall: Clock = time.time) -> None:
        self.modes = modes
        self.greylist = Greylist(clock)
        self.out = out
        self.max_recipients = max_recipients
        self.wall = wall
        # The mode (and greylist verdict) each open connection was given at its first RCPT.
        self._session_mode: dict[int, str] = {}
        self.accepted = 0

    async def handle_EHLO(  # noqa: N802 - aiosmtpd's hook name
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        return [f"250 {server.hostname}"]  # no extensions: no SIZE, no 8BITMIME, no AUTH

    async def _mode_of(self, session: Session) -> str:
        key = id(session)
        mode = self._session_mode.get(key)
        if mode is None:
            mode = await self.modes.current()
            if mode == "greylist":
                ip = str(session.peer[0]) if isinstance(session.peer, tuple) else "?"
                mode = "accept" if self.greylist.passes(ip) else "defer"
            self._session_mode[key] = mode
        return mode

    def forget(self, session: Session) -> None:
        self._session_mode.pop(id(session), None)

    async def handle_RCPT(  # noqa: N802 - aiosmtpd's hook name
        self, server: SMTP, session: Session, envelope: Envelope, address: str,
        rcpt_options: list[str],
    ) -> str:
        mode = await self._mode_of(session)
        if mode == "defer":
            return DEFER_REPLY
        if mode == "bounce":
            return BOUNCE_REPLY
        if len(envelope.rcpt_tos) >= self.max_recipients:
            return TOO_MANY_RCPTS
        envelope.rcpt_tos.append(address)
        return RCPT_OK

    async def handle_DATA(  # noqa: N802 - aiosmtpd's hook name
        self, server: SMTP, session: Session, envelope: Envelope,
    ) -> str:
        mode = await self._mode_of(session)
        self.accepted += 1
        if mode == "accept-log":
            self._log_accepted(session, envelope)
        return ACCEPT_REPLY

    def _log_accepted(self, session: Session, envelope: Envelope) -> None:
        content = envelope.original_content or b""
        head = _header_block(content)
        parsed = BytesHeaderParser(policy=compat32).parsebytes(head)
        record = {
            "event": "accepted",
            "at": self.wall(),
            "peer": session.peer[0] if isinstance(session.peer, tuple) else None,
            "helo": session.host_name,
            "mail_from": envelope.mail_from,
            "rcpt_tos": list(envelope.rcpt_tos),
            "size": len(content),
            "headers": [[name, str(value)] for name, value in parsed.items()],
        }
        out = self.out if self.out is not None else sys.stdout
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
        out.flush()


def _header_block(content: bytes) -> bytes:
    """The message's head (up to its first empty line), at most MAX_HEADER_BYTES."""
    head = content[:MAX_HEADER_BYTES]
    for sep in (b"\r\n\r\n", b"\n\n"):
        end = head.find(sep)
        if end >= 0:
            return head[:end + len(sep)]
    return head  # no body (or a head past the cap): what we have, never more


class _SinkholeSMTP(SMTP):
    """aiosmtpd's protocol with a connection limit and the per-connection mode forgotten."""

    def __init__(self, handler: SinkholeHandler, counter: list[int], max_connections: int,
                 **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._sinkhole = handler
        self._counter = counter
        self._max_connections = max_connections
        self._counted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._counter[0] >= self._max_connections:
            assert isinstance(transport, asyncio.WriteTransport)
            transport.write(f"{TOO_MANY_CONNECTIONS}\r\n".encode())
            transport.close()
            return
        self._counter[0] += 1
        self._counted = True
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if not self._counted:
            return
        self._counted = False
        self._counter[0] -= 1
        if self.session is not None:
            self._sinkhole.forget(self.session)
        super().connection_lost(error)


@dataclass(frozen=True)
class ListenerOptions:
    host: str
    port: int
    max_message_size: int = MAX_MESSAGE_SIZE
    max_connections: int = MAX_CONNECTIONS
    idle_timeout: float = IDLE_TIMEOUT
    hostname: str = "sinkhole.localdomain"


@contextlib.asynccontextmanager
async def run_sinkhole(handler: SinkholeHandler,
                       options: ListenerOptions) -> AsyncIterator[tuple[str, int]]:
    """Listen until the block ends; yields the bound (host, port) (port 0 picks one)."""
    loop = asyncio.get_running_loop()
    counter = [0]

    def protocol() -> SMTP:
        return _SinkholeSMTP(handler, counter, options.max_connections,
                             data_size_limit=options.max_message_size,
                             hostname=options.hostname, ident="selfcheckd sinkhole",
                             timeout=options.idle_timeout, enable_SMTPUTF8=True)

    server = await loop.create_server(protocol, options.host, options.port)
    try:
        sock = server.sockets[0].getsockname()
        yield str(sock[0]), int(sock[1])
    finally:
        server.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2.0):
                await server.wait_closed()


def parse_listen(value: str) -> tuple[str, int]:
    """HOST:PORT (HOST may be [v6]); ValueError naming the rule."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--listen {value!r}: must be HOST:PORT with PORT 0-65535")
    return host.strip("[]"), int(port)


async def serve_until(stop: Awaitable[Any], handler: SinkholeHandler,
                      options: ListenerOptions) -> None:
    async with run_sinkhole(handler, options) as (host, port):
        log.info("sinkhole_listening", listen=f"{host}:{port}",
                 mode_source=handler.modes.source.describe(), mode_cache=handler.modes.ttl)
        await stop
    log.info("sinkhole_stopped", accepted=handler.accepted)


def run_command(args: Any) -> int:
    """`selfcheckd sinkhole`: listen until SIGTERM or Ctrl-C. Exit 2 bad arguments, 3 no bind."""
    import signal

    try:
        host, port = parse_listen(args.listen)
    except ValueError as exc:
        print(f"selfcheckd sinkhole: {exc}", file=sys.stderr)
        return 2
    source: ModeSource
    if args.mode_file is not None:
        source = FileModeSource(args.mode_file)
    else:
        source = SsmModeSource(args.mode_parameter, region=args.region,
                               endpoint_url=args.endpoint_url)
    handler = SinkholeHandler(ModeCache(source, ttl=args.mode_cache))
    options = ListenerOptions(host=host, port=port, max_message_size=args.max_message_size)

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await serve_until(stop.wait(), handler, options)
        except OSError as exc:
            print(f"selfcheckd sinkhole: cannot listen on {args.listen}: "
                  f"{exc.strerror or exc}", file=sys.stderr)
            return 3
        return 0

    return asyncio.run(main())
