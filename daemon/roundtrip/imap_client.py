"""An IMAP session for probes: aioimaplib with STARTTLS, deadlines and loss detection.

aioimaplib has no STARTTLS, does not fail pending commands when the connection
drops, and its `idle_start()` can wait forever on a server that closes instead
of answering. Every call here therefore races the command against a deadline
and against the connection-lost signal, so a hung or vanished server costs at
most `command_timeout` and is reported as an `ImapError`.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable
from typing import Any, TypeVar

import aioimaplib

from daemon.config import ImapSettings, Security
from daemon.roundtrip.probe import PROBE_HEADER, ROUTE_HEADER
from daemon.roundtrip.tls import client_context

T = TypeVar("T")

_EXISTS = re.compile(rb"^\* \d+ EXISTS")


class _Protocol(aioimaplib.IMAP4ClientProtocol):  # type: ignore[misc]
    """Counts untagged EXISTS, which aioimaplib drops unless a NOOP is pending.

    A probe delivered while a SEARCH runs is announced in that SEARCH's
    response; without this count the following IDLE would wait for a push
    that already happened.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.exists_seen = 0

    def _untagged_response(self, line: bytes) -> Any:
        if _EXISTS.match(line):
            self.exists_seen += 1
        return super()._untagged_response(line)


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

class ImapError(Exception):
    """An IMAP step failed; the message names the server and the step, never a secret."""


class ConnectionLostError(ImapError):
    """The server closed the connection (or it broke) while we were using it."""


