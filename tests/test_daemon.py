"""`selfcheckd run` in-process and as a process: endpoints, metrics, heartbeats, SIGTERM, soak."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from daemon.app import Daemon
from daemon.config import Config, LoadedConfig, load_config
from daemon.embedded.stack import EmbeddedMailStack
from tests.test_roundtrip import probes_left
from tests.waiting import until


class Receiver:
    """A real HTTP endpoint standing in for updown.io."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> Receiver:
        async def pulse(request: web.Request) -> web.Response:
            assert request.content_type == "application/json"
            self.bodies.append(await request.json())
            return web.Response(text="ok")

        app = web.Application()
        app.router.add_post("/pulse/{token}", pulse)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}/pulse/tok123"
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = await Receiver().start()
    yield r
    await r.stop()


def daemon_config(stack: EmbeddedMailStack, pulse_url: str, **selfcheck: Any) -> Config:
    return Config.model_validate({
        "selfcheck": {"interval": 0.3, "timeout": 5, "secret": "soak-secret",
                      **selfcheck, "routes": [stack.route_table()]},
        "server": {"listen": "127.0.0.1:0"},
        "heartbeat": [{"name": "pulse", "url": pulse_url, "retries": 0}],
        "shutdown_grace": 2,
    })


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def get(port: int, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, http.get(
        f"http://127.0.0.1:{port}{path}", timeout=aiohttp.ClientTimeout(total=5)
    ) as resp:
        return resp.status, await resp.text()


async def test_run_exports_metrics_status_and_heartbeats(
    mail_stack: EmbeddedMailStack, receiver: Receiver
) -> None:
    """Runs move the counters and histograms; each success sends one exact heartbeat."""
    daemon = Daemon(LoadedConfig(daemon_config(mail_stack, receiver.url), None))
    await daemon.start()
    try:
        await until(lambda: len(receiver.bodies) >= 3)
        mail_stack.smtp.drop = True  # the next run fails: no heartbeat may follow it
        await until(lambda: daemon.results["default"].success is False)
        beats_after_failure = len(receiver.bodies)
        await asyncio.sleep(0.5)
        status, text = await get(daemon.listen_port, "/metrics")
        assert status == 200
        m = samples(text)
        route = (("route", "default"),)
        successes = m[("selfcheck_runs_total", (("result", "success"), *route))]
        assert successes >= 3
        assert m[("selfcheck_failures_total", (("reason", "receive_timeout"), *route))] >= 0
        assert m[("selfcheck_send_duration_seconds_count", route)] >= successes
        assert m[("selfcheck_reception_duration_seconds_count", route)] == successes
        assert m[("selfcheck_last_success_timestamp_seconds", route)] > time.time() - 60
        assert m[("selfcheck_heartbeats_total", (("result", "success"), ("target", "pulse")))] \
            == len(receiver.bodies)
        assert m[("selfcheckd_build_info", (("version", "0.1.0"),))] == 1
        assert m[("selfcheckd_config_last_reload_successful", ())] == 1
        assert len(receiver.bodies) == successes == beats_after_failure
        for body in receiver.bodies:
            assert set(body) == {"send_time", "reception_time"}
        assert (await get(daemon.listen_port, "/healthz"))[0] == 200
        assert (await get(daemon.listen_port, "/readyz"))[0] == 200
        code, body = await get(daemon.listen_port, "/status")
        state = json.loads(body)["routes"]["default"]
        assert code == 200 and state["success"] is False and state["reason"] == "receive_timeout"
        assert "soak-secret" not in body and mail_stack.options.imap_password not in body
        assert "tok123" not in text + body
    finally:
        await daemon.shutdown()


async def test_reload_swaps_only_a_valid_config(
    mail_stack: EmbeddedMailStack, receiver: Receiver, tmp_path: Path
) -> None:
    """SIGHUP reload takes a valid file and keeps the running config on an invalid one."""
    path = tmp_path / "c.toml"
    route = mail_stack.route_table()
    toml = (
        '[selfcheck]\ninterval = 0.3\nsecret = "x"\n[[selfcheck.routes]]\n'
        f'from = "{route["from"]}"\nto = "{route["to"]}"\n'
        f'smtp = {{ host = "127.0.0.1", port = {mail_stack.smtp.port}, security = "none" }}\n'
        f'imap = {{ host = "127.0.0.1", port = {mail_stack.imap.port}, security = "none", '
        f'username = "{mail_stack.options.imap_user}", '
        f'password = "{mail_stack.options.imap_password}" }}\n'
        '[server]\nlisten = "127.0.0.1:0"\n'
    )
    path.write_text(toml)
    daemon = Daemon(load_config(path, {}), path)
    await daemon.start()
    try:
        path.write_text(toml.replace("interval = 0.3", "interval = 0.4"))
        assert await daemon.reload() is True
        assert daemon.config.selfcheck.interval == 0.4
        path.write_text(toml.replace("interval = 0.3", "interval = -1"))
        assert await daemon.reload() is False
        assert daemon.config.selfcheck.interval == 0.4
        assert daemon.metrics.config_reload_ok._value.get() == 0
        # TOML has inf and nan; no interval or timeout is either (inf passed validation,
        # then failed the scheduler half-way through the reload).
        for bad in ("inf", "nan"):
            path.write_text(toml.replace("interval = 0.3", f"interval = {bad}"))
            assert await daemon.reload() is False
            assert daemon.config.selfcheck.interval == 0.4
    finally:
        await daemon.shutdown()


async def test_a_reload_that_fails_while_applying_changes_nothing(
    mail_stack: EmbeddedMailStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    closed_port: int,
) -> None:
    """A new config that validates but cannot be built into checks (here: forced) leaves
    the config, routes, listener and /status as they were: nothing half-applied."""
    path = tmp_path / "c.toml"
    write_config(path, mail_stack)
    daemon = Daemon(load_config(path, {}), path)
    await daemon.start()
    try:
        before = (daemon.config, dict(daemon.checks), daemon.listen_port,
                  daemon.status()["config"])
        text = path.read_text()
        path.write_text(text.replace("interval = 600", "interval = 300").replace(
            'listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{closed_port}"'))

        def cannot(_config: Any) -> dict[str, Any]:
            raise ValueError("built from the new config, it fails")

        monkeypatch.setattr(Daemon, "_checks", staticmethod(cannot))
        assert await daemon.reload() is False
        assert (daemon.config, dict(daemon.checks), daemon.listen_port,
                daemon.status()["config"]) == before
        assert daemon.metrics.config_reload_ok._value.get() == 0
    finally:
        await daemon.shutdown()


async def test_each_route_exports_its_interval_from_the_start_and_after_a_reload(
    mail_stack: EmbeddedMailStack, tmp_path: Path,
) -> None:
    """selfcheck_interval_seconds follows the config in force; the failure streak starts at
    0 before any run and survives a reload (the alert rules divide by one, read the other)."""
    path = tmp_path / "c.toml"
    write_config(path, mail_stack)
    daemon = Daemon(load_config(path, {}), path)
    value = daemon.metrics.registry.get_sample_value
    assert value("selfcheck_interval_seconds", {"route": "default"}) == 600
    assert value("selfcheck_consecutive_failures", {"route": "default"}) == 0
    await daemon.start()
    try:
        await until(lambda: "default" in daemon.results)
        daemon.metrics.consecutive_failures.labels("default").set(2)
        path.write_text(path.read_text().replace("interval = 600", "interval = 60"))
        assert await daemon.reload() is True
        assert value("selfcheck_interval_seconds", {"route": "default"}) == 60
        assert value("selfcheck_consecutive_failures", {"route": "default"}) == 2
        path.write_text(path.read_text().replace("interval = 60", "interval = 3600"))
        assert await daemon.reload() is True
        assert value("selfcheck_interval_seconds", {"route": "default"}) == 3600
    finally:
        await daemon.shutdown()


def write_config(path: Path, stack: EmbeddedMailStack, **imap: Any) -> None:
    r = stack.route_table()
    extra = "".join(f", {k} = {json.dumps(v)}" for k, v in imap.items())
    path.write_text(
        'shutdown_grace = 1\n[selfcheck]\ninterval = 600\ntimeout = 30\nsecret = "x"\n'
        f'[[selfcheck.routes]]\nfrom = "{r["from"]}"\nto = "{r["to"]}"\n'
        f'smtp = {{ host = "127.0.0.1", port = {stack.smtp.port}, security = "none" }}\n'
        f'imap = {{ host = "127.0.0.1", port = {stack.imap.port}, security = "none", '
        f'username = "{stack.options.imap_user}", password = "{stack.options.imap_password}"'
        f"{extra} }}\n"
        '[server]\nlisten = "127.0.0.1:0"\n'
    )


async def test_sigterm_during_run_exits_within_grace(
    make_stack: Any, tmp_path: Path
) -> None:
    """SIGTERM mid-run: the process cancels the run after the grace, deletes the probe, exits 0."""
    stack = await make_stack(idle=False)
    stack.smtp.delivery_delay = 0.3  # the first poll misses it; the next is 30 s away
    cfg = tmp_path / "c.toml"
    write_config(cfg, stack, poll_interval=30)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "daemon.cli", "run", "--config", str(cfg),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        await until(lambda: stack.smtp.delivered == 1, timeout=20)
        await asyncio.sleep(0.3)
        assert await probes_left(stack) == 1  # in flight: delivered, not yet seen
        proc.send_signal(signal.SIGTERM)
        sent_at = time.monotonic()
        code = await asyncio.wait_for(proc.wait(), timeout=15)
        took = time.monotonic() - sent_at
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.stderr is not None
    stderr = (await proc.stderr.read()).decode()
    assert code == 0, stderr
    assert took < 1 + 5, stderr  # grace 1 s + cleanup
    assert "selfcheckd_cancelling_runs" in stderr
    assert await probes_left(stack) == 0
    assert "selfcheckd_stopped" in stderr


def _ignores_sighup(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    [mask] = [line.split()[1] for line in status.splitlines() if line.startswith("SigIgn:")]
    return bool(int(mask, 16) & (1 << (signal.SIGHUP - 1)))


async def test_sighup_around_start_and_exit_never_kills_the_daemon(
    mail_stack: EmbeddedMailStack, tmp_path: Path
) -> None:
    """SIGHUPs from the moment `run` begins until it has exited: none is death by signal
    (before the reload handler existed, and after it was removed, HUP killed the process)."""
    cfg = tmp_path / "c.toml"
    write_config(cfg, mail_stack)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "daemon.cli", "run", "--config", str(cfg),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None

    async def hup_until_exit() -> None:
        with contextlib.suppress(ProcessLookupError):
            while proc.returncode is None:
                proc.send_signal(signal.SIGHUP)
                await asyncio.sleep(0.005)

    try:
        await until(lambda: _ignores_sighup(proc.pid), timeout=20)
        hups = asyncio.create_task(hup_until_exit())
        started = b""
        while b"selfcheckd_started" not in started:
            started += await asyncio.wait_for(proc.stderr.readline(), timeout=20)
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), timeout=20)
        await hups
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    rest = (await proc.stderr.read()).decode()
    assert code == 0, rest
    assert "selfcheckd_stopped" in rest


