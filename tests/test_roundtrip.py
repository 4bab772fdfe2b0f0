"""The round trip against the embedded stack: real aiosmtpd delivering into real pymap."""

from __future__ import annotations

import asyncio
import io
import time
from email import message_from_bytes
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from daemon.embedded.stack import EmbeddedMailStack
from daemon.logs import configure_logging
from daemon.roundtrip.probe import PROBE_HEADER
from daemon.roundtrip.result import CheckResult, FailureReason
from daemon.runner import run_check
from tests.conftest import StackFactory, make_config
from tests.faulty_servers import cutting_proxy, silent_server

SECRET = b"test-secret-value"


async def check(route: dict[str, Any], **selfcheck: Any) -> CheckResult:
    cfg = make_config(route, **selfcheck)
    return await run_check(cfg.selfcheck.routes[0], cfg.selfcheck, SECRET)


def completed_events(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == "selfcheck_completed"]


async def probes_left(stack: EmbeddedMailStack) -> int:
    return sum(
        1 for raw in await stack.inbox() if message_from_bytes(raw).get(PROBE_HEADER) is not None
    )


async def test_success_plain_with_idle(mail_stack: EmbeddedMailStack) -> None:
    """A probe sent in clear text is found by IDLE, verified, timed and deleted."""
    with capture_logs() as logs:
        result = await check(mail_stack.route_table())
    assert result.success, result.error
    assert result.reason is None
    assert result.send_time is not None and 0 < result.send_time < 5
    assert result.reception_time is not None and 0 <= result.reception_time < 5
    assert [s.name for s in result.steps] == [
        "prepare", "imap_connect", "sweep_late", "smtp_send", "receive", "verify", "cleanup"
    ]
    assert completed_events(logs) == [{
        "event": "selfcheck_completed", "log_level": "info", "success": True,
        "send_time": result.send_time, "reception_time": result.reception_time,
    }]
    assert await probes_left(mail_stack) == 0


async def test_success_line_is_the_seed_format(mail_stack: EmbeddedMailStack) -> None:
    """The key=value renderer prints exactly `selfcheck_completed success=true send_time=...`."""
    out = io.StringIO()
    configure_logging("kv", "info", stream=out)
    try:
        result = await check(mail_stack.route_table())
    finally:
        configure_logging()
    line = next(x for x in out.getvalue().splitlines() if x.startswith("selfcheck_completed"))
    assert line == (
        f"selfcheck_completed success=true send_time={result.send_time:.3f} "
        f"reception_time={result.reception_time:.3f}"
    )


async def test_success_with_polling(make_stack: StackFactory) -> None:
    """With IDLE off on the server, the probe is found by polling."""
    stack = await make_stack(idle=False)
    route = stack.route_table()
    route["imap"]["poll_interval"] = 0.2
    result = await check(route)
    assert result.success, result.error
    assert await probes_left(stack) == 0


@pytest.mark.parametrize("tls", ["starttls", "tls"])
async def test_success_over_tls_with_auth(
    make_stack: StackFactory, server_ssl_context: Any, ca_file: Path, tls: str
) -> None:
    """STARTTLS (IMAP upgrade implemented here) and implicit TLS, verified against the CA."""
    stack = await make_stack(tls=tls, ssl_context=server_ssl_context,
                             smtp_credentials=("submitter", "s3cret-pass"))
    route = stack.route_table()
    route["smtp"]["ca_file"] = str(ca_file)
    route["imap"]["ca_file"] = str(ca_file)
    result = await check(route)
    assert result.success, result.error
    assert await probes_left(stack) == 0


async def test_tls_unverifiable_certificate_fails_imap(
    make_stack: StackFactory, server_ssl_context: Any
) -> None:
    """Without the test CA the IMAP STARTTLS handshake is refused: reason imap."""
    stack = await make_stack(tls="starttls", ssl_context=server_ssl_context)
    result = await check(stack.route_table())
    assert result.reason is FailureReason.IMAP
    assert "certificate" in (result.error or "").lower()


async def test_smtp_server_that_never_answers(mail_stack: EmbeddedMailStack) -> None:
    """A silent SMTP server fails the send within its deadline and leaves no probe."""
    async with silent_server() as port:
        route = mail_stack.route_table()
        route["smtp"]["port"] = port
        route["smtp"]["timeout"] = 1.0
        started = time.monotonic()
        with capture_logs() as logs:
            result = await check(route)
        elapsed = time.monotonic() - started
    assert result.reason is FailureReason.SEND
    assert "no complete transaction within 1s" in (result.error or "")
    assert elapsed < 5
    assert completed_events(logs)[0]["success"] is False
    assert completed_events(logs)[0]["error"] == result.error
    assert await probes_left(mail_stack) == 0


async def test_imap_server_that_never_answers(mail_stack: EmbeddedMailStack) -> None:
    """A silent IMAP server fails the run with reason imap, and nothing is sent."""
    async with silent_server() as port:
        route = mail_stack.route_table()
        route["imap"].update(port=port, connect_timeout=1.0, command_timeout=1.0)
        started = time.monotonic()
        with capture_logs() as logs:
            result = await check(route)
        elapsed = time.monotonic() - started
    assert result.reason is FailureReason.IMAP
    assert "connect" in (result.error or "")
    assert elapsed < 5
    assert completed_events(logs)[0]["log_level"] == "error"
    assert mail_stack.smtp.delivered == 0


