"""`selfcheckd run` under faults: health of components, reload all-or-nothing, the stop budget."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import json
import logging
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import web
from structlog.testing import capture_logs

from daemon.app import Daemon
from daemon.config import Config, LoadedConfig, load_config
from daemon.embedded.stack import EmbeddedMailStack
from daemon.logs import MAX_FIELD, configure_logging, install_exception_hooks, redact_secrets
from daemon.metrics import Metrics
from tests.fake_time import FakeClock
from tests.faulty_servers import wedging_proxy
from tests.logwatch.harness import advance_until, until
from tests.test_daemon import Receiver, get, samples
from tests.test_roundtrip import probes_left

LEAK = ("2026-11-23T19:31:53.567357+00:00 vm sendmail[11287]: {qid}: to=<nobody@sinkhole.test>, "
        "delay=00:00:00, mailer=smtp, pri=30237, relay=25, dsn=4.0.0, stat=Deferred\n")


def toml_route(name: str, stack: EmbeddedMailStack, imap_port: int | None = None,
               imap_extra: str = "") -> str:
    r = stack.route_table(name)
    o = stack.options
    return (
        f'[[selfcheck.routes]]\nname = "{name}"\nfrom = "{r["from"]}"\nto = "{r["to"]}"\n'
        f'smtp = {{ host = "127.0.0.1", port = {stack.smtp.port}, security = "none" }}\n'
        f'imap = {{ host = "127.0.0.1", port = {imap_port or stack.imap.port}, '
        f'security = "none", username = "{o.imap_user}", password = "{o.imap_password}"'
        f'{imap_extra} }}\n'
    )


def append(path: Path, text: str) -> None:
    with path.open("a") as f:
        f.write(text)


@contextlib.asynccontextmanager
async def hanging_receiver() -> AsyncIterator[tuple[str, list[str]]]:
    """An HTTP endpoint that accepts requests and never answers (a hung webhook)."""
    seen: list[str] = []
    never = asyncio.Event()

    async def handle(request: web.Request) -> web.Response:
        seen.append(request.path)
        await never.wait()
        return web.Response()

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", seen
    finally:
        never.set()
        await runner.cleanup()


# -- health ------------------------------------------------------------------------------


async def test_a_missing_log_file_is_degraded_and_a_wedged_loop_is_dead(
    tmp_path: Path,
) -> None:
    """A log file missing for 60 s keeps /healthz 200 naming it degraded; a wedged loop is 503."""
    clock = FakeClock()
    config_path = tmp_path / "c.toml"
    config_path.write_text(
        '[server]\nlisten = "127.0.0.1:0"\n'
        f'[leakwatch]\nsource = "file"\nfile = {{ path = "{tmp_path / "absent"}" }}\n')
    daemon = Daemon(load_config(config_path, {}), clock=clock, sleep=clock.sleep)
    await daemon.start()
    try:
        port = daemon.listen_port
        loop = daemon.leakwatch.source_loop  # type: ignore[union-attr]
        assert loop.progress_deadline < 60  # the old rule would have said 503 by now
        await until(lambda: daemon.metrics.registry.get_sample_value(
            "leakwatch_errors_total", {"reason": "file_missing"}))

        async def reads_done() -> None:
            """Fake time moves only while no read is in its (real) thread."""
            await until(lambda: not any(t.name == "leakwatch-file"
                                        for t in threading.enumerate()))
            await clock.settle()

        for second in range(1, 61):  # 60 fake seconds, sampled as a health check would
            await reads_done()
            await clock.advance(1.0)
            await reads_done()
            if second % 5:
                continue
            code, body = await get(port, "/healthz")
            health = json.loads(body)
            assert code == 200, body
            assert health["problems"] == {}
            assert list(health["degraded"]) == ["leakwatch-source"]
            assert health["degraded"]["leakwatch-source"].startswith("file_missing: ")
        m = samples((await get(port, "/metrics"))[1])
        assert m[("selfcheckd_component_up", (("component", "leakwatch-source"),))] == 0
        assert m[("selfcheckd_component_degraded",
                  (("component", "leakwatch-source"), ("reason", "file_missing")))] == 1
        assert m[("selfcheckd_component_up", (("component", "http"),))] == 1
        status = json.loads((await get(port, "/status"))[1])
        assert list(status["degraded"]) == ["leakwatch-source"]
        source = status["components"]["leakwatch-source"]
        assert source["up"] is False and source["reason_code"] == "file_missing"
        (tmp_path / "absent").write_text("")
        await advance_until(clock, lambda: daemon.degraded() == {}, limit=30)
        assert json.loads((await get(port, "/healthz"))[1])["degraded"] == {}

        # Now the loop wedges: a read that never returns, nothing reported. A restart
        # mends that, so liveness fails.
        async def wedged() -> list[str]:
            await asyncio.Event().wait()
            return []

        daemon.leakwatch.source.read = wedged  # type: ignore[method-assign,union-attr]
        await clock.advance(loop.progress_deadline + 5)
        code, body = await get(port, "/healthz")
        assert code == 503
        assert list(json.loads(body)["problems"]) == ["leakwatch-source"]
    finally:
        await daemon.shutdown()


# -- reload --------------------------------------------------------------------------------


def leak_config(tmp_path: Path, stack: EmbeddedMailStack, maillog: Path, listen: str,
                level: str = "info", extra: str = "") -> str:
    return (
        f'[selfcheck]\ninterval = 600\nsecret = "x"\n{toml_route("default", stack)}'
        f'[server]\nlisten = "{listen}"\n[logging]\nlevel = "{level}"\n'
        f'[leakwatch]\nsource = "file"\nstate_file = "{tmp_path / "state.json"}"\n'
        f'file = {{ path = "{maillog}", poll_interval = 0.02 }}\n{extra}'
    )


@contextlib.asynccontextmanager
async def running_leak_daemon(
    tmp_path: Path, stack: EmbeddedMailStack,
) -> AsyncIterator[tuple[Daemon, Path, Path]]:
    """A daemon from a config file with a file leak watcher: (daemon, config path, maillog)."""
    maillog = tmp_path / "maillog"
    maillog.write_text("")
    path = tmp_path / "c.toml"
    path.write_text(leak_config(tmp_path, stack, maillog, "127.0.0.1:0"))
    daemon = Daemon(load_config(path, {}), path)
    await daemon.start()
    try:
        yield daemon, path, maillog
    finally:
        await daemon.shutdown()


async def test_sighup_applies_leakwatch_listen_and_logging(
    mail_stack: EmbeddedMailStack, tmp_path: Path, unused_tcp_port: int,
) -> None:
    """A reload rebuilds the watcher (state handed over), rebinds, relogs; /status agrees."""
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    log_a.write_text("")
    log_b.write_text("")
    path = tmp_path / "c.toml"
    path.write_text(leak_config(tmp_path, mail_stack, log_a, "127.0.0.1:0"))
    daemon = Daemon(load_config(path, {}), path)
    await daemon.start()
    old_port = daemon.listen_port
    leaked = daemon.metrics.leaked_recipients
    try:
        await until(lambda: daemon.metrics.leakwatch_last_poll_success._value.get() > 0)
        append(log_a, LEAK.format(qid="6ANJUQna010773"))
        await until(lambda: leaked._value.get() == 1)
        new_listen = f"127.0.0.1:{unused_tcp_port}"
        path.write_text(leak_config(tmp_path, mail_stack, log_b, new_listen, level="warning"))
        with capture_logs() as logs:
            assert await daemon.reload() is True
        [reloaded] = [e for e in logs if e["event"] == "config_reloaded"]
        assert reloaded["changed"] == "server,logging,leakwatch"
        # The new file is followed; the old one is not; the detector still knows Q1.
        append(log_a, LEAK.format(qid="6ANJUTfa010820"))
        append(log_b, LEAK.format(qid="6ANJUQna010773") + LEAK.format(qid="6ANJVrcF011285"))
        await until(lambda: leaked._value.get() == 2)
        await asyncio.sleep(0.2)
        assert leaked._value.get() == 2
        assert (await get(unused_tcp_port, "/healthz"))[0] == 200
        with pytest.raises(aiohttp.ClientConnectionError):
            await get(old_port, "/healthz")
        assert logging.getLogger().level == logging.WARNING
        status = json.loads((await get(unused_tcp_port, "/status"))[1])
        assert status["config"]["listen"] == new_listen
        assert status["config"]["logging"]["level"] == "warning"
        assert sorted(status["components"]) == [
            "heartbeats", "http", "leakwatch-source", "scheduler"]
    finally:
        await daemon.shutdown()
        logging.getLogger().setLevel(logging.INFO)


async def test_sighup_with_a_port_in_use_changes_nothing(
    mail_stack: EmbeddedMailStack, tmp_path: Path,
) -> None:
    """A listen address that cannot be bound refuses the whole reload, naming the key."""
    blocker = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    taken = blocker.sockets[0].getsockname()[1]
    try:
        async with running_leak_daemon(tmp_path, mail_stack) as (daemon, path, maillog):
            before = daemon.status()["config"]
            path.write_text(leak_config(tmp_path, mail_stack, tmp_path / "other.log",
                                        f"127.0.0.1:{taken}", level="debug"))
            with capture_logs() as logs:
                assert await daemon.reload() is False
            [refused] = [e for e in logs if e["event"] == "config_reload_rejected"]
            assert refused["problem"].startswith(
                f"server.listen: cannot listen on 127.0.0.1:{taken}")
            assert daemon.status()["config"] == before
            assert daemon.leakwatch is not None
            assert daemon.leakwatch.config.file.path == maillog
            assert daemon.metrics.config_reload_ok._value.get() == 0
            assert (await get(daemon.listen_port, "/healthz"))[0] == 200
    finally:
        blocker.close()


async def test_sighup_refuses_switching_to_stdin(
    mail_stack: EmbeddedMailStack, tmp_path: Path,
) -> None:
    """A key that cannot change live refuses the reload with one line naming it."""
    async with running_leak_daemon(tmp_path, mail_stack) as (daemon, path, _maillog):
        path.write_text(path.read_text().replace('source = "file"', 'source = "stdin"'))
        with capture_logs() as logs:
            assert await daemon.reload() is False
        assert [e["problem"] for e in logs if e["event"] == "config_reload_rejected"] == [
            "leakwatch.source: cannot change to or from stdin while running "
            "(standard input is read once; restart selfcheckd)"]
        assert daemon.config.leakwatch is not None
        assert daemon.config.leakwatch.source == "file"


async def test_reload_drops_the_series_of_a_removed_route(
    make_stack: Any, tmp_path: Path,
) -> None:
    """A route removed by a reload leaves no stale series, even if its run ends afterwards."""
    a, b = await make_stack(), await make_stack()
    path = tmp_path / "c.toml"
    head = '[selfcheck]\ninterval = 0.3\ntimeout = 5\nsecret = "x"\n'
    tail = '[server]\nlisten = "127.0.0.1:0"\n'
    path.write_text(head + toml_route("keep", a) + toml_route("gone", b) + tail)
    daemon = Daemon(load_config(path, {}), path)
    await daemon.start()
    try:
        runs = daemon.metrics.runs
        await until(lambda: runs.labels("gone", "success")._value.get() >= 1)
        b.smtp.delivery_delay = 1.0  # the next run of "gone" is still going at the reload
        await until(lambda: "gone" in daemon.scheduler.running, timeout=5)
        path.write_text(head + toml_route("keep", a) + tail)
        assert await daemon.reload() is True
        await until(lambda: "gone" not in daemon.scheduler.running, timeout=10)
        text = (await get(daemon.listen_port, "/metrics"))[1]
        assert 'route="gone"' not in text and 'route="keep"' in text
        assert list(json.loads((await get(daemon.listen_port, "/status"))[1])["routes"]) == [
            "keep"]
    finally:
        await daemon.shutdown()


# -- logging of what escapes -----------------------------------------------------------------


async def test_escaped_exceptions_become_one_structured_line() -> None:
    """An unawaited task's error and an unraisable exception are logged via structlog, counted."""
    metrics = Metrics()
    undo = install_exception_hooks(asyncio.get_running_loop(), metrics)
    try:
        with capture_logs() as logs:
            async def broken() -> None:
                raise RuntimeError("Lock is not acquired.")

            task = asyncio.get_running_loop().create_task(broken())
            await asyncio.sleep(0)
            del task
            gc.collect()

            class Finalizer:
                def __del__(self) -> None:
                    raise RuntimeError("in __del__")

            Finalizer()
            gc.collect()
    finally:
        undo()
    events = {e["event"]: e for e in logs}
    assert "Lock is not acquired" in str(events["event_loop_error"]["exc_info"])
    assert events["unraisable_exception"]["error"] == "RuntimeError: in __del__"
    for kind in ("event_loop", "unraisable"):
        assert metrics.registry.get_sample_value(
            "selfcheckd_internal_errors_total", {"kind": kind}) == 1


