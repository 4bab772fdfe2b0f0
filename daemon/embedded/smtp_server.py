"""A real SMTP server in-process (aiosmtpd) that delivers into the embedded IMAP server.

Runs on the caller's event loop (no thread), so the demo and the tests see one
process with one loop. Optional STARTTLS or implicit TLS, optional AUTH, and a
sendmail-style log line per delivery so the demo's leak watcher has a real
stream to follow.

Like a real MTA it prepends a `Received` header to every message it accepts
(`from <EHLO name> (localhost [<ip>]) by smtp.selfcheckd.test ... with
ESMTP[S][A] id <queue id> for <rcpt>; <date>`), and, as a receiving MTA's
milters (SPF, OpenDKIM, OpenDMARC) would, it stamps the `Authentication-Results`
headers in `auth_results` on top of it.

Test seams: `mutate` alters a message in transit, `drop` accepts and loses it,
`auth_results` are the Authentication-Results values to stamp (top first; see
`auth_results_value`), `forged_auth_results` are values placed below them as if
an earlier hop (or the sender) had written them, and `junk_recipients` are
filed into the IMAP server's `junk_mailbox` instead of INBOX, as a spam filter
would.
"""

from __future__ import annotations

import asyncio
import secrets
import ssl
import time
import warnings
import weakref
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from daemon.embedded.imap_server import EmbeddedImapServer

HOSTNAME = "smtp.selfcheckd.test"
# The authserv-id the embedded server's "milters" use by default.
AUTHSERV_ID = "mx.selfcheckd.test"


def auth_results_value(
    results: Mapping[str, str], *, authserv_id: str = AUTHSERV_ID,
    domain: str = "selfcheckd.test",
) -> str:
    """An Authentication-Results value as OpenDKIM/OpenDMARC/an SPF milter write it.

    `results` maps a method (spf, dkim, dmarc, arc) to its result, e.g.
    `{"spf": "pass", "dkim": "fail"}`; each gets the usual property and a comment.
    """
    props = {
        "spf": f"smtp.mailfrom={domain}",
        "dkim": f"header.d={domain} header.s=probe header.b=AbCdEf12",
        "dmarc": f"header.from={domain}",
        "arc": "smtp.remote-ip=127.0.0.1",
    }
    parts = [authserv_id]
    for method, result in results.items():
        prop = props.get(method, "")
        parts.append(f"{method}={result} ({method} checked by the embedded MTA) {prop}".rstrip())
    if len(parts) == 1:
        parts.append("none")
    return ";\r\n\t".join(parts)


def _queue_id() -> str:
    # Shaped like sendmail's: 8 base-62-ish characters then a 6-digit pid.
    alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
    return "".join(secrets.choice(alphabet) for _ in range(8)) + f"{secrets.randbelow(10**6):06d}"


class _DeliveryHandler:
    def __init__(self, server: EmbeddedSmtpServer) -> None:
        self._server = server

    async def handle_DATA(  # noqa: N802 - aiosmtpd's hook name
        self, _srv: SMTP, session: Session, envelope: Envelope,
    ) -> str:
        qid = _queue_id()
        data = self._server.stamp(envelope.original_content or b"", session, envelope, qid)
        self._server.log_line(
            f"{qid}: from=<{envelope.mail_from}>, size={len(data)}, class=0, "
            f"nrcpts={len(envelope.rcpt_tos)}, proto=ESMTP, daemon=MTA, relay=localhost [127.0.0.1]"
        )
        task = asyncio.ensure_future(self._server.deliver_later(qid, envelope.rcpt_tos, data))
        self._server.tasks.add(task)
        task.add_done_callback(self._server.tasks.discard)
        return f"250 2.0.0 {qid} Message accepted for delivery"


