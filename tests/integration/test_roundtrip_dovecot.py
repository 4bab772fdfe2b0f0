"""The round trip against production parts: sendmail delivering over LMTP into Dovecot."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import aiosmtplib
import pytest

from daemon.checks.result import CheckResult, FailureReason, new_run_id
from daemon.checks.runner import Runner
from daemon.metrics import Metrics
from daemon.roundtrip.check import RoundTrip
from daemon.roundtrip.imap_client import ImapSession, Mailbox
from daemon.roundtrip.junk import junk_mailboxes
from daemon.roundtrip.probe import build_probe
from tests.conftest import make_config
from tests.integration.dovecot_lab import JUNK_MAILBOX, DovecotLab

SECRET = b"integration-secret"


async def check(route: dict[str, Any], **selfcheck: Any) -> CheckResult:
    cfg = make_config(route, **selfcheck)
    return await Runner().execute(RoundTrip(cfg.selfcheck.routes[0], cfg.selfcheck, SECRET))


def route_for(lab: DovecotLab, **imap: Any) -> dict[str, Any]:
    return {
        "name": "dovecot",
        "from": lab.sender,
        "to": lab.recipient,
        "smtp": {"host": lab.smtp_host, "port": lab.smtp_port, "security": "none"},
        "imap": {"host": lab.imap_host, "port": lab.imap_port, "security": "starttls",
                 "username": lab.username, "password": lab.password,
                 "ca_file": str(lab.ca_file), **imap},
    }


@pytest.mark.parametrize(("mode", "imap"), [
    ("idle", {}),
    ("polling", {"idle": False, "poll_interval": 0.5}),
    ("implicit-tls", {"security": "tls", "port": None}),
])
async def test_roundtrip_through_sendmail_into_dovecot(
    dovecot_lab: DovecotLab, mode: str, imap: dict[str, Any], record_property: Any
) -> None:
    """A probe goes sendmail -> LMTP -> Dovecot, is found over STARTTLS/TLS and deleted."""
    dovecot_lab.delete_all()
    if imap.get("port", 1) is None:
        imap["port"] = dovecot_lab.imaps_port
    result = await check(route_for(dovecot_lab, **imap), timeout=30.0)
    assert result.success, result.error
    assert result.reception_time is not None
    assert result.send_time is not None
    record_property(f"reception_time_{mode}", result.reception_time)
    print(f"dovecot {mode}: send_time={result.send_time:.3f} "
          f"reception_time={result.reception_time:.3f}")
    assert dovecot_lab.header_values("X-Selfcheck-Id") == []


async def test_dovecot_wrong_password(dovecot_lab: DovecotLab) -> None:
    """Dovecot refusing the login fails the run with reason imap and sends nothing."""
    dovecot_lab.delete_all()
    result = await check(route_for(dovecot_lab, password="not-the-password"))
    assert result.reason is FailureReason.IMAP
    assert "login failed" in (result.error or "")
    assert dovecot_lab.message_count() == 0


async def test_dovecot_late_probe_swept(dovecot_lab: DovecotLab) -> None:
    """Late probes of this route are deleted and counted; decoys and other routes' stay."""
    dovecot_lab.delete_all()
    long_ago = format_datetime(datetime.now(UTC) - timedelta(minutes=5))
    late, also_late, other_route = (
        build_probe(route=name, sender=dovecot_lab.sender, recipient=dovecot_lab.recipient,
                    secret=SECRET, run_id=new_run_id())
        for name in ("dovecot", "dovecot", "dovecot-eu")  # a longer name containing "dovecot"
    )
    for probe in (late, also_late, other_route):
        del probe.message["Date"]
        probe.message["Date"] = long_ago
        await submit(dovecot_lab, probe.message.as_bytes())
    forged_id = new_run_id()
    await submit(dovecot_lab, (
        f"From: {dovecot_lab.sender}\r\nTo: {dovecot_lab.recipient}\r\nSubject: forged\r\n"
        f"Date: {long_ago}\r\nX-Selfcheck-Id: {forged_id}\r\nX-Selfcheck-Route: dovecot\r\n\r\n"
        "selfcheck-token: AAAAAAAAAAAAAAAA.0123456789abcdef0123456789abcdef\r\n"
    ).encode())
    everything = sorted([late.run_id, also_late.run_id, other_route.run_id, forged_id])
    delivered_by = time.monotonic() + 30  # sendmail may queue a burst under load
    while time.monotonic() < delivered_by:
        if sorted(dovecot_lab.header_values("X-Selfcheck-Id")) == everything:
            break
        await asyncio.sleep(0.05)
    assert sorted(dovecot_lab.header_values("X-Selfcheck-Id")) == everything
    result = await check(route_for(dovecot_lab), timeout=30.0)
    assert result.success, result.error
    assert result.late_arrivals == 2
    assert sorted(dovecot_lab.header_values("X-Selfcheck-Id")) == sorted(
        [other_route.run_id, forged_id])
    dovecot_lab.delete_all()