# -- the stop budget, as a process -------------------------------------------------------------


async def test_sigterm_with_every_peer_hung_ends_within_the_budget(
    make_stack: Any, tmp_path: Path,
) -> None:
    """Defaults, a wedged IMAP run, hung webhooks: a 2 s route keeps its cadence; exit 0 < 25 s."""
    healthy, stuck = await make_stack(), await make_stack()
    stuck.smtp.delivery_delay = 0.5  # the first search misses it: the run goes into IDLE
    maillog, state = tmp_path / "maillog", tmp_path / "state.json"
    maillog.write_text("")
    async with wedging_proxy(stuck.imap.port, b"IDLE") as proxy, \
            hanging_receiver() as (hook_url, hook_seen):
        cfg = tmp_path / "c.toml"
        cfg.write_text(
            f'[selfcheck]\ninterval = 2\nsecret = "x"\n{toml_route("healthy", healthy)}'
            # Patient enough that the wedged run is still waiting when SIGTERM comes.
            + toml_route("stuck", stuck, imap_port=proxy.port,
                         imap_extra=", command_timeout = 60") +
            '[server]\nlisten = "127.0.0.1:0"\n'
            f'[[heartbeat]]\nurl = "{hook_url}/pulse/tok"\n'
            f'[leakwatch]\nsource = "file"\nstate_file = "{state}"\n'
            f'file = {{ path = "{maillog}", poll_interval = 0.1 }}\n'
            f'alert = {{ url = "{hook_url}/alert" }}\n')
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "daemon.cli", "run", "--config", str(cfg),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            await until(lambda: proc.returncode is not None
                        or (proxy.wedged >= 1 and healthy.smtp.delivered >= 1), timeout=30)
            assert proc.returncode is None, await proc.stderr.read() if proc.stderr else ""
            append(maillog, LEAK.format(qid="6ANJUQna010773"))
            await until(lambda: "/alert" in hook_seen, timeout=30)
            # The healthy route keeps its 2 s cadence while the other one hangs.
            before, started = healthy.smtp.delivered, time.monotonic()
            await until(lambda: healthy.smtp.delivered >= before + 3, timeout=9)
            cadence = time.monotonic() - started
            assert await probes_left(stuck) == 1  # in flight, its run wedged in IDLE
            proc.send_signal(signal.SIGTERM)
            sent_at = time.monotonic()
            code = await asyncio.wait_for(proc.wait(), timeout=40)
            took = time.monotonic() - sent_at
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert proc.stderr is not None
    stderr = (await proc.stderr.read()).decode()
    assert code == 0, stderr
    assert took < 20 + 5, stderr
    assert cadence >= 3.5, stderr  # three more runs at a fixed 2 s rate, within 9 s
    assert "selfcheckd_stopped" in stderr and "leakwatch_stopped" in stderr
    assert "selfcheckd_cancelling_runs running=['stuck']" in stderr
    assert 'error="run cancelled (daemon shutting down)"' in stderr
    assert await probes_left(stuck) == 0  # the shielded cleanup deleted it
    # One record per line, no raw traceback: every line starts with an event name.
    assert all(re.match(r"^[a-z_]+( |$)", line) for line in stderr.splitlines()), stderr
    pending = json.loads(state.read_text())["outbox"]
    assert [a["key"] for a in pending] == ["leak 6ANJUQna010773 nobody@sinkhole.test"]


