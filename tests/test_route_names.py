"""A route named beyond ASCII (`défaut`): its probes carry the name 7-bit, and the IMAP
commands that look for them are 7-bit, against the real pymap server."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from daemon.checks.runner import Runner
from daemon.cli import main
from daemon.embedded.stack import EmbeddedMailStack
from daemon.roundtrip.check import RoundTrip
from daemon.roundtrip.probe import route_header_value
from tests.conftest import StackFactory, make_config
from tests.faulty_servers import wedging_proxy
from tests.probe_backlog import forged, probes
from tests.test_cli import routes_config

SECRET = b"test-secret-value"


async def test_a_route_named_beyond_ascii_runs_and_sweeps_in_7bit(
    mail_stack: EmbeddedMailStack,
) -> None:
    """`défaut` runs: every command sent is 7-bit (the 8-bit UID SEARCH HEADER string made
    pymap answer BYE [SERVERBUG], every run failed), the probe carries X-Selfcheck-Route
    d%C3%A9faut, the route's late probe is swept, and `défaut-eu`'s and a forgery stay."""
    late = probes(1, secret=SECRET, route="défaut")
    others = probes(1, secret=SECRET, route="défaut-eu") + forged(1, route="d%C3%A9faut")
    await mail_stack.imap.deliver_many(mail_stack.options.imap_user, late + others)
    sent: list[bytes] = []
    mail_stack.smtp.mutate = lambda data: sent.append(data) or data
    async with wedging_proxy(mail_stack.imap.port) as proxy:
        route: dict[str, Any] = mail_stack.route_table("défaut")
        route["imap"]["port"] = proxy.port
        cfg = make_config(route)
        result = await Runner().execute(RoundTrip(cfg.selfcheck.routes[0], cfg.selfcheck,
                                                  SECRET))
    assert result.success, result.error
    assert result.route == "défaut"
    assert result.late_arrivals == 1
    assert proxy.sent.isascii()
    assert b'HEADER X-Selfcheck-Route "d%C3%A9faut"' in proxy.sent
    assert len(sent) == 1 and b"\r\nX-Selfcheck-Route: d%C3%A9faut\r\n" in sent[0]
    assert sorted(await mail_stack.inbox()) == sorted(others)


def test_the_route_header_keeps_printable_ascii_and_encodes_the_rest() -> None:
    """Names in printable ASCII are carried as they are (probes of existing routes do not
    change); '%', other characters and spaces at either end are percent-encoded UTF-8, so
    two names never share a header value."""
    assert [route_header_value(n) for n in (
        "default", "eu west", "défaut", "日本", "50%", " x ", "a\r\nb")] == [
        "default", "eu west", "d%C3%A9faut", "%E6%97%A5%E6%9C%AC", "50%25", "%20x%20",
        "a%0D%0Ab"]


async def test_config_check_then_check_accept_a_route_named_beyond_ascii(
    make_stack: StackFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """A config naming a route `défaut` (UTF-8 TOML) passes config-check, and `check` of
    it succeeds against pymap, by the name as written."""
    stack = await make_stack()
    cfg = routes_config(tmp_path / "c.toml", ("défaut", stack))
    assert await asyncio.to_thread(main, ["config-check", "--config", str(cfg)]) == 0
    capsys.readouterr()
    code = await asyncio.to_thread(main, ["check", "--config", str(cfg), "--json",
                                          "--route", "défaut"])
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0, out
    assert [(r["route"], r["success"]) for r in out] == [("défaut", True)]
    assert stack.smtp.delivered == 1
    assert await stack.inbox() == []
