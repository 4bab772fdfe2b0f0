"""No leak lost to a kill: in every saved state a leak is in the outbox or still to be found.

With a server-side filter pattern the watcher looks each leak's sender up (a
FilterLogEvents query over a day, seconds long) after the batch was read and
before the alert is in the outbox; the outbox saves meanwhile. These tests
save at every point of that window and restart from each saved state, in
process and as a real `selfcheckd run` killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from daemon.logwatch.config import LeakWatchConfig
from daemon.logwatch.sources.file import FileTail
from daemon.logwatch.watcher import LeakWatch
from daemon.metrics import Metrics
from tests.logwatch.aws_fakes import Faults, fault_proxy
from tests.logwatch.harness import until, watching
from tests.logwatch.receiver import Sink, alert_sink
from tests.logwatch.test_cloudwatch import GROUP, Logs, _source, from_line, now_ms, to_line

QID_1, QID_2 = "6ANJUQna010773", "6ANJUTfa010820"


def _is_lookup(pattern: str) -> bool:
    return pattern.endswith(': from="')


def _alerted(sink: Sink) -> dict[str, str]:
    """Recipient -> summary of every alert the receiver accepted."""
    out = {}
    for body in sink.accepted:
        for rcpt in ("nobody-1@sinkhole.test", "nobody-2@sinkhole.test"):
            if f"mail to {rcpt} " in body["summary"]:
                out[rcpt] = body["summary"]
    return out


async def _two_leaks(logs: Logs) -> None:
    t = now_ms() - 60_000
    await logs.put(
        (t, from_line(t, QID_1, "app@example.com")),
        (t + 10, to_line(t + 10, QID_1, "nobody-1@sinkhole.test")),
        (t + 20, from_line(t + 20, QID_2, "cron@example.com")),
        (t + 30, to_line(t + 30, QID_2, "nobody-2@sinkhole.test")),
    )


def _watch_config(endpoint: str, state: Path, url: str) -> LeakWatchConfig:
    return LeakWatchConfig(
        source="cloudwatch", state_file=state,
        cloudwatch=_source(endpoint, filter_pattern="sinkhole.test", request_timeout=30),
        alert={"url": url, "backoff": 0.05},
    )


async def test_a_leak_survives_a_kill_at_every_point_of_its_sender_lookup(
    moto_url: str, tmp_path: Path,
) -> None:
    """Saved while each sender lookup of a batch is held, and after, every state restarts
    to an alert for both leaks (a save during a lookup held the event as read and the
    leak as reported before the alert was in the outbox: a kill there lost it)."""
    await _two_leaks(Logs(moto_url))
    state = tmp_path / "state.json"
    saved: list[bytes] = []
    faults = Faults(hold=_is_lookup)
    async with fault_proxy(moto_url, faults) as proxy:
        watch = LeakWatch(_watch_config(proxy, state, "http://127.0.0.1:9/alert"), Metrics())
        await watch.open()
        try:
            async with watch.source.opened():
                batch = await watch.source.read()
                handling = asyncio.create_task(watch.handle_batch(batch))
                for n in (1, 2):
                    await until(lambda n=n: len(faults.held) == n, timeout=20)
                    assert await watch.save()  # the outbox saves as its alerts change
                    saved.append(state.read_bytes())
                    faults.held[n - 1].set_result(None)
                assert await handling
                assert await watch.save()
                saved.append(state.read_bytes())
        finally:
            await watch.close()
    assert len(saved) == 3
    for i, document in enumerate(saved):
        restart = tmp_path / f"restart-{i}.json"
        restart.write_bytes(document)
        async with alert_sink() as sink, watching(_watch_config(moto_url, restart, sink.url)):
            await until(lambda sink=sink: len(_alerted(sink)) == 2, timeout=30)
        alerted = _alerted(sink)
        assert "from app@example.com" in alerted["nobody-1@sinkhole.test"], (i, alerted)
        assert "from cron@example.com" in alerted["nobody-2@sinkhole.test"], (i, alerted)


def _daemon_config(path: Path, proxy: str, state: Path, url: str) -> None:
    path.write_text(
        '[server]\nlisten = "127.0.0.1:0"\n'
        f'[leakwatch]\nsource = "cloudwatch"\nstate_file = "{state}"\n'
        f'[leakwatch.cloudwatch]\nlog_groups = ["{GROUP}"]\nendpoint_url = "{proxy}"\n'
        'region = "us-east-1"\nfilter_pattern = "sinkhole.test"\npoll_interval = 0.1\n'
        "lookback = 3600\nrequest_timeout = 30\nmax_backoff = 1\n"
        f'[leakwatch.alert]\nurl = "{url}"\nbackoff = 0.1\n')


async def _start(config: Path, log: Path) -> asyncio.subprocess.Process:
    with log.open("ab") as out:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "daemon.cli", "run", "--config", str(config),
            stdout=out, stderr=out)


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.kill()
        await proc.wait()


async def test_sigkill_during_a_held_sender_lookup_loses_no_leak(
    moto_url: str, tmp_path: Path,
) -> None:
    """`selfcheckd run` killed with SIGKILL while a leak's sender lookup is held, just after
    the outbox saved (another alert delivered), alerts that leak after a restart."""
    logs = Logs(moto_url)
    t = now_ms() - 60_000
    await logs.put((t, from_line(t, QID_1, "app@example.com")),
                   (t + 10, to_line(t + 10, QID_1, "nobody-1@sinkhole.test")))
    state, config, log = tmp_path / "state.json", tmp_path / "c.toml", tmp_path / "daemon.log"
    arrived: list[dict[str, Any]] = []
    faults = Faults(hold=lambda pattern: pattern == f'"{QID_2}: from="')
    async with fault_proxy(moto_url, faults) as proxy, alert_sink() as sink:
        # The first leak's delivery waits at the receiver until the second one's lookup runs.
        sink.hold = lambda body: arrived.append(body) is None and "nobody-1" in body["summary"]
        _daemon_config(config, proxy, state, sink.url)
        proc = await _start(config, log)
        try:
            await until(lambda: arrived or proc.returncode is not None, timeout=30)
            assert proc.returncode is None, log.read_text()
            t2 = now_ms() - 30_000
            await logs.put((t2, from_line(t2, QID_2, "cron@example.com")),
                           (t2 + 10, to_line(t2 + 10, QID_2, "nobody-2@sinkhole.test")))
            await until(lambda: faults.held, timeout=30)
            sink.release.set()  # delivered: the outbox saves, mid-lookup

            def delivery_saved() -> bool:
                return state.exists() and json.loads(state.read_text())["outbox"] == []

            await until(delivery_saved, timeout=30)
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
        finally:
            await _stop(proc)
        faults.hold = lambda _pattern: False
        proc = await _start(config, log)
        try:
            await until(lambda: "nobody-2@sinkhole.test" in _alerted(sink)
                        or proc.returncode is not None, timeout=30)
            assert proc.returncode is None, log.read_text()
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), timeout=30) == 0, log.read_text()
        finally:
            await _stop(proc)
    assert "from cron@example.com" in _alerted(sink)["nobody-2@sinkhole.test"], log.read_text()
    assert [b["summary"] for b in sink.accepted].count(
        _alerted(sink)["nobody-1@sinkhole.test"]) == 1  # delivered once, not again


async def test_lines_the_file_source_primes_are_alerted_after_a_kill(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Lines completed while the start position was being fixed (after the end was found,
    before it was read) are in the outbox before anything can save the position past them
    (they waited for the first poll: a save by the outbox in between, then a kill, lost them)."""
    log, state = tmp_path / "maillog", tmp_path / "state.json"
    log.write_text(
        "2026-11-23T19:31:53.567357+00:00 vm sendmail[11287]: 6ANJVrcF011285: "
        "to=<nobody@sinkhole.test>, delay=00:00:00, mailer=smtp, pri=30237, relay=25, "
        "dsn=4.0.0, stat=Deferred\n")
    config = {"source": "file", "file": {"path": str(log), "poll_interval": 0.02},
              "state_file": str(state), "alert": {"url": "http://127.0.0.1:9/alert"}}
    # The line lands between the end being found and the read that follows, in one step.
    monkeypatch.setattr(FileTail, "_line_start_near_end",
                        staticmethod(lambda _fd, _size: (0, False)))
    watch = LeakWatch(LeakWatchConfig.model_validate(config), Metrics())
    await watch.open()
    await watch.prime()
    assert await watch.save()  # e.g. the outbox saving a warning, before the first poll
    killed = state.read_bytes()
    await watch.close()
    monkeypatch.undo()
    state.write_bytes(killed)
    async with alert_sink() as sink:
        config["alert"] = {"url": sink.url}
        async with watching(config):
            await until(lambda: len(sink.accepted) == 1, timeout=20)
    assert "nobody@sinkhole.test" in sink.accepted[0]["summary"]
