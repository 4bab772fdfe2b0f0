"""The round trip against production parts: sendmail delivering over LMTP into Dovecot."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import aiosmtplib
import pytest

from daemon.checks.result import CheckResult, FailureReason, new_run_id
from daemon.checks.runner import Runner
from daemon.roundtrip.check import RoundTrip
from daemon.roundtrip.probe import build_probe
from tests.conftest import make_config
from tests.integration.dovecot_lab import DovecotLab

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


async def submit(lab: DovecotLab, message: bytes) -> None:
    await aiosmtplib.send(message, sender=lab.sender, recipients=[lab.recipient],
                          hostname=lab.smtp_host, port=lab.smtp_port,
                          local_hostname="test.localdomain", timeout=10)