class EmbeddedSmtpServer:
    """aiosmtpd on 127.0.0.1 delivering to local users of `imap`.

    `route` maps a domain (lowercase) to a callable that takes an address and
    returns the IMAP user that receives it; addresses of other domains are
    accepted and logged as relayed elsewhere (that is what the leak watcher sees).
    """

    def __init__(
        self,
        imap: EmbeddedImapServer,
        local_users: dict[str, str],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        credentials: tuple[str, str] | None = None,
        maillog: Path | None = None,
        delivery_delay: float = 0.0,
    ) -> None:
        self._imap = imap
        self._local_users = {k.lower(): v for k, v in local_users.items()}
        self._host = host
        self._requested_port = port
        self._tls = tls
        self._ssl_context = ssl_context
        self._credentials = credentials
        self._maillog = maillog
        self.delivery_delay = delivery_delay
        self.mutate: Callable[[bytes], bytes] | None = None
        self.drop = False
        # Authentication-Results values stamped on top of each message (top first), and
        # forged ones placed below them (see the module docstring).
        self.auth_results: list[str] = []
        self.forged_auth_results: list[str] = []
        # Recipients a spam filter files into `junk_mailbox` (compared case-insensitively).
        self.junk_recipients: set[str] = set()
        self.junk_mailbox = "Junk"
        self.delivered = 0
        self.tasks: set[asyncio.Future[None]] = set()
        self._server: asyncio.Server | None = None
        # Server.close_clients() is Python 3.13+; track connections to close them on stop.
        self._connections: weakref.WeakSet[SMTP] = weakref.WeakSet()
        self.port = 0

    def _authenticate(
        self, _srv: SMTP, _session: Session, _envelope: Envelope, mechanism: str, data: Any,
    ) -> AuthResult:
        if mechanism not in ("LOGIN", "PLAIN") or not isinstance(data, LoginPassword):
            return AuthResult(success=False, handled=False)
        assert self._credentials is not None
        user, password = self._credentials
        ok = data.login.decode() == user and secrets.compare_digest(
            data.password.decode(), password
        )
        return AuthResult(success=ok, handled=False)

    def _protocol(self) -> SMTP:
        with warnings.catch_warnings():
            # aiosmtpd warns about AUTH without STARTTLS; under implicit TLS it is encrypted.
            warnings.simplefilter("ignore", UserWarning)
            proto = self._new_protocol()
        self._connections.add(proto)
        return proto

    def _new_protocol(self) -> SMTP:
        return SMTP(
            _DeliveryHandler(self),
            hostname=HOSTNAME,
            ident="selfcheckd embedded SMTP",
            tls_context=self._ssl_context if self._tls == "starttls" else None,
            require_starttls=self._tls == "starttls",
            auth_required=self._credentials is not None,
            # aiosmtpd only recognises STARTTLS as "TLS"; implicit TLS already is.
            auth_require_tls=self._tls == "starttls",
            authenticator=self._authenticate if self._credentials else None,
            timeout=30,
            loop=asyncio.get_running_loop(),
        )

    async def start(self) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._protocol, host=self._host, port=self._requested_port,
            ssl=self._ssl_context if self._tls == "tls" else None,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        if self._server is not None:
            self._server.close()
            for proto in list(self._connections):
                if proto.transport is not None:
                    proto.transport.close()
            await self._server.wait_closed()
            self._server = None

    def log_line(self, text: str) -> None:
        """Append a sendmail-shaped line (rsyslog's default format) to the maillog."""
        if self._maillog is None:
            return
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
        frac = f"{time.time() % 1:.6f}"[1:]
        pid = 1000 + secrets.randbelow(9000)
        line = f"{stamp}{frac}+00:00 selfcheckd-demo sendmail[{pid}]: {text}\n"
        with self._maillog.open("a", encoding="utf-8") as fh:
            fh.write(line)

    def stamp(self, data: bytes, session: Session, envelope: Envelope, qid: str) -> bytes:
        """Prepend the trace headers a receiving MTA adds: Received, then its milters'
        Authentication-Results above it (with any forged ones below)."""
        ip = session.peer[0] if isinstance(session.peer, tuple) else "127.0.0.1"
        helo = session.host_name or "unknown"
        tls = self._tls is not None
        proto = "ESMTP" if session.extended_smtp else "SMTP"
        proto += ("S" if tls else "") + ("A" if session.authenticated else "")
        rcpt = f"\r\n\tfor <{envelope.rcpt_tos[0]}>" if len(envelope.rcpt_tos) == 1 else ""
        when = format_datetime(datetime.now(UTC).replace(microsecond=0))
        received = (f"Received: from {helo} (localhost [{ip}])\r\n\tby {HOSTNAME} "
                    f"(selfcheckd embedded SMTP) with {proto} id {qid}{rcpt}; {when}\r\n")
        trace = "".join(f"Authentication-Results: {v}\r\n" for v in self.auth_results)
        forged = "".join(f"Authentication-Results: {v}\r\n" for v in self.forged_auth_results)
        return (trace + received + forged).encode() + data

    async def deliver_later(self, qid: str, rcpts: list[str], data: bytes) -> None:
        if self.delivery_delay:
            await asyncio.sleep(self.delivery_delay)
        if self.drop:
            return
        if self.mutate is not None:
            data = self.mutate(data)
        for rcpt in rcpts:
            user = self._local_users.get(rcpt.lower())
            if user is not None:
                junk = rcpt.lower() in {r.lower() for r in self.junk_recipients}
                await self._imap.deliver(user, data, self.junk_mailbox if junk else "INBOX")
                self.delivered += 1
                status = "mailer=local, stat=Sent"
            else:
                status = "mailer=esmtp, relay=relay.invalid., dsn=4.0.0, stat=Deferred"
            self.log_line(f"{qid}: to=<{rcpt}>, delay=00:00:00, xdelay=00:00:00, {status}")