async def submit(lab: DovecotLab, message: bytes, recipient: str | None = None) -> None:
    await aiosmtplib.send(message, sender=lab.sender, recipients=[recipient or lab.recipient],
                          hostname=lab.smtp_host, port=lab.smtp_port,
                          local_hostname="test.localdomain", timeout=10)


# -- delivery quality: TLS facts, a special-use junk mailbox, the hops --------------------

@pytest.mark.parametrize("security", ["starttls", "tls"])
async def test_dovecot_certificate_expiry_and_tls_version(
    dovecot_lab: DovecotLab, security: str,
) -> None:
    """Over STARTTLS and imaps the run reads Dovecot's certificate notAfter and TLS version."""
    dovecot_lab.delete_all()
    imap: dict[str, Any] = {"security": security}
    if security == "tls":
        imap["port"] = dovecot_lab.imaps_port
    metrics = Metrics()
    cfg = make_config(route_for(dovecot_lab, **imap), timeout=30.0)
    result = await Runner(metrics).execute(
        RoundTrip(cfg.selfcheck.routes[0], cfg.selfcheck, SECRET))
    assert result.success, result.error
    facts = result.tls["imap"]
    assert facts.not_after == dovecot_lab.cert_not_after.timestamp()
    assert facts.version in ("TLSv1.2", "TLSv1.3")
    assert "smtp" not in result.tls  # plain SMTP into sendmail: no handshake, no facts
    assert metrics.registry.get_sample_value(
        "selfcheck_tls_cert_expiry_timestamp_seconds", {"route": "dovecot", "protocol": "imap"}
    ) == dovecot_lab.cert_not_after.timestamp()
    print(f"dovecot {security}: {facts.version}, notAfter {result.as_dict()['tls']['imap']}")


async def test_dovecot_special_use_junk_mailbox_is_found_and_only_the_probe_deleted(
    dovecot_lab: DovecotLab,
) -> None:
    """Filed by LMTP into a \\Junk mailbox not named Junk: reason junk; the decoy there stays."""
    dovecot_lab.delete_all()
    dovecot_lab.delete_all(JUNK_MAILBOX)
    decoy_id = f"<decoy-{new_run_id()}@lab.test>"
    await submit(dovecot_lab, (
        f"From: spammer@lab.test\r\nTo: {dovecot_lab.junk_recipient}\r\nSubject: decoy\r\n"
        f"Message-ID: {decoy_id}\r\nX-Selfcheck-Route: dovecot\r\n\r\nspam\r\n"
    ).encode(), recipient=dovecot_lab.junk_recipient)
    await wait_for(lambda: dovecot_lab.message_count(JUNK_MAILBOX) == 1)
    route = route_for(dovecot_lab)
    route["to"] = dovecot_lab.junk_recipient
    result = await check(route, timeout=30.0)
    assert result.reason is FailureReason.JUNK, result.error
    assert result.error == f"probe landed in junk mailbox {JUNK_MAILBOX} instead of INBOX"
    assert result.found_in == JUNK_MAILBOX
    assert dovecot_lab.header_values("Message-ID", JUNK_MAILBOX) == [decoy_id]
    assert dovecot_lab.message_count() == 0
    dovecot_lab.delete_all(JUNK_MAILBOX)


async def test_dovecot_hops_are_sendmail_then_lmtp(dovecot_lab: DovecotLab) -> None:
    """The probe's path through the lab: sendmail's Received, then Dovecot's LMTP one."""
    dovecot_lab.delete_all()
    result = await check(route_for(dovecot_lab), timeout=30.0)
    assert result.success, result.error
    assert result.hops is not None and len(result.hops) >= 2
    first, last = result.hops[0], result.hops[-1]
    assert first.from_ip == "127.0.0.1" and first.with_ is not None
    assert first.with_.upper().startswith("ESMTP")
    assert last.with_ is not None and last.with_.startswith("LMTP")  # LMTPS: STARTTLS
    for hop in result.hops:
        assert hop.timestamp is not None
        assert hop.delay is not None and -1 <= hop.delay <= 30
    print("dovecot hops:", [h.as_dict() for h in result.hops])


async def wait_for(condition: Callable[[], bool], within: float = 30.0) -> None:
    """Until `condition()` (a doveadm query) holds; sendmail may queue under load."""
    deadline = time.monotonic() + within
    while not await asyncio.to_thread(condition):
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_dovecot_lists_its_junk_mailbox_by_special_use(dovecot_lab: DovecotLab) -> None:
    """Dovecot offers SPECIAL-USE; LIST ... RETURN (SPECIAL-USE) flags Quarantine as \\Junk."""
    cfg = make_config(route_for(dovecot_lab))
    session = ImapSession(cfg.selfcheck.routes[0].imap)
    await session.connect(select=False)
    try:
        assert session.has_capability("SPECIAL-USE")
        listed = {m.name: m.attributes for m in await session.list_mailboxes()}
    finally:
        await session.close()
    assert "\\junk" in listed[JUNK_MAILBOX]
    mailboxes = [Mailbox(name, attrs) for name, attrs in listed.items()]
    assert junk_mailboxes(mailboxes, "INBOX") == [JUNK_MAILBOX]