async def test_imap_connection_dropped_during_idle(mail_stack: EmbeddedMailStack) -> None:
    """A server that drops the connection on IDLE fails with imap; cleanup reconnects."""
    # Lands after the first search (so we IDLE), while the proxy withholds IDLE.
    mail_stack.smtp.delivery_delay = 0.1
    async with cutting_proxy(mail_stack.imap.port, b"IDLE\r\n", hold=0.4) as port:
        route = mail_stack.route_table()
        route["imap"]["port"] = port
        started = time.monotonic()
        with capture_logs() as logs:
            result = await check(route)
        elapsed = time.monotonic() - started
    assert result.reason is FailureReason.IMAP
    assert "connection lost during IDLE" in (result.error or "")
    assert completed_events(logs)[0]["error"] == result.error
    assert elapsed < 10
    assert result.cleanup_error is None
    assert await probes_left(mail_stack) == 0


async def test_connection_lost_after_arrival_cleanup_uses_new_connection(
    mail_stack: EmbeddedMailStack,
) -> None:
    """Lost while fetching a delivered probe: reason imap, and a fresh session deletes it."""
    async with cutting_proxy(mail_stack.imap.port, b"UID FETCH") as port:
        route = mail_stack.route_table()
        route["imap"]["port"] = port
        result = await check(route)
    assert result.reason is FailureReason.IMAP
    assert "connection lost during UID FETCH" in (result.error or "")
    assert [s.detail for s in result.steps if s.name == "cleanup"] == ["1 deleted"]
    assert await probes_left(mail_stack) == 0


async def test_wrong_password(mail_stack: EmbeddedMailStack) -> None:
    """A wrong IMAP password fails with reason imap and never shows the password."""
    route = mail_stack.route_table()
    route["imap"]["password"] = "definitely-wrong-pw"
    with capture_logs() as logs:
        result = await check(route)
    assert result.reason is FailureReason.IMAP
    assert "login failed" in (result.error or "")
    assert "definitely-wrong-pw" not in repr(logs) + repr(result.as_dict(verbose=True))
    assert mail_stack.smtp.delivered == 0


async def test_probe_never_delivered(mail_stack: EmbeddedMailStack) -> None:
    """An accepted probe that never lands times out with reason receive_timeout."""
    mail_stack.smtp.drop = True
    started = time.monotonic()
    result = await check(mail_stack.route_table(), timeout=1.5)
    elapsed = time.monotonic() - started
    assert result.reason is FailureReason.RECEIVE_TIMEOUT
    assert result.error == "probe not received within 1.5s"
    assert result.send_time is not None and result.reception_time is None
    assert 1.5 <= elapsed < 5
    assert await probes_left(mail_stack) == 0


async def test_probe_altered_in_transit(mail_stack: EmbeddedMailStack) -> None:
    """A probe whose HTML part lost the token fails integrity, names the part, is deleted."""
    def tamper(data: bytes) -> bytes:
        head, sep, html = data.rpartition(b"<code>")
        return head + sep + b"X" + html[1:]

    mail_stack.smtp.mutate = tamper
    result = await check(mail_stack.route_table())
    assert result.reason is FailureReason.INTEGRITY
    assert "text/html" in (result.error or "")
    assert await probes_left(mail_stack) == 0


async def test_header_removed_in_transit(mail_stack: EmbeddedMailStack) -> None:
    """A probe whose Subject was rewritten fails integrity naming the header."""
    mail_stack.smtp.mutate = lambda d: d.replace(b"Subject: selfcheckd probe", b"Subject: [EXT]", 1)
    result = await check(mail_stack.route_table())
    assert result.reason is FailureReason.INTEGRITY
    assert "header Subject" in (result.error or "")
    assert await probes_left(mail_stack) == 0


async def test_late_probe_is_swept_on_next_run(mail_stack: EmbeddedMailStack) -> None:
    """A probe that arrives after its timeout is deleted and counted by the next run."""
    mail_stack.smtp.delivery_delay = 1.5
    first = await check(mail_stack.route_table(), timeout=1.0)
    assert first.reason is FailureReason.RECEIVE_TIMEOUT
    await asyncio.sleep(1.0)  # the late probe lands
    assert await probes_left(mail_stack) == 1
    mail_stack.smtp.delivery_delay = 0.0
    second = await check(mail_stack.route_table(), timeout=1.0)
    assert second.success, second.error
    assert second.late_arrivals == 1
    assert await probes_left(mail_stack) == 0


async def test_other_mail_is_never_touched(mail_stack: EmbeddedMailStack) -> None:
    """Cleanup and the late sweep delete probes only, whatever else is in the mailbox."""
    await mail_stack.imap.deliver(
        mail_stack.options.imap_user,
        b"From: a@b.example\r\nTo: c@d.example\r\nSubject: X-Selfcheck-Route default\r\n\r\nhi\r\n",
    )
    for _ in range(2):
        assert (await check(mail_stack.route_table())).success
    inbox = await mail_stack.inbox()
    assert len(inbox) == 1 and b"Subject: X-Selfcheck-Route default" in inbox[0]
