"""`selfcheck check --heartbeat`: the cron mode pings the targets by run's per-route rules."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web

from daemon.cli import main
from tests.conftest import StackFactory
from tests.test_cli import routes_config

TOKEN = "check-pulse-token-0123456789"


@dataclass
class Monitor:
    """A real HTTP endpoint standing in for updown.io / healthchecks.io."""

    port: int = 0
    seen: list[tuple[str, str, bytes]] = field(default_factory=list)
    stall: bool = False

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append((request.method, request.path_qs, await request.read()))
        if self.stall:
            with suppress(asyncio.CancelledError):
                await asyncio.sleep(60)
        return web.Response(text="OK")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    def paths(self) -> list[str]:
        return sorted(path.split("?")[0] for _, path, _ in self.seen)


@pytest.fixture
async def monitor() -> AsyncIterator[Monitor]:
    mon = Monitor()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", mon.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    mon.port = runner.addresses[0][1]
    yield mon
    await runner.cleanup()


def with_targets(cfg: Path, *tables: str) -> Path:
    cfg.write_text(cfg.read_text() + "".join(tables))
    return cfg


def target(name: str, url: str, kind: str = "updown", routes: list[str] | None = None,
           **extra: object) -> str:
    text = f'[[heartbeat]]\nname = "{name}"\nkind = "{kind}"\nurl = "{url}"\nretries = 0\n'
    if routes is not None:
        text += f"routes = {json.dumps(routes)}\n"
    return text + "".join(f"{k} = {json.dumps(v)}\n" for k, v in extra.items())


async def check(*args: str) -> int:
    return await asyncio.to_thread(main, ["check", "--json", *args])


async def test_a_target_pulses_once_every_route_it_covers_succeeded(
    make_stack: StackFactory, monitor: Monitor, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Both routes pass: the updown target gets the seed's body once; a healthchecks target
    with send_start gets /start and its success with the same rid; stderr says so."""
    a, b = await make_stack(), await make_stack()
    cfg = with_targets(
        routes_config(tmp_path / "c.toml", ("a", a), ("b", b)),
        target("pulse", monitor.url(f"pulse/{TOKEN}")),
        target("hc", monitor.url(f"hc/{TOKEN}"), "healthchecks", ["a"], send_start=True))
    assert await check("--config", str(cfg), "--heartbeat") == 0
    out, err = capsys.readouterr()
    assert sorted(json.loads(line)["route"] for line in out.splitlines()) == ["a", "b"]
    assert monitor.paths() == [f"/hc/{TOKEN}", f"/hc/{TOKEN}/start", f"/pulse/{TOKEN}"]
    [pulse] = [body for _, path, body in monitor.seen if path.startswith("/pulse")]
    assert set(json.loads(pulse)) == {"send_time", "reception_time"}
    rids = {path.partition("rid=")[2] for _, path, _ in monitor.seen if "/hc/" in path}
    assert len(rids) == 1 and "" not in rids
    assert "heartbeat pulse: success 1\n" in err
    assert "heartbeat hc: success 2\n" in err
    assert TOKEN not in err


