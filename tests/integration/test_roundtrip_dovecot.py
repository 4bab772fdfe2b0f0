"""The round trip against production parts: sendmail delivering over LMTP into Dovecot."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import aiosmtplib
import pytest

from daemon.roundtrip.probe import build_probe, new_run_id
from daemon.roundtrip.result import FailureReason
from daemon.runner import run_check
from tests.conftest import make_config
from tests.integration.dovecot_lab import DovecotLab

SECRET = b"integration-secret"


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
    cfg = make_config(route_for(dovecot_lab, **imap), timeout=30.0)
    result = await run_check(cfg.selfcheck.routes[0], cfg.selfcheck, SECRET)
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
    cfg = make_config(route_for(dovecot_lab, password="not-the-password"))
    result = await run_check(cfg.selfcheck.routes[0], cfg.selfcheck, SECRET)
    assert result.reason is FailureReason.IMAP
    assert "login failed" in (result.error or "")
    assert dovecot_lab.message_count() == 0


async def test_dovecot_late_probe_swept(dovecot_lab: DovecotLab) -> None:
    """A probe of an earlier run that landed after its timeout is deleted and counted."""
    dovecot_lab.delete_all()
    earlier = build_probe(route="dovecot", sender=dovecot_lab.sender,
                          recipient=dovecot_lab.recipient, secret=SECRET, run_id=new_run_id())
    del earlier.message["Date"]
    earlier.message["Date"] = format_datetime(datetime.now(UTC) - timedelta(minutes=5))
    await aiosmtplib.send(earlier.message, hostname=dovecot_lab.smtp_host,
                          port=dovecot_lab.smtp_port, local_hostname="test.localdomain",
                          timeout=10)
    for _ in range(100):
        if dovecot_lab.header_values("X-Selfcheck-Id"):
            break
        await asyncio.sleep(0.05)
    assert dovecot_lab.header_values("X-Selfcheck-Id") == [earlier.run_id]
    cfg = make_config(route_for(dovecot_lab), timeout=30.0)
    result = await run_check(cfg.selfcheck.routes[0], cfg.selfcheck, SECRET)
    assert result.success, result.error
    assert result.late_arrivals == 1
    assert dovecot_lab.header_values("X-Selfcheck-Id") == []
