"""The embedded mail stack: SMTP in, local delivery, IMAP out, all on loopback.

`selfcheckd demo` runs the daemon against it; the hermetic tests use it as a
real server pair. Nothing here is a mock: clients speak SMTP and IMAP to it.
"""

from __future__ import annotations

import secrets
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from daemon.embedded.imap_server import EmbeddedImapServer
from daemon.embedded.smtp_server import EmbeddedSmtpServer


@dataclass
class StackOptions:
    sender: str = "selfcheck@selfcheckd.test"
    recipient: str = "selfcheck-receiver@selfcheckd.test"
    imap_user: str = "selfcheck-receiver"
    imap_password: str = field(default_factory=lambda: secrets.token_urlsafe(12))
    smtp_credentials: tuple[str, str] | None = None
    tls: str | None = None  # None, "starttls" or "tls", for both servers
    ssl_context: ssl.SSLContext | None = None
    idle: bool = True
    maillog: Path | None = None
    # Delivery quality seams of the SMTP server (see daemon.embedded.smtp_server):
    # Authentication-Results values stamped on top, forged ones below them, and
    # recipients filed into `junk_mailbox` instead of INBOX.
    auth_results: list[str] = field(default_factory=list)
    forged_auth_results: list[str] = field(default_factory=list)
    junk_recipients: set[str] = field(default_factory=set)
    junk_mailbox: str = "Junk"


class EmbeddedMailStack:
    """An SMTP server delivering `recipient` into the IMAP mailbox of `imap_user`."""

    def __init__(self, options: StackOptions | None = None) -> None:
        self.options = options or StackOptions()
        o = self.options
        self.imap = EmbeddedImapServer(
            {o.imap_user: o.imap_password}, tls=o.tls, ssl_context=o.ssl_context, idle=o.idle,
        )
        self.smtp = EmbeddedSmtpServer(
            self.imap, {o.recipient: o.imap_user}, tls=o.tls, ssl_context=o.ssl_context,
            credentials=o.smtp_credentials, maillog=o.maillog,
        )
        self.smtp.auth_results = list(o.auth_results)
        self.smtp.forged_auth_results = list(o.forged_auth_results)
        self.smtp.junk_recipients = set(o.junk_recipients)
        self.smtp.junk_mailbox = o.junk_mailbox

    async def start(self) -> EmbeddedMailStack:
        await self.imap.start()
        await self.smtp.start()
        return self

    async def stop(self) -> None:
        await self.smtp.stop()
        await self.imap.stop()

    async def __aenter__(self) -> EmbeddedMailStack:
        return await self.start()

    async def __aexit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def inbox(self) -> list[bytes]:
        return await self.imap.messages(self.options.imap_user)

    async def junk(self) -> list[bytes]:
        """The messages in the SMTP server's junk mailbox (none if it was never created)."""
        try:
            return await self.imap.messages(self.options.imap_user, self.smtp.junk_mailbox)
        except KeyError:
            return []

    def route_table(self, name: str = "default") -> dict[str, object]:
        """The `[[selfcheck.routes]]` entry (as a TOML-shaped dict) that targets this stack."""
        o = self.options
        security = o.tls or "none"
        smtp: dict[str, object] = {
            "host": "127.0.0.1", "port": self.smtp.port, "security": security,
        }
        if o.smtp_credentials:
            smtp["username"], smtp["password"] = o.smtp_credentials
        imap: dict[str, object] = {
            "host": "127.0.0.1", "port": self.imap.port, "security": security,
            "username": o.imap_user, "password": o.imap_password,
        }
        return {"name": name, "from": o.sender, "to": o.recipient, "smtp": smtp, "imap": imap}