def test_a_secret_inside_a_library_exception_never_reaches_the_log() -> None:
    """Configured secrets (passwords, URL tokens) are scrubbed from every record, tracebacks too."""
    config = Config.model_validate({
        "selfcheck": {"secret": "probe-secret-1", "routes": [{
            "from": "a@example.com", "to": "b@example.com",
            "smtp": {"host": "smtp", "username": "u", "password": "smtp-pass-2"},
            "imap": {"host": "imap", "username": "u", "password": "imap-pass-3"}}]},
        "heartbeat": [{"url": "https://pulse.example/tok-4444/key-5555"}],
    })
    out = io.StringIO()
    configure_logging("kv", "info", stream=out)
    try:
        redact_secrets(config.secret_values())
        try:
            raise RuntimeError('unexpected tagged response (LOGIN u "imap-pass-3")')
        except RuntimeError:
            structlog.get_logger().exception(
                "event_loop_error", url="https://pulse.example/tok-4444/key-5555")
    finally:
        redact_secrets(())
        configure_logging()
    text = out.getvalue()
    assert "event_loop_error" in text and "unexpected tagged response" in text
    for secret in ("imap-pass-3", "tok-4444", "key-5555"):
        assert secret not in text
    assert len(text.strip().splitlines()) == 1


@pytest.mark.usefixtures("restore_logging")
def test_a_huge_field_is_cut_but_a_traceback_is_kept_whole() -> None:
    """A peer's 560 KB of garbage quoted in a field makes a line no log shipper takes: every
    field is cut at MAX_FIELD, except the traceback, which is the point of the line."""
    out = io.StringIO()
    configure_logging("kv", "info", stream=out)
    try:
        raise RuntimeError("deep " * 1000)
    except RuntimeError:
        structlog.get_logger().exception("something_failed", error="\\xff" * 100_000)
    line = out.getvalue()
    assert len(line) < 2 * MAX_FIELD + len("deep " * 1000) + 2000
    assert line.count("deep ") >= 1000  # the message in the traceback, whole


