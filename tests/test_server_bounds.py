"""What a mail server may make the client hold: IMAP lines, literals and answers bounded
and parsed without one recursion per line; an SMTP reply bounded by aiosmtplib."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from daemon.checks.result import FailureReason
from daemon.checks.runner import Runner
from daemon.embedded.stack import EmbeddedMailStack
from daemon.roundtrip.check import RoundTrip
from daemon.roundtrip.imap_client import (
    MAX_LINE,
    MAX_LITERAL,
    MAX_RESPONSE,
    ImapError,
    ImapSession,
)
from tests.conftest import make_config, refused_port
from tests.faulty_servers import (
    FloodKind,
    endless_smtp_reply_server,
    hostile_imap_server,
    scripted_imap_server,
)

# One read of the event loop's socket transport (asyncio's selector reads at most this).
READ_SIZE = 256 * 1024
# What the hostile server streams at most per connection: several times every bound, so
# a client without them holds it all (and fails by its command timeout instead).
FLOOD_LIMIT = 3 * MAX_RESPONSE
HEADERS = "RFC822.SIZE BODY.PEEK[HEADER.FIELDS (X-Selfcheck-Route X-Selfcheck-Id DATE)]"


def route_to(port: int, command_timeout: float = 20.0) -> dict[str, Any]:
    """A route whose IMAP server listens on `port` (its SMTP server is never reached)."""
    return {
        "name": "default", "from": "selfcheck@selfcheckd.test", "to": "rcpt@selfcheckd.test",
        "smtp": {"host": "127.0.0.1", "port": refused_port(), "security": "none"},
        "imap": {"host": "127.0.0.1", "port": port, "security": "none", "username": "u",
                 "password": "p", "command_timeout": command_timeout, "junk_mailboxes": []},
    }


@asynccontextmanager
async def session_on(port: int) -> AsyncIterator[ImapSession]:
    session = ImapSession(make_config(route_to(port)).selfcheck.routes[0].imap)
    await session.connect()
    try:
        yield session
    finally:
        await session.drop()


FLOODS: list[tuple[FloodKind, str]] = [
    ("literal", "server announced a literal of 2,000,000,000 bytes (limit 4 MiB)"),
    ("line", "server sent a response line longer than 1 MiB"),
    ("messages", "server sent an answer larger than 16 MiB"),
]


@pytest.mark.parametrize(("flood", "said"), FLOODS, ids=[f for f, _ in FLOODS])
async def test_a_flooding_server_fails_the_run_with_a_reason_naming_it(
    flood: FloodKind, said: str,
) -> None:
    """An endless literal, line or answer to the sweep's header fetch fails that run with
    reason imap, naming the server and the bound, long before the command timeout."""
    async with hostile_imap_server(flood, limit=FLOOD_LIMIT) as server:
        cfg = make_config(route_to(server.port))
        result = await Runner().execute(RoundTrip(cfg.selfcheck.routes[0], cfg.selfcheck, b"s"))
    assert server.floods == 1
    assert result.reason is FailureReason.IMAP
    assert result.error == (f"IMAP 127.0.0.1:{server.port}: UID FETCH: {said}; "
                            "connection dropped")


@pytest.mark.parametrize(("flood", "said"), FLOODS, ids=[f for f, _ in FLOODS])
async def test_the_client_holds_a_bounded_number_of_bytes_whatever_the_server_sends(
    flood: FloodKind, said: str,
) -> None:
    """The client's own accounting of what it holds for the server never goes past the
    answer bound plus one read, and nothing is kept once the connection is dropped."""
    async with hostile_imap_server(flood, limit=FLOOD_LIMIT) as server, \
            session_on(server.port) as session:
        with pytest.raises(ImapError) as failed:
            await session.fetch_many([1], HEADERS)
        protocol = session.client.protocol
        assert said in str(failed.value)
        assert protocol.peak_buffered <= MAX_RESPONSE + READ_SIZE
        assert protocol.buffered == 0
        assert protocol.current_command is None
    assert MAX_LINE < MAX_LITERAL < MAX_RESPONSE < FLOOD_LIMIT


def fetch_answer(count: int) -> bytes:
    """`count` messages answered with three lines each (an unsolicited flag update among
    them), and the tagged OK: as many lines in one read as a sweep of 500 gets."""
    lines = [b"* %d FETCH (UID %d BODY[] {1}\r\n%d)\r\n* %d FETCH (FLAGS ())\r\n"
             % (uid, uid, uid % 10, uid) for uid in range(1, count + 1)]
    return b"".join(lines) + b"{tag} OK done\r\n"


async def test_thousands_of_answer_lines_in_one_read_are_parsed_without_recursion() -> None:
    """A UID FETCH of 500 messages answered in one write (1,500 lines) gives all 500;
    aioimaplib's reader recursed once per line and died of RecursionError."""
    replies = (b"* CAPABILITY IMAP4rev1\r\n{tag} OK done\r\n", b"{tag} OK logged in\r\n",
               b"* 500 EXISTS\r\n{tag} OK [READ-WRITE] selected\r\n", fetch_answer(500))
    async with scripted_imap_server(b"* OK ready\r\n", replies=replies) as port, \
            session_on(port) as session:
        fetched = await session.fetch_many(range(1, 501), "BODY.PEEK[]")
        assert session.usable
    assert [(m.uid, m.data) for m in fetched] == [
        (uid, b"%d" % (uid % 10)) for uid in range(1, 501)]


async def test_plain_text_after_the_starttls_answer_is_refused() -> None:
    """Lines a server (or a man in the middle) sends after STARTTLS's OK, before the
    handshake, are refused rather than parsed as if they were protected."""
    replies = (b"* CAPABILITY IMAP4rev1 STARTTLS\r\n{tag} OK done\r\n",
               b"{tag} OK begin TLS\r\n* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\n")
    async with scripted_imap_server(b"* OK ready\r\n", replies=replies) as port:
        route = route_to(port)
        route["imap"]["security"] = "starttls"
        session = ImapSession(make_config(route).selfcheck.routes[0].imap)
        with pytest.raises(ImapError) as failed:
            await session.connect()
        await session.drop()
    assert str(failed.value) == (f"IMAP 127.0.0.1:{port}: data received after STARTTLS "
                                 "response")


async def test_an_endless_smtp_reply_fails_the_send_as_refused_not_as_said(
    mail_stack: EmbeddedMailStack,
) -> None:
    """A greeting without end fails the run with reason send once aiosmtplib's 32 KiB bound
    is met, and the error says the client refused the reply (not "server said -1")."""
    async with endless_smtp_reply_server() as port:
        route = mail_stack.route_table()
        route["smtp"]["port"] = port
        cfg = make_config(route)
        result = await Runner().execute(RoundTrip(cfg.selfcheck.routes[0], cfg.selfcheck, b"s"))
    assert result.reason is FailureReason.SEND
    assert result.error == (f"SMTP 127.0.0.1:{port}: reply refused: Response too long "
                            "(over 8 KiB a line or 32 KiB a reply)")
