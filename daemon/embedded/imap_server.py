"""A real IMAP server in-process: pymap's in-memory backend on a loopback port.

Used by `selfcheckd demo` and the hermetic tests. It speaks IDLE, UIDPLUS and
STARTTLS (or implicit TLS) for real; `deliver()` is the local delivery agent the
embedded SMTP server hands accepted mail to.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from argparse import Namespace
from datetime import UTC, datetime
from typing import Any

from proxyprotocol.reader import ProxyProtocolReader
from pymap.backend.dict import Config as DictConfig
from pymap.backend.dict import Identity, Login
from pymap.config import BackendCapability
from pymap.exceptions import MailboxConflict
from pymap.imap import IMAPServer
from pymap.parsing.message import AppendMessage
from pymap.parsing.specials.fetchattr import FetchRequirement
from pymap.user import Passwords, UserMetadata
from pysasl.hashing import BuiltinHash


class _Config(DictConfig):
    """pymap's dict config; `idle=False` stops advertising IDLE (its disable_idle is unused)."""

    def __init__(self, *args: Any, idle: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._idle = idle

    @property
    def backend_capability(self) -> BackendCapability:
        return BackendCapability(idle=self._idle, object_id=True, multi_append=True)


class EmbeddedImapServer:
    """pymap on 127.0.0.1. `tls`: None (plain), "starttls" or "tls" (implicit)."""

    def __init__(
        self,
        users: dict[str, str],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        idle: bool = True,
    ) -> None:
        if tls and ssl_context is None:
            raise ValueError("tls needs an ssl_context")
        self._users = users
        self._host = host
        self._requested_port = port
        self._tls = tls
        self._ssl_context = ssl_context
        self._idle = idle
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0
        self._config = _Config(
            Namespace(passlib_cfg=None, proxy_protocol=None),
            host=host,
            port=port,
            demo_data=False,
            demo_user="",
            demo_password="",
            ssl_context=ssl_context,
            tls_enabled=tls == "starttls",
            invalid_user_sleep=0.0,
            reject_dnsbl=False,
            idle=idle,
            # pymap's default is 500k PBKDF2 rounds (~0.25 s per login): fine for a
            # real server, but it would dominate every demo and soak round trip.
            hash_context=BuiltinHash(rounds=1000),
        )
        self._login = Login(self._config)

    async def start(self) -> int:
        self._config.apply_context()
        passwords = Passwords(self._config)
        for name, password in self._users.items():
            hashed = await passwords.hash_password(password)
            identity = Identity(name, self._login, None, frozenset({"admin"}))
            await identity.set(UserMetadata(self._config, name, password=hashed))
        imap = IMAPServer(self._login, self._config)
        inner = ProxyProtocolReader(self._config.proxy_protocol).get_callback(imap)

        async def callback(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self._writers.add(writer)
            try:
                await inner(reader, writer)
            finally:
                self._writers.discard(writer)

        self._server = await asyncio.start_server(
            callback,
            host=self._host,
            port=self._requested_port,
            ssl=self._ssl_context if self._tls == "tls" else None,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            # Open client connections would keep wait_closed() pending forever
            # (Server.close_clients() is Python 3.13+).
            for writer in list(self._writers):
                writer.close()
            await self._server.wait_closed()
            self._server = None

    async def deliver(self, user: str, data: bytes, mailbox: str = "INBOX") -> None:
        """Append a message as a delivery agent would (IDLE clients see EXISTS); a mailbox
        other than INBOX is created on first use, as a spam filter's `fileinto :create`."""
        identity = Identity(user, self._login, None, frozenset())
        async with identity.new_session() as session:
            if mailbox.upper() != "INBOX":
                await self._ensure_mailbox(session, mailbox)
            await session.append_messages(
                mailbox, [AppendMessage(data, datetime.now(UTC), frozenset())]
            )

    async def deliver_many(self, user: str, messages: list[bytes], mailbox: str = "INBOX") -> None:
        """`deliver` for many messages in one append (a backlog, for tests and benchmarks)."""
        identity = Identity(user, self._login, None, frozenset())
        async with identity.new_session() as session:
            if mailbox.upper() != "INBOX":
                await self._ensure_mailbox(session, mailbox)
            now = datetime.now(UTC)
            await session.append_messages(
                mailbox, [AppendMessage(data, now, frozenset()) for data in messages]
            )

    async def create_mailbox(self, user: str, mailbox: str) -> None:
        """Create `mailbox` for `user` unless it exists."""
        identity = Identity(user, self._login, None, frozenset())
        async with identity.new_session() as session:
            await self._ensure_mailbox(session, mailbox)

    @staticmethod
    async def _ensure_mailbox(session: Any, mailbox: str) -> None:
        with contextlib.suppress(MailboxConflict):
            await session.create_mailbox(mailbox)

    async def messages(self, user: str, mailbox: str = "INBOX") -> list[bytes]:
        """The raw messages in a mailbox (for tests and the demo's own checks)."""
        identity = Identity(user, self._login, None, frozenset())
        async with identity.new_session() as session:
            mbx = await session.mailbox_set.get_mailbox(mailbox)
            out: list[bytes] = []
            async for msg in mbx.messages():
                if not msg.expunged:
                    loaded = await msg.load_content(FetchRequirement.CONTENT)
                    out.append(bytes(loaded))
            return out
