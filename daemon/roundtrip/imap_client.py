"""An IMAP session for probes: aioimaplib with STARTTLS, deadlines and loss detection.

aioimaplib has no STARTTLS, does not fail pending commands when the connection
drops, and its `idle_start()` can wait forever on a server that closes instead
of answering. Every call here therefore races the command against a deadline
(the command timeout, or an absolute `until` such as the run's reception
deadline, whichever comes first) and against the connection-lost signal, so a
hung or vanished server is reported as an `ImapError` in bounded time.

A command that timed out or was abandoned leaves aioimaplib's protocol with a
command that never completes, so the session is then `usable` no more: the
caller drops it (`drop()`: no LOGOUT, nothing waits on the wedged peer) and
connects afresh.

Dropping also cancels aioimaplib's own background tasks and lets them unwind
on the running loop. Left alone, a session that failed between the greeting
and the CAPABILITY answer keeps two coroutines inside the protocol's
`asyncio.Condition` (`welcome()` holding the lock, `wait_hello_from_server()`
waiting to re-acquire it) forever; when the garbage collector closes them, the
second one's `async with` releases a lock it does not hold, and Python prints
`Exception ignored in: <coroutine ... welcome> RuntimeError: Lock is not
acquired.` through `sys.unraisablehook`, plus `Task was destroyed but it is
pending!` through the loop's exception handler.

What a server sends is read by our own parser (`_Protocol.data_received`), not
aioimaplib's, which has no bound at all: it keeps a literal of whatever size the
server announces, re-copies an unfinished line on every read (an endless line
grows quadratically) and recurses once per response line (a few thousand lines
in one read, e.g. a FETCH of 500 messages, end in RecursionError and a dropped
connection). Ours is a loop over the lines of each read that hands them to
aioimaplib's handlers as before, and holds at most `MAX_LINE` bytes of one line,
`MAX_LITERAL` of one literal and `MAX_RESPONSE` of everything read since the
last command completed. A server going past one of them is cut off and the
command fails with an `ImapError` naming the server and the limit
(docs/configuration.md, "What a mail server may send"). The parser uses
aioimaplib's private `Command` literal fields, hence the pin to aioimaplib 2.0.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import aioimaplib
import structlog

from daemon.config import ImapSettings, Security
from daemon.roundtrip.probe import PROBE_HEADER, ROUTE_HEADER, route_header_value
from daemon.roundtrip.tls import client_context, os_error_text

T = TypeVar("T")

log = structlog.get_logger("daemon.roundtrip")

_EXISTS = re.compile(rb"^\* \d+ EXISTS")
_FETCH_START = re.compile(rb"^\d+ FETCH \(")
_FETCH_UID = re.compile(rb"\bUID (\d+)")
_FETCH_SIZE = re.compile(rb"\bRFC822\.SIZE (\d+)")
_UIDVALIDITY = re.compile(rb"\[UIDVALIDITY (\d{1,10})\]", re.IGNORECASE)

# How long a dropped session's cancelled tasks get to unwind.
DROP_GRACE = 0.5
# LOGOUT is a courtesy: never worth more than this.
LOGOUT_TIMEOUT = 2.0
# UIDs per UID FETCH / UID STORE, so a mailbox full of decoys cannot make a
# command line longer than servers accept.
UID_CHUNK = 500

# What one server may make us hold; past any of these its connection is dropped and the
# command fails (docs/configuration.md). Every answer we need is far below them.
# One response line without its literals: a SEARCH answer of ~100,000 UIDs fits.
MAX_LINE = 1 << 20
# One literal: a probe is ~2 KB; the sweep downloads only messages it was told are at most
# MAX_PROBE_SIZE (256 KiB), and in batches of at most MAX_FETCH_BYTES.
MAX_LITERAL = 4 << 20
# Everything read since the last command completed (lines, literals, what is not parsed yet).
MAX_RESPONSE = 16 << 20
# Declared message bytes per UID FETCH of whole messages, well inside MAX_RESPONSE.
MAX_FETCH_BYTES = 4 << 20


class ReadLimitError(Exception):
    """The server sent more than a bound allows; the message says which and how much."""


def _mib(size: int) -> str:
    return f"{size / (1 << 20):g} MiB"


def _literal_size(line: bytes) -> int | None:
    """The size of the literal announced at the end of `line` (`... {123}`), else None.

    An announcement of more than twelve digits is returned as such a number's worth
    (over any limit) rather than parsed: int() refuses digit strings beyond 4,300.
    """
    if not line.endswith(b"}"):
        return None
    start = line.rfind(b"{")
    digits = line[start + 1:-1]
    if start < 0 or not digits.isdigit():
        return None
    return int(digits) if len(digits) <= 12 else 10**12


class _Protocol(aioimaplib.IMAP4ClientProtocol):  # type: ignore[misc]
    """Counts untagged EXISTS, which aioimaplib drops unless a NOOP is pending.

    A probe delivered while a SEARCH runs is announced in that SEARCH's
    response; without this count the following IDLE would wait for a push
    that already happened.
    """

    current_command: Any  # aioimaplib's: the command a line or literal in progress is for

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._rx = bytearray()  # read and not parsed yet: at most one unfinished line
        super().__init__(*args, **kwargs)
        self._scan_from = 0  # where in _rx the search for CRLF goes on
        # Bytes read since the last command completed (lines and literals handed to
        # aioimaplib, which keeps them in the command's answer), and the most that were
        # held at once, with what was not parsed yet.
        self.response_bytes = 0
        self.peak_buffered = 0
        # Why we stopped reading this server (a bound it went past, an answer that makes
        # no sense): the connection is dropped and the command fails with this.
        self.read_error: str | None = None
        # STARTTLS: what follows its tagged answer is left unparsed (it would be plain
        # text injected before the handshake) for the session to refuse.
        self.hold_after_tagged = False
        self._completed = False
        self.exists_seen = 0
        # Why the greeting or the CAPABILITY after it failed (`* BYE Too many
        # connections`, "server not IMAP4 compliant"). aioimaplib raises it in a task of
        # its own that nobody awaits: the caller waited for a state that never came
        # until its timeout, and the loop logged "Task exception was never retrieved".
        self.greeting_error: str | None = None
        self.greeting_failed = asyncio.Event()
        self.bye: str | None = None  # the server's last `* BYE ...`, whenever it came

    def _handle_line(self, line: bytes, current_cmd: Any) -> Any:
        if line[:5].upper() == b"* BYE":
            # Noted at once: the server closes right after, and "connection lost" alone
            # would hide why (`* BYE Internal error occurred`, too many connections).
            self.bye = line.decode(errors="replace").strip()[:200]
            if self.state == aioimaplib.CONNECTED:
                self._greeting_failed(self.bye)
        return super()._handle_line(line, current_cmd)

    async def welcome(self, command: bytes) -> None:
        try:
            await super().welcome(command)
        except Exception as exc:  # handed to connect(), which raises it
            self._greeting_failed(str(exc) or type(exc).__name__)

    def _greeting_failed(self, why: str) -> None:
        if self.greeting_error is None:
            self.greeting_error = why.strip()[:200]
        self.greeting_failed.set()

    def _untagged_response(self, line: bytes) -> Any:
        if _EXISTS.match(line):
            self.exists_seen += 1
        return super()._untagged_response(line)

    def _response_done(self, line: bytes) -> None:
        super()._response_done(line)
        self._completed = True
        self.response_bytes = 0  # that answer is now the caller's, not the reader's

    # -- the bounded reader ------------------------------------------------------------

    @property
    def incomplete_line(self) -> bytes:
        """What was read and not parsed yet (aioimaplib's name for it)."""
        return bytes(self._rx)

    @incomplete_line.setter
    def incomplete_line(self, value: bytes) -> None:
        self._rx = bytearray(value)

    @property
    def buffered(self) -> int:
        """Bytes held for the server now: the answer in progress and what is not parsed."""
        return self.response_bytes + len(self._rx)

    def data_received(self, data: bytes) -> None:
        if self.read_error is not None:
            return  # being dropped: nothing more is read
        self._rx += data
        self.peak_buffered = max(self.peak_buffered, self.buffered)
        try:
            if self.buffered > MAX_RESPONSE:
                raise ReadLimitError(f"server sent an answer larger than {_mib(MAX_RESPONSE)}")
            self._parse()
        except ReadLimitError as exc:
            self._give_up(f"{exc}; connection dropped")
        except aioimaplib.AioImapException as exc:  # an unexpected tagged answer and such
            self._give_up(f"unexpected answer ({exc}); connection dropped")

    def _parse(self) -> None:
        """Hand every complete line (and literal) read so far to aioimaplib's handlers.

        What aioimaplib's `_handle_responses` does, as a loop instead of one recursion
        per line, with the bounds checked before anything is kept.
        """
        rx = self._rx
        pos = 0
        cmd: Any = self.current_command
        try:
            while True:
                if cmd is not None and cmd.wait_literal_data():
                    need = cmd._expected_size - len(cmd._resp_literal_data)
                    piece = bytes(rx[pos:pos + need])
                    pos += len(piece)
                    self.response_bytes += len(piece)
                    cmd.append_literal_data(piece)
                    if cmd.wait_literal_data():
                        break
                end = rx.find(b"\r\n", max(pos, self._scan_from))
                self._scan_from = 0
                if (end if end >= 0 else len(rx)) - pos > MAX_LINE:
                    raise ReadLimitError(
                        f"server sent a response line longer than {_mib(MAX_LINE)}")
                if end < 0:
                    self._scan_from = max(len(rx) - pos - 1, 0)  # after the del below
                    break
                line = bytes(rx[pos:end])
                pos = end + 2
                self.response_bytes += len(line) + 2
                self._completed = False
                handled = self._handle_line(line, cmd)
                size = _literal_size(line)
                if size is not None:
                    if size > MAX_LITERAL:
                        raise ReadLimitError(f"server announced a literal of {size:,} bytes "
                                             f"(limit {_mib(MAX_LITERAL)})")
                    if handled is None:
                        handled = aioimaplib.Command("NIL", "unused", loop=self.loop)
                    handled.begin_literal_data(size)
                    cmd = handled
                elif handled is not None and handled.wait_data():
                    cmd = handled
                else:
                    cmd = None
                if self._completed and self.hold_after_tagged:
                    break
            if self.pending_sync_command is not None:
                self.pending_sync_command.flush()  # IDLE: hand the pushes read so far over
        finally:
            del rx[:pos]
            self.current_command = cmd

    def _give_up(self, why: str) -> None:
        """Stop reading this server: note why, free what it sent, drop the connection."""
        self.read_error = why
        self._rx = bytearray()
        for command in (self.current_command, self.pending_sync_command,
                        *self.pending_async_commands.values()):
            if command is not None:
                command._resp_lines.clear()
                command._end_literal_data()
        self.current_command = None
        self.response_bytes = 0
        if self.state == aioimaplib.CONNECTED:
            self._greeting_failed(why)
        if self.transport is not None:
            self.transport.abort()


class _Fetch(aioimaplib.FetchCommand):  # type: ignore[misc]
    """A FETCH that knows in O(1) whether a message's answer is still open.

    aioimaplib's `wait_data` rescans every line of the answer for each new one: a FETCH
    of a few thousand messages costs seconds of CPU with the event loop blocked. The
    rule is the same (a message's answer is open while its parentheses, counted on the
    text lines from its `n FETCH (` on, do not balance), kept as a running count.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._depth = 0

    def append_to_resp(self, line: bytes, result: str = "Pending") -> None:
        super().append_to_resp(line, result)
        if isinstance(line, bytes):  # literals come as bytearray (not bytes) and do not count
            if self.FETCH_MESSAGE_DATA_RE.match(line):
                self._depth = 0
            self._depth += line.count(b"(") - line.count(b")")

    def wait_data(self) -> bool:
        return self._depth != 0


class _Client(aioimaplib.IMAP4):  # type: ignore[misc]
    """aioimaplib's client with our protocol (implicit TLS when given a context)."""

    def create_client(
        self, host: str, port: int, loop: asyncio.AbstractEventLoop | None,
        conn_lost_cb: Any = None, ssl_context: Any = None,
    ) -> None:
        local_loop = loop if loop is not None else asyncio.get_running_loop()
        self.protocol = _Protocol(local_loop, conn_lost_cb)
        self._client_task = local_loop.create_task(
            local_loop.create_connection(lambda: self.protocol, host, port, ssl=ssl_context)
        )

    def background_tasks(self) -> list[asyncio.Future[Any]]:
        """aioimaplib's own tasks: greeting, IDLE and its ack, connection set-up."""
        tasks: list[asyncio.Future[Any]] = [*self.tasks, *self.protocol.tasks]
        if self._client_task is not None:
            tasks.append(self._client_task)
        return tasks

    def stop_timers(self) -> None:
        """Cancel aioimaplib's timers, which would otherwise keep the client alive."""
        if self._idle_waiter is not None:
            self._idle_waiter.cancel()
        protocol = self.protocol
        for command in (protocol.pending_sync_command, *protocol.pending_async_commands.values()):
            if command is not None:
                command._timer.cancel()


class ImapError(Exception):
    """An IMAP step failed; the message names the server and the step, never a secret."""


class ConnectionLostError(ImapError):
    """The server closed the connection (or it broke) while we were using it."""


@dataclass(frozen=True)
class Fetched:
    """One message of a UID FETCH: its UID, RFC822.SIZE when asked, and the literal."""

    uid: int
    size: int | None
    data: bytes


class ImapSession:
    """One authenticated connection with `mailbox` selected."""

    def __init__(
        self, settings: ImapSettings, clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.where = f"IMAP {settings.host}:{settings.port}"
        self._clock = clock
        self._client: _Client | None = None
        self._lost = asyncio.Event()
        self._lost_waiter: asyncio.Task[bool] | None = None
        # Set once a command timed out, failed in the protocol or was abandoned:
        # aioimaplib then still waits for its answer, so nothing else may be sent.
        self._broken = False
        self._tasks: set[asyncio.Future[Any]] = set()
        self.selected: str | None = None
        self.uidvalidity: int | None = None  # the selected mailbox's, when the server said it

    # -- plumbing ---------------------------------------------------------------------

    def _on_lost(self, _exc: Exception | None) -> None:
        self._lost.set()

    @property
    def client(self) -> _Client:
        if self._client is None:
            raise ImapError(f"{self.where}: not connected")
        return self._client

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    @property
    def usable(self) -> bool:
        """Connected, not lost, and no command left unanswered: safe to send the next one."""
        return self._client is not None and not self._lost.is_set() and not self._broken

    def _track(self, task: asyncio.Future[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _lost_signal(self) -> asyncio.Task[bool]:
        if self._lost_waiter is None or self._lost_waiter.done():
            self._lost_waiter = asyncio.ensure_future(self._lost.wait())
        return self._lost_waiter

    async def _call(
        self, step: str, aw: Awaitable[T], timeout: float | None = None,
        until: float | None = None,
    ) -> T:
        """Await `aw` unless its time is up or the connection drops first.

        The time is `timeout` (default: the command timeout), cut short by the
        absolute `until` (on this session's clock) when that comes first.
        """
        limit = self.settings.command_timeout if timeout is None else timeout
        cut_by_until = False
        if until is not None and until - self._clock() < limit:
            limit, cut_by_until = max(until - self._clock(), 0.0), True
        if not self.usable:
            if inspect.iscoroutine(aw):
                aw.close()  # never started: nothing was sent
            raise self._unusable(step)
        task = asyncio.ensure_future(aw)
        self._track(task)
        lost = self._lost_signal()
        try:
            done, _ = await asyncio.wait(
                {task, lost}, timeout=limit, return_when=asyncio.FIRST_COMPLETED
            )
        except asyncio.CancelledError:
            task.cancel()
            self._broken = True
            raise
        if task in done:
            try:
                return task.result()
            except aioimaplib.CommandTimeout:
                self._broken = True
                raise ImapError(self._no_answer(step, limit, cut_by_until)) from None
            except TimeoutError:  # aioimaplib's own wait_for, racing ours
                self._broken = True
                raise ImapError(self._no_answer(step, limit, cut_by_until)) from None
            except (aioimaplib.Abort, aioimaplib.Error) as exc:
                self._broken = True
                raise ImapError(f"{self.where}: {step}: {exc}") from None
            except OSError as exc:
                self._broken = True
                raise ImapError(f"{self.where}: {step}: {os_error_text(exc)}") from None
        task.cancel()
        self._broken = True
        if self._lost.is_set():
            raise self._lost_error(step)
        raise ImapError(self._no_answer(step, limit, cut_by_until))

    def _lost_error(self, step: str) -> ImapError:
        """Why the connection is gone: what the reader refused, the server's refusal, or
        a plain loss (with the server's BYE when it said one)."""
        protocol = self._client.protocol if self._client is not None else None
        if protocol is not None and protocol.read_error is not None:
            return ImapError(f"{self.where}: {step}: {protocol.read_error}")
        if protocol is not None and protocol.greeting_error is not None:
            return ImapError(f"{self.where}: {step}: {protocol.greeting_error}")
        return ConnectionLostError(f"{self.where}: connection lost during {step}{self._bye()}")

    def _bye(self) -> str:
        """`; the server said * BYE ...` when it did, for a lost connection's message."""
        bye = self._client.protocol.bye if self._client is not None else None
        return f"; the server said {bye}" if bye else ""

    def _no_answer(self, step: str, limit: float, cut_by_until: bool) -> str:
        if cut_by_until:
            return (f"{self.where}: {step}: no answer before the reception deadline "
                    f"(waited {limit:.1f}s); the server stopped responding")
        return f"{self.where}: {step}: no answer within {limit:g}s"

    def _unusable(self, step: str) -> ImapError:
        if self._lost.is_set():
            return ConnectionLostError(f"{self.where}: connection lost before {step}"
                                       f"{self._bye()}")
        return ImapError(f"{self.where}: {step}: session unusable after an unanswered command")

    @staticmethod
    def _ok(step: str, where: str, response: Any) -> Any:
        if response.result != "OK":
            text = b" ".join(response.lines).decode(errors="replace")[:200]
            raise ImapError(f"{where}: {step} failed: {response.result} {text}")
        return response

    # -- connection -------------------------------------------------------------------

    async def connect(self, select: bool = True) -> None:
        """Connect, upgrade to TLS as configured, log in and (unless told not to) select
        the configured mailbox."""
        s = self.settings
        timeout = s.connect_timeout
        self._client = _Client(
            host=s.host, port=s.port or 143, timeout=s.command_timeout,
            conn_lost_cb=self._on_lost,
            ssl_context=client_context(s) if s.security is Security.TLS else None,
        )
        await self._call("connect", self._hello(self._client), timeout)
        if s.security is Security.STARTTLS:
            await self._starttls(timeout)
        if s.username is not None:
            password = s.password.get_secret_value() if s.password else ""
            response = await self._call("login", self.client.login(s.username, password))
            self._ok("login", self.where, response)
        if self.client.get_state() not in ("AUTH", "SELECTED"):
            raise ImapError(f"{self.where}: not authenticated (set imap.username and password)")
        if select:
            await self.select(s.mailbox)

    @staticmethod
    async def _hello(client: _Client) -> None:
        """The greeting and CAPABILITY, or the reason the server gave for refusing us."""
        protocol: _Protocol = client.protocol
        hello = asyncio.ensure_future(client.wait_hello_from_server())
        refused = asyncio.ensure_future(protocol.greeting_failed.wait())
        try:
            await asyncio.wait({hello, refused}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (hello, refused):
                task.cancel()
        if protocol.greeting_error is not None:
            if hello.done() and not hello.cancelled():
                hello.exception()  # failed in the same turn: retrieved, so never "unretrieved"
            raise aioimaplib.Error(protocol.greeting_error)
        hello.result()

    async def select(self, mailbox: str, until: float | None = None) -> None:
        """SELECT `mailbox` (read-write: a probe found there may be deleted)."""
        self.selected = None  # a failed SELECT leaves no mailbox selected (RFC 3501 6.3.1)
        self.uidvalidity = None
        response = self._ok(f"select {mailbox}", self.where, await self._call(
            "select", self.client.select(_quote(mailbox)), until=until))
        self.selected = mailbox
        for line in response.lines:
            if match := _UIDVALIDITY.search(bytes(line)):
                self.uidvalidity = int(match.group(1))

    def ssl_object(self) -> Any:
        """The TLS connection's `ssl_object` (None when plain, or not connected)."""
        if self._client is None or self._client.protocol.transport is None:
            return None
        return self._client.protocol.transport.get_extra_info("ssl_object")

    async def _starttls(self, timeout: float) -> None:
        """RFC 3501 STARTTLS on aioimaplib's protocol: command, handshake, new CAPABILITY."""
        protocol = self.client.protocol
        if "STARTTLS" not in protocol.capabilities:
            # Never fall back to plain text: the password would cross the wire.
            raise ImapError(f"{self.where}: server does not offer STARTTLS")
        command = aioimaplib.Command("STARTTLS", protocol.new_tag(), loop=protocol.loop)
        protocol.hold_after_tagged = True
        try:
            self._ok("STARTTLS", self.where,
                     await self._call("STARTTLS", protocol.execute(command), timeout))
        finally:
            protocol.hold_after_tagged = False
        if protocol.incomplete_line:
            # Bytes after the tagged OK would be plaintext injected before the
            # handshake (CVE-2011-0411 style); refuse rather than parse them.
            self._broken = True
            raise ImapError(f"{self.where}: data received after STARTTLS response")
        loop = asyncio.get_running_loop()
        try:
            transport = await self._call(
                "TLS handshake",
                loop.start_tls(protocol.transport, protocol, client_context(self.settings),
                               server_hostname=self.settings.host),
                timeout,
            )
        except ImapError:
            raise
        except Exception as exc:  # ssl.SSLError and friends come out of the handshake
            self._broken = True
            raise ImapError(f"{self.where}: TLS handshake failed: {exc}") from None
        protocol.transport = transport
        # Capabilities must be re-read after the upgrade (RFC 3501 6.2.1).
        await self._call("CAPABILITY", protocol.capability(), timeout)

    async def close(self) -> None:
        """Log out politely if the session is healthy (briefly), then drop it."""
        client = self._client
        if client is None:
            return
        try:
            if self.usable and client.get_state() in ("AUTH", "SELECTED", "NONAUTH"):
                limit = min(LOGOUT_TIMEOUT, self.settings.command_timeout)
                await asyncio.wait_for(client.logout(), timeout=limit)
        except (aioimaplib.Error, aioimaplib.CommandTimeout, OSError, TimeoutError,
                ValueError) as exc:
            # A courtesy: the session is dropped below whatever the server says.
            log.debug("imap_logout_failed", where=self.where,
                      error=f"{type(exc).__name__}: {exc}")
        finally:
            await self.drop()

    async def drop(self) -> None:
        """Abandon the connection now: no LOGOUT, nothing waits on the peer.

        Every task still working on this connection (ours and aioimaplib's) is
        cancelled and given `DROP_GRACE` to unwind here, on the running loop,
        instead of being closed later by the garbage collector (see the module
        docstring).
        """
        client, self._client = self._client, None
        self._broken = True
        if client is None:
            return
        transport = client.protocol.transport
        if transport is not None:
            transport.abort()
        client.stop_timers()
        pending = [t for t in (*self._tasks, *client.background_tasks(), self._lost_waiter)
                   if t is not None and not t.done()]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=DROP_GRACE)

    def has_capability(self, name: str) -> bool:
        return name in self.client.protocol.capabilities

    @property
    def exists_seen(self) -> int:
        """How many untagged EXISTS the server has sent on this connection."""
        protocol: _Protocol = self.client.protocol
        return protocol.exists_seen

    # -- mailbox operations --------------------------------------------------------------

    async def search_header(self, header: str, value: str, until: float | None = None) -> list[int]:
        """UIDs of messages whose `header` contains `value` (a substring match: candidates)."""
        response = await self._call(
            "UID SEARCH", self.client.uid_search("HEADER", header, _quote(value), charset=None),
            until=until,
        )
        self._ok("UID SEARCH", self.where, response)
        return _search_uids(response.lines[:-1])

    async def search_route_probes(self, route: str) -> list[int]:
        """Candidates for `route`'s probes: the header in the 7-bit form probes carry."""
        return await self.search_header(ROUTE_HEADER, route_header_value(route))

    async def search_probe(self, run_id: str, until: float | None = None) -> list[int]:
        return await self.search_header(PROBE_HEADER, run_id, until)

    def _uid_fetch(self, uid_set: str, items: str) -> Awaitable[Any]:
        protocol = self.client.protocol
        command = _Fetch(protocol.new_tag(), uid_set, items, prefix="UID", loop=protocol.loop)
        fetch: Awaitable[Any] = protocol.execute(command)
        return fetch

    async def fetch_raw(self, uid: int) -> bytes:
        """The whole message, without setting \\Seen."""
        response = await self._call("UID FETCH", self._uid_fetch(str(uid), "(BODY.PEEK[])"))
        self._ok("UID FETCH", self.where, response)
        # aioimaplib hands the literal (the message) over as its own bytearray line.
        for line in response.lines:
            if isinstance(line, bytearray):
                return bytes(line)
        raise ImapError(f"{self.where}: UID FETCH {uid} returned no message body")

    async def fetch_many(self, uids: Iterable[int], items: str) -> list[Fetched]:
        """One UID FETCH of `items` (one literal, e.g. `BODY.PEEK[...]`) for all `uids`.

        `items` must not set \\Seen (use BODY.PEEK). Messages the server did not
        return (expunged meanwhile) are simply absent.
        """
        out: list[Fetched] = []
        for chunk in _chunks(sorted(set(uids))):
            uid_set = ",".join(str(u) for u in chunk)
            response = await self._call("UID FETCH", self._uid_fetch(uid_set, f"(UID {items})"))
            self._ok("UID FETCH", self.where, response)
            out += [m for m in _parse_fetch(response.lines[:-1]) if m.uid in chunk]
        return out

    async def delete(self, uids: list[int]) -> None:
        """Delete exactly `uids`: UID EXPUNGE with UIDPLUS, else a guarded EXPUNGE."""
        for chunk in _chunks(sorted(set(uids))):
            await self._delete(chunk)

    async def _delete(self, uids: list[int]) -> None:
        if not uids:
            return
        uid_set = ",".join(str(u) for u in uids)
        self._ok("UID STORE", self.where, await self._call(
            "UID STORE", self.client.uid("store", uid_set, "+FLAGS.SILENT", r"(\Deleted)")
        ))
        if self.has_capability("UIDPLUS"):
            self._ok("UID EXPUNGE", self.where,
                     await self._call("UID EXPUNGE", self.client.uid("expunge", uid_set)))
            return
        # Without UIDPLUS a plain EXPUNGE would also remove any other message a
        # user flagged \Deleted. Only expunge when ours are the only ones flagged.
        flagged = await self._call(
            "UID SEARCH", self.client.uid_search("DELETED", charset=None)
        )
        self._ok("UID SEARCH", self.where, flagged)
        others = set(_search_uids(flagged.lines[:-1])) - set(uids)
        if others:
            raise ImapError(
                f"{self.where}: no UIDPLUS and {len(others)} other message(s) are flagged "
                r"\Deleted; left the probe flagged rather than expunge them"
            )
        self._ok("EXPUNGE", self.where, await self._call("EXPUNGE", self.client.expunge()))

    async def list_mailboxes(self, until: float | None = None) -> list[Mailbox]:
        """Every mailbox (LIST "" "*"), with its attributes.

        With the SPECIAL-USE capability the server is asked for the special-use
        attributes (`RETURN (SPECIAL-USE)`, RFC 6154); without it, whatever
        attributes it sends anyway are kept.
        """
        protocol = self.client.protocol
        args = ['""', '"*"']
        if self.has_capability("SPECIAL-USE"):
            args += ["RETURN", "(SPECIAL-USE)"]
        command = aioimaplib.Command("LIST", protocol.new_tag(), *args, loop=protocol.loop)
        response = await self._call("LIST", protocol.execute(command), until=until)
        self._ok("LIST", self.where, response)
        return _parse_list(response.lines[:-1])

    async def noop(self, until: float | None = None) -> None:
        self._ok("NOOP", self.where, await self._call("NOOP", self.client.noop(), until=until))

    async def idle_until_change(self, wait_until: float, answer_until: float) -> None:
        """IDLE until the server pushes anything or `wait_until`, then DONE.

        Without IDLE, at once, when the last IDLE left pushes unread (the caller's next
        search covers them). Both are absolute times on the session's clock. The server must
        acknowledge IDLE by `wait_until` and answer DONE by `answer_until`;
        otherwise this raises `ImapError` and the session is no longer usable.
        """
        client = self.client
        # Pushes the last IDLE got after its first: the caller looks again before idling
        # (as it did when each ended an IDLE at once), and none is kept (aioimaplib's queue
        # has no bound: a server pushing without end grew it by each IDLE's pushes).
        queue = client.protocol.idle_queue
        if not queue.empty():
            while not queue.empty():
                queue.get_nowait()
            return
        # aioimaplib's own push timer only has to outlast ours.
        push_timer = max(wait_until - self._clock(), 0.0) + 60.0
        idle = await self._call("IDLE", client.idle_start(timeout=push_timer), until=wait_until)
        self._track(idle)
        try:
            await self._wait_push(client, wait_until)
        except BaseException:
            self._broken = True  # cancelled while IDLE is still on: nothing else may be sent
            raise
        if self._lost.is_set():
            self._broken = True
            raise self._lost_error("IDLE")
        if client.has_pending_idle():
            client.idle_done()
        # Wait for the tagged end of IDLE so the next command is not rejected.
        await self._call("IDLE done", idle, until=answer_until)

    async def _wait_push(self, client: _Client, until: float) -> None:
        """Until the server pushes a line, the connection drops, or `until`."""
        push: asyncio.Task[Any] = asyncio.ensure_future(client.protocol.idle_queue.get())
        self._track(push)
        try:
            await asyncio.wait(
                {push, self._lost_signal()}, timeout=max(until - self._clock(), 0.0),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            push.cancel()


@dataclass(frozen=True)
class Mailbox:
    """One LIST answer: the name as the server spells it (modified UTF-7) and its attributes."""

    name: str
    attributes: frozenset[str]  # lowercase, with the backslash: "\\junk", "\\noselect"

    @property
    def display_name(self) -> str:
        """The name for people: modified UTF-7 (RFC 3501 5.1.3) decoded."""
        return decode_mailbox_name(self.name)


_LIST_LINE = re.compile(
    rb'^(?:LIST )?\(([^)]*)\) (?:NIL|"(?:[^"\\]|\\.)*") ?(.*)$', re.IGNORECASE)
_LITERAL = re.compile(rb"^\{(\d+)\+?\}$")


def _parse_list(lines: Iterable[bytes]) -> list[Mailbox]:
    """LIST answers: `(attrs) "/" name`, the name an atom, a quoted string or a literal."""
    out: list[Mailbox] = []
    pending: bytes | None = None  # attributes of an answer whose name is the next literal
    for line in lines:
        if isinstance(line, bytearray):
            if pending is not None:
                out.append(Mailbox(bytes(line).decode(errors="replace"), _attrs(pending)))
                pending = None
            continue
        match = _LIST_LINE.match(bytes(line))
        if match is None:
            continue
        attrs, name = match.group(1), match.group(2).strip()
        if _LITERAL.match(name):
            pending = attrs
            continue
        if name.startswith(b'"') and name.endswith(b'"') and len(name) >= 2:
            name = re.sub(rb'\\(.)', rb"\1", name[1:-1])
        out.append(Mailbox(name.decode(errors="replace"), _attrs(attrs)))
    return out


def _attrs(raw: bytes) -> frozenset[str]:
    return frozenset(a.lower() for a in raw.decode(errors="replace").split())


def decode_mailbox_name(name: str) -> str:
    """Modified UTF-7 to text: `&` + base64 of UTF-16BE (`,` for `/`) + `-`; `&-` is `&`."""
    def shifted(match: re.Match[str]) -> str:
        body = match.group(1)
        if not body:
            return "&"
        data = body.replace(",", "/")
        data += "=" * (-len(data) % 4)
        try:
            return base64.b64decode(data).decode("utf-16-be")
        except (ValueError, UnicodeDecodeError):
            return match.group(0)

    return re.sub(r"&([A-Za-z0-9+,]*)-", shifted, name)


def _search_uids(lines: Iterable[bytes]) -> list[int]:
    uids: list[int] = []
    for line in lines:
        text = bytes(line).decode(errors="replace").removeprefix("SEARCH")
        uids += [int(tok) for tok in text.split() if tok.isdigit()]
    return uids


def _parse_fetch(lines: Iterable[bytes]) -> list[Fetched]:
    """Group aioimaplib's FETCH lines per message: text lines are bytes, literals bytearray."""
    messages: list[tuple[bytearray, list[bytes]]] = []
    for line in lines:
        if isinstance(line, bytearray):
            if messages:
                messages[-1][1].append(bytes(line))
        elif _FETCH_START.match(line):
            messages.append((bytearray(line), []))
        elif messages:
            messages[-1][0].extend(b" " + line)
    out: list[Fetched] = []
    for text, literals in messages:
        uid = _FETCH_UID.search(text)
        if uid is None or not literals:
            continue  # an unsolicited FETCH (a flag change), not an answer to ours
        size = _FETCH_SIZE.search(text)
        out.append(Fetched(int(uid.group(1)), int(size.group(1)) if size else None, literals[0]))
    return out


def _chunks(uids: list[int]) -> list[list[int]]:
    return [uids[i:i + UID_CHUNK] for i in range(0, len(uids), UID_CHUNK)]


def _quote(value: str) -> str:
    """An IMAP quoted string (RFC 3501): backslash-escape quotes and backslashes."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
