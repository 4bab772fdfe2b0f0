"""The round trip against production parts: sendmail delivering over LMTP into Dovecot."""

from __future__ import annotations

from typing import Any

import pytest

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
    assert result.reception_time is not None and result.send_time is not None
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
    """A probe left by an earlier run past its timeout is deleted and counted."""
    dovecot_lab.delete_all()
    cfg = make_config(route_for(dovecot_lab), timeout=0.05)
    first = await run_check(cfg.selfcheck.routes[0], cfg.selfcheck, SECRET)
    if first.success:  # delivered faster than 50 ms: nothing is late; skip the premise
        pytest.skip("delivery beat a 50 ms timeout; cannot produce a late probe")
    assert first.reason is FailureReason.RECEIVE_TIMEOUT
    import asyncio

    for _ in range(50):
        if dovecot_lab.header_values("X-Selfcheck-Id"):
            break
        await asyncio.sleep(0.1)
    cfg = make_config(route_for(dovecot_lab), timeout=0.05)
    # The sweep only touches probes older than the timeout: wait past it.
    await asyncio.sleep(0.2)
    cfg = make_config(route_for(dovecot_lab), timeout=10.0)
    second = await run_check(cfg.selfcheck.routes[0], cfg.selfcheck, SECRET)
    assert second.success, second.error
    assert dovecot_lab.header_values("X-Selfcheck-Id") == []