async def test_port_in_use_is_one_line_and_exit_3(
    mail_stack: EmbeddedMailStack, tmp_path: Path
) -> None:
    """Start-up on a taken port prints one clear line and exits with code 3."""
    blocker = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = blocker.sockets[0].getsockname()[1]
    cfg = tmp_path / "c.toml"
    write_config(cfg, mail_stack)
    cfg.write_text(cfg.read_text().replace("127.0.0.1:0", f"127.0.0.1:{port}"))
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "daemon.cli", "run", "--config", str(cfg),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        _out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    finally:
        blocker.close()
    assert proc.returncode == 3
    assert err.decode().strip().splitlines()[-1] == (
        f"selfcheckd: cannot listen on 127.0.0.1:{port}: address already in use "
        "(set [server] listen or SELFCHECKD_LISTEN)"
    )


@pytest.mark.integration
async def test_metrics_page_passes_promtool(
    mail_stack: EmbeddedMailStack, receiver: Receiver, tmp_path: Path
) -> None:
    """Debian's `promtool check metrics` accepts the /metrics page after real runs."""
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is missing under CI (scripts/install-system-deps)")
        pytest.skip("promtool not installed")
    daemon = Daemon(LoadedConfig(daemon_config(mail_stack, receiver.url), None))
    await daemon.start()
    try:
        await until(lambda: len(receiver.bodies) >= 1)
        _, text = await get(daemon.listen_port, "/metrics")
    finally:
        await daemon.shutdown()
    proc = await asyncio.create_subprocess_exec(
        promtool, "check", "metrics", stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(text.encode()), timeout=60)
    assert proc.returncode == 0, out.decode()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def settled_counts(daemon: Daemon, samples: int = 20) -> tuple[int, int]:
    """The fewest tasks and fds seen at moments when nothing is in flight.

    Runs, cleanups and heartbeats come and go every few milliseconds: counted at
    any moment, a busy machine catches more of them in flight at one sample than
    at another. Counted only while no run is going and no heartbeat is queued or
    being sent, and the fewest of those kept, only a leak moves the number.
    """
    tasks, fds = [], []
    deadline = time.monotonic() + 60
    while len(tasks) < samples:
        if not daemon.scheduler.running and daemon.heartbeats.idle:
            tasks.append(len(asyncio.all_tasks()))
            fds.append(open_fds())
        assert time.monotonic() < deadline, "never quiet for a moment"
        await asyncio.sleep(0.001)
    return min(tasks), min(fds)


