"""`config-check --connect` against production parts: sendmail's SMTP and Dovecot's IMAP."""

from __future__ import annotations

import io
from typing import Any

from daemon.config import Config
from daemon.connect_check import check_connections
from tests.integration.dovecot_lab import DovecotLab
from tests.integration.test_roundtrip_dovecot import route_for


def config_for(route: dict[str, Any]) -> Config:
    return Config.model_validate({"selfcheck": {"secret": "s", "routes": [route]}})


async def test_connect_reaches_sendmail_and_dovecot_without_sending(
    dovecot_lab: DovecotLab,
) -> None:
    """SMTP EHLO and Dovecot STARTTLS + LOGIN + SELECT pass; no message reaches the mailbox."""
    dovecot_lab.delete_all()
    out = io.StringIO()
    assert await check_connections(config_for(route_for(dovecot_lab)), out), out.getvalue()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("ok    smtp dovecot")
    assert lines[1].startswith("ok    imap dovecot") and "STARTTLS, LOGIN" in lines[1]
    assert dovecot_lab.header_values("X-Selfcheck-Id") == []


async def test_connect_names_a_wrong_dovecot_password_without_echoing_it(
    dovecot_lab: DovecotLab,
) -> None:
    """A password Dovecot refuses fails the IMAP line, naming LOGIN, never the password."""
    route = route_for(dovecot_lab)
    route["imap"]["password"] = "wrong-password-31337"
    out = io.StringIO()
    assert not await check_connections(config_for(route), out)
    imap_line = next(x for x in out.getvalue().splitlines() if "imap dovecot" in x)
    assert imap_line.startswith("FAIL") and "login failed" in imap_line
    assert "wrong-password-31337" not in out.getvalue()