# -- /probe ------------------------------------------------------------------------------------


def probe_config(stack: EmbeddedMailStack, probe: bool, **server: Any) -> LoadedConfig:
    return LoadedConfig(Config.model_validate({
        "selfcheck": {"interval": 600, "timeout": 5, "secret": "x",
                      "routes": [stack.route_table()]},
        "server": {"listen": "127.0.0.1:0", "probe": probe, **server},
    }), None)


async def test_probe_is_off_unless_configured(mail_stack: EmbeddedMailStack) -> None:
    """Without [server] probe = true, /probe sends nothing and says how to turn it on."""
    daemon = Daemon(probe_config(mail_stack, probe=False))
    await daemon.start()
    try:
        await until(lambda: "default" in daemon.results)
        sent = mail_stack.smtp.delivered
        code, body = await get(daemon.listen_port, "/probe?route=default")
        assert code == 404 and "[server] probe = true" in json.loads(body)["error"]
        assert mail_stack.smtp.delivered == sent
    finally:
        await daemon.shutdown()


async def test_probe_runs_the_route_now_and_answers_its_result(
    mail_stack: EmbeddedMailStack,
) -> None:
    """GET /probe?route=NAME runs a round trip on demand: result JSON with step timings."""
    daemon = Daemon(probe_config(mail_stack, probe=True, probe_min_interval=0))
    await daemon.start()
    try:
        # The start-up run, cleanup included, is over: the probe starts a run of its own.
        await until(lambda: "default" in daemon.results and not daemon.scheduler.running)
        code, body = await get(daemon.listen_port, "/probe?route=default")
        result = json.loads(body)
        assert code == 200 and result["success"] is True, body
        assert [s["step"] for s in result["steps"]][-2:] == ["verify", "cleanup"]
        assert result["run_id"] == daemon.results["default"].run_id
        assert mail_stack.smtp.delivered == 2
        assert daemon.metrics.runs.labels("default", "success")._value.get() == 2
        code, body = await get(daemon.listen_port, "/probe?route=nope")
        assert code == 404 and json.loads(body)["routes"] == ["default"]
        assert (await get(daemon.listen_port, "/probe"))[0] == 400
        # Two routes in one request: which one would run? Neither.
        code, body = await get(daemon.listen_port, "/probe?route=default&route=nope")
        assert code == 400 and "one route" in json.loads(body)["error"]
        assert mail_stack.smtp.delivered == 2
    finally:
        await daemon.shutdown()