@pytest.mark.slow
async def test_soak_500_runs_without_growth(
    mail_stack: EmbeddedMailStack, receiver: Receiver
) -> None:
    """500 runs at a very short interval leave tasks, sockets and the mailbox flat."""
    daemon = Daemon(LoadedConfig(daemon_config(mail_stack, receiver.url, interval=0.01), None))
    await daemon.start()
    runs = daemon.metrics.runs.labels("default", "success")
    baseline: tuple[int, int] | None = None
    try:
        await until(lambda: runs._value.get() >= 50, timeout=120)
        baseline = await settled_counts(daemon)
        await until(lambda: runs._value.get() >= 500, timeout=300)
        tasks, fds = await settled_counts(daemon)
    finally:
        await daemon.shutdown()
    assert baseline is not None
    # The heartbeat session may hold one more keep-alive connection than at the
    # baseline (one task and two sockets in this process, counting the receiver's
    # side); a leak of anything per run would be hundreds.
    assert tasks <= baseline[0] + 1, (baseline, tasks)
    assert fds <= baseline[1] + 2, (baseline, fds)
    assert daemon.metrics.failures.labels("default", "receive_timeout")._value.get() == 0
    assert await probes_left(mail_stack) == 0
    assert len(await mail_stack.inbox()) == 0


async def test_a_failing_route_stops_the_pulse_of_a_target_covering_both(
    make_stack: Any, receiver: Receiver,
) -> None:
    """Two routes, one failing every run: updown gets no pulse until it succeeds again."""
    good, bad = await make_stack(), await make_stack()
    bad.smtp.drop = True  # accepted, never delivered: every run of "bad" fails
    config = Config.model_validate({
        "selfcheck": {"interval": 0.3, "timeout": 1, "secret": "s",
                      "routes": [good.route_table("good"), bad.route_table("bad")]},
        "server": {"listen": "127.0.0.1:0"},
        "heartbeat": [{"name": "pulse", "url": receiver.url, "retries": 0}],
    })
    daemon = Daemon(LoadedConfig(config, None))
    await daemon.start()
    try:
        good_runs = daemon.metrics.runs.labels("good", "success")
        await until(lambda: daemon.metrics.runs.labels("bad", "failure")._value.get() >= 2
                    and good_runs._value.get() >= 5, timeout=30)
        await daemon.heartbeats.drain(2)
        assert receiver.bodies == []
        bad.smtp.drop = False
        await until(lambda: len(receiver.bodies) >= 1, timeout=30)
    finally:
        await daemon.shutdown()