async def test_a_failed_covered_route_silences_updown_and_fails_healthchecks(
    make_stack: StackFactory, monitor: Monitor, tmp_path: Path, closed_port: int,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Route b cannot send: updown covering both gets nothing (its alarm), healthchecks
    covering both gets one /fail naming b, a target of route a alone still pulses; exit 1."""
    a, b = await make_stack(), await make_stack()
    cfg = routes_config(tmp_path / "c.toml", ("a", a), ("b", b))
    cfg.write_text(cfg.read_text().replace(f"port = {b.smtp.port}", f"port = {closed_port}"))
    with_targets(cfg, target("pulse", monitor.url(f"pulse/{TOKEN}")),
                 target("hc", monitor.url(f"hc/{TOKEN}"), "healthchecks"),
                 target("only-a", monitor.url(f"a/{TOKEN}"), routes=["a"]))
    assert await check("--config", str(cfg), "--heartbeat") == 1
    err = capsys.readouterr().err
    assert set(monitor.paths()) == {f"/a/{TOKEN}", f"/hc/{TOKEN}/fail"}
    # b's own /fail; and if b ended first, a's run reports it too (as `run` does per run).
    fails = [body for _, path, body in monitor.seen if "/hc/" in path]
    assert any(body.startswith(b"route=b ") for body in fails)
    assert all(body.startswith(b"route=b ") or b"failing routes: b (send)" in body
               for body in fails)
    assert ("heartbeat pulse: nothing sent (covered route failed: b "
            "(the missing pulse is the alarm))\n") in err
    assert f"heartbeat hc: success {len(fails)}\n" in err  # the /fail pings were delivered
    assert "heartbeat only-a: success 1\n" in err


async def test_a_route_not_checked_in_this_invocation_withholds_the_success(
    make_stack: StackFactory, monitor: Monitor, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`check --route a`: a target covering a and b cannot vouch for b, so it gets no
    pulse and stderr says why; a target of route a alone pulses; one of b is not pinged."""
    a, b = await make_stack(), await make_stack()
    cfg = with_targets(
        routes_config(tmp_path / "c.toml", ("a", a), ("b", b)),
        target("both", monitor.url(f"both/{TOKEN}")),
        target("only-a", monitor.url(f"a/{TOKEN}"), routes=["a"]),
        target("only-b", monitor.url(f"b/{TOKEN}"), routes=["b"]))
    assert await check("--config", str(cfg), "--route", "a", "--heartbeat") == 0
    err = capsys.readouterr().err
    assert monitor.paths() == [f"/a/{TOKEN}"]
    assert ("heartbeat both: nothing sent (covered route not checked in this "
            "invocation: b)\n") in err
    assert "heartbeat only-a: success 1\n" in err
    assert "heartbeat only-b: nothing sent (it covers none of the routes checked)\n" in err


async def test_a_monitor_that_hangs_costs_at_most_the_heartbeat_timeout(
    make_stack: StackFactory, monitor: Monitor, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A monitor that never answers (per-attempt timeout 20 s) is cut at
    --heartbeat-timeout: the ping counts as failed and the exit code stays the verdict."""
    monitor.stall = True
    a = await make_stack()
    cfg = with_targets(routes_config(tmp_path / "c.toml", ("a", a)),
                       target("pulse", monitor.url(f"pulse/{TOKEN}"), timeout=20))
    t0 = time.monotonic()
    assert await check("--config", str(cfg), "--heartbeat", "--heartbeat-timeout", "0.5") == 0
    assert time.monotonic() - t0 < 15  # the attempt alone would take 20 s
    assert len(monitor.seen) == 1
    assert "heartbeat pulse: failure 1\n" in capsys.readouterr().err


@pytest.mark.parametrize(("extra", "message"), [
    ([], "selfcheckd check: --heartbeat: no [[heartbeat]] target is configured "
         "(nor MESSAGES_SELFCHECK_WEBHOOK_URL)\n"),
    (["--heartbeat-timeout", "0"], None),
    (["--heartbeat-timeout", "nan"], None),
])
def test_heartbeat_usage_errors_are_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str],
    message: str | None,
) -> None:
    """--heartbeat with no target, or a timeout that is not positive, sends nothing: exit 2."""
    cfg = tmp_path / "c.toml"
    cfg.write_text('[[selfcheck.routes]]\nname = "a"\nfrom = "x@example.com"\n'
                   'to = "y@example.com"\nsmtp = { host = "smtp" }\nimap = { host = "imap" }\n')
    if message is None:
        cfg.write_text(cfg.read_text() + target("pulse", "http://127.0.0.1:9/p"))
        message = "selfcheckd check: --heartbeat-timeout: must be greater than 0\n"
    assert main(["check", "--config", str(cfg), "--heartbeat", *extra]) == 2
    assert capsys.readouterr().err == message