async def test_a_probe_during_a_run_joins_it(make_stack: Any) -> None:
    """A probe while the route's run is in flight waits for that run and returns its result."""
    stack = await make_stack()
    stack.smtp.delivery_delay = 1.0  # the start-up run is still waiting when the probe comes
    daemon = Daemon(probe_config(stack, probe=True))
    await daemon.start()
    try:
        await until(lambda: "default" in daemon.scheduler.running)
        code, body = await get(daemon.listen_port, "/probe?route=default")
        assert code == 200 and json.loads(body)["success"] is True
        assert stack.smtp.delivered == 1  # one run, one probe message, shared
        assert json.loads(body)["run_id"] == daemon.results["default"].run_id
    finally:
        await daemon.shutdown()


async def test_a_heartbeat_reload_keeps_what_each_route_last_said(
    make_stack: Any, tmp_path: Path,
) -> None:
    """Replacing the targets by a reload does not make routes count as never run (no pulse gap)."""
    good, other = await make_stack(), await make_stack()
    first, second = await Receiver().start(), await Receiver().start()
    path = tmp_path / "c.toml"
    head = ('[selfcheck]\ninterval = 600\nsecret = "x"\n' + toml_route("good", good)
            + toml_route("other", other) + '[server]\nlisten = "127.0.0.1:0"\n')
    path.write_text(head + f'[[heartbeat]]\nurl = "{first.url}"\n')
    daemon = Daemon(load_config(path, {}), path)
    await daemon.start()
    try:
        await until(lambda: {"good", "other"} <= set(daemon.results))
        path.write_text(head + f'[[heartbeat]]\nurl = "{second.url}"\n')
        assert await daemon.reload() is True
        daemon.heartbeats.run_finished(daemon.results["good"])  # the next run of one route
        assert await daemon.heartbeats.drain(5)
        assert len(second.bodies) == 1  # "other" still counts as succeeded: a pulse
    finally:
        await daemon.shutdown()
        await first.stop()
        await second.stop()