class ImapSession:
    """One authenticated connection with `mailbox` selected."""

    def __init__(self, settings: ImapSettings) -> None:
        self.settings = settings
        self.where = f"IMAP {settings.host}:{settings.port}"
        self._client: _Client | None = None
        self._lost = asyncio.Event()
        self._lost_waiter: asyncio.Task[bool] | None = None

    # -- plumbing ---------------------------------------------------------------------

    def _on_lost(self, _exc: Exception | None) -> None:
        self._lost.set()

    @property
    def client(self) -> _Client:
        if self._client is None:
            raise ImapError(f"{self.where}: not connected")
        return self._client

    async def _call(self, step: str, aw: Awaitable[T], timeout: float | None = None) -> T:
        """Await `aw` unless the deadline passes or the connection drops first."""
        limit = self.settings.command_timeout if timeout is None else timeout
        task = asyncio.ensure_future(aw)
        if self._lost_waiter is None or self._lost_waiter.done():
            self._lost_waiter = asyncio.ensure_future(self._lost.wait())
        try:
            done, _ = await asyncio.wait(
                {task, self._lost_waiter}, timeout=limit, return_when=asyncio.FIRST_COMPLETED
            )
        except asyncio.CancelledError:
            task.cancel()
            raise
        if task in done:
            try:
                return task.result()
            except aioimaplib.CommandTimeout:
                raise ImapError(f"{self.where}: {step}: no answer within {limit:g}s") from None
            except (aioimaplib.Abort, aioimaplib.Error) as exc:
                raise ImapError(f"{self.where}: {step}: {exc}") from None
            except OSError as exc:
                raise ImapError(f"{self.where}: {step}: {exc.strerror or exc}") from None
        task.cancel()
        if self._lost.is_set():
            raise ConnectionLostError(f"{self.where}: connection lost during {step}")
        raise ImapError(f"{self.where}: {step}: no answer within {limit:g}s")

    @staticmethod
    def _ok(step: str, where: str, response: Any) -> Any:
        if response.result != "OK":
            text = b" ".join(response.lines).decode(errors="replace")[:200]
            raise ImapError(f"{where}: {step} failed: {response.result} {text}")
        return response

    # -- connection -------------------------------------------------------------------

    async def connect(self) -> None:
        """Connect, upgrade to TLS as configured, log in and select the mailbox."""
        s = self.settings
        timeout = s.connect_timeout
        self._client = _Client(
            host=s.host, port=s.port or 143, timeout=s.command_timeout,
            conn_lost_cb=self._on_lost,
            ssl_context=client_context(s) if s.security is Security.TLS else None,
        )
        await self._call("connect", self._client.wait_hello_from_server(), timeout)
        if s.security is Security.STARTTLS:
            await self._starttls(timeout)
        if s.username is not None:
            password = s.password.get_secret_value() if s.password else ""
            response = await self._call("login", self.client.login(s.username, password))
            self._ok("login", self.where, response)
        if self.client.get_state() not in ("AUTH", "SELECTED"):
            raise ImapError(f"{self.where}: not authenticated (set imap.username and password)")
        self._ok("select", self.where,
                 await self._call("select", self.client.select(_quote(s.mailbox))))

    async def _starttls(self, timeout: float) -> None:
        """RFC 3501 STARTTLS on aioimaplib's protocol: command, handshake, new CAPABILITY."""
        protocol = self.client.protocol
        if "STARTTLS" not in protocol.capabilities:
            # Never fall back to plain text: the password would cross the wire.
            raise ImapError(f"{self.where}: server does not offer STARTTLS")
        command = aioimaplib.Command("STARTTLS", protocol.new_tag(), loop=protocol.loop)
        self._ok("STARTTLS", self.where,
                 await self._call("STARTTLS", protocol.execute(command), timeout))
        if protocol.incomplete_line:
            # Bytes after the tagged OK would be plaintext injected before the
            # handshake (CVE-2011-0411 style); refuse rather than parse them.
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
            raise ImapError(f"{self.where}: TLS handshake failed: {exc}") from None
        protocol.transport = transport
        # Capabilities must be re-read after the upgrade (RFC 3501 6.2.1).
        await self._call("CAPABILITY", protocol.capability(), timeout)

    async def close(self) -> None:
        """Log out politely within a short deadline, then drop the connection regardless."""
        client, self._client = self._client, None
        if client is None:
            return
        try:
            if not self._lost.is_set() and client.get_state() in ("AUTH", "SELECTED", "NONAUTH"):
                await asyncio.wait_for(client.logout(), timeout=2.0)
        except Exception:  # noqa: S110 - best effort; the transport is closed below
            pass
        finally:
            transport = client.protocol.transport
            if transport is not None:
                transport.close()
            if self._lost_waiter is not None:
                self._lost_waiter.cancel()

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    def has_capability(self, name: str) -> bool:
        return name in self.client.protocol.capabilities

    @property
    def exists_seen(self) -> int:
        """How many untagged EXISTS the server has sent on this connection."""
        protocol: _Protocol = self.client.protocol
        return protocol.exists_seen

    # -- mailbox operations --------------------------------------------------------------

    async def search_header(self, header: str, value: str) -> list[int]:
        """UIDs of messages whose `header` contains `value`."""
        response = await self._call(
            "UID SEARCH", self.client.uid_search("HEADER", header, _quote(value), charset=None)
        )
        self._ok("UID SEARCH", self.where, response)
        uids: list[int] = []
        for line in response.lines[:-1]:
            text = line.decode(errors="replace").removeprefix("SEARCH")
            uids += [int(tok) for tok in text.split() if tok.isdigit()]
        return uids

    async def search_route_probes(self, route: str) -> list[int]:
        return await self.search_header(ROUTE_HEADER, route)

    async def search_probe(self, run_id: str) -> list[int]:
        return await self.search_header(PROBE_HEADER, run_id)

    async def fetch_raw(self, uid: int) -> bytes:
        """The whole message, without setting \\Seen."""
        response = await self._call(
            "UID FETCH", self.client.uid("fetch", str(uid), "(BODY.PEEK[])")
        )
        self._ok("UID FETCH", self.where, response)
        # aioimaplib hands the literal (the message) over as its own bytearray line.
        for line in response.lines:
            if isinstance(line, bytearray):
                return bytes(line)
        raise ImapError(f"{self.where}: UID FETCH {uid} returned no message body")

    async def fetch_headers(self, uid: int, *names: str) -> bytes:
        fields = " ".join(names)
        items = f"(BODY.PEEK[HEADER.FIELDS ({fields})])"
        response = await self._call("UID FETCH", self.client.uid("fetch", str(uid), items))
        self._ok("UID FETCH", self.where, response)
        literals = [bytes(x) for x in response.lines if isinstance(x, bytearray)]
        return literals[0] if literals else b""

    async def delete(self, uids: list[int]) -> None:
        """Delete exactly `uids`: UID EXPUNGE with UIDPLUS, else a guarded EXPUNGE."""
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
        others = {
            int(tok) for line in flagged.lines[:-1]
            for tok in line.decode(errors="replace").split() if tok.isdigit()
        } - set(uids)
        if others:
            raise ImapError(
                f"{self.where}: no UIDPLUS and {len(others)} other message(s) are flagged "
                r"\Deleted; left the probe flagged rather than expunge them"
            )
        self._ok("EXPUNGE", self.where, await self._call("EXPUNGE", self.client.expunge()))

    async def noop(self) -> None:
        self._ok("NOOP", self.where, await self._call("NOOP", self.client.noop()))

    async def idle_until_change(self, timeout: float) -> None:
        """IDLE until the server pushes anything or `timeout` passes, then DONE."""
        client = self.client
        idle = await self._call("IDLE", client.idle_start(timeout=max(timeout, 0.01)))
        try:
            await self._call("IDLE wait", client.wait_server_push(timeout=timeout + 1.0),
                             timeout=timeout)
        except ConnectionLostError:
            raise
        except ImapError:
            pass  # nothing pushed within `timeout`: the caller searches anyway
        finally:
            if not self._lost.is_set() and client.has_pending_idle():
                client.idle_done()
        if self._lost.is_set():
            raise ConnectionLostError(f"{self.where}: connection lost during IDLE")
        # Wait for the tagged end of IDLE so the next command is not rejected.
        await self._call("IDLE done", idle)


def _quote(value: str) -> str:
    """An IMAP quoted string (RFC 3501): backslash-escape quotes and backslashes."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
