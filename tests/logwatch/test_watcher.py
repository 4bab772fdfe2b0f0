"""run_leakwatch end to end: file source, metrics, webhook, blindness, sinkhole mode, stop."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from aiobotocore.session import get_session
from structlog.testing import capture_logs

from daemon.logwatch.config import FileSource, LeakWatchConfig, SinkholeModeWatch
from daemon.logwatch.sinkhole_mode import SinkholeModeWatcher
from daemon.logwatch.watcher import LeakWatcher, run_leakwatch
from daemon.metrics import Metrics
from tests.logwatch.receiver import alert_sink

REAL = (Path(__file__).parent / "fixtures" / "sendmail_real.log").read_text()


def _value(metric: Any) -> float:
    return float(metric._value.get())


async def until(predicate: Any, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


async def test_file_source_alerts_once_per_leak_and_exports_metrics(tmp_path: Path) -> None:
    """Leaks in a followed file are logged, counted and sent to the webhook once each."""
    log = tmp_path / "maillog"
    log.write_text("")
    secret_file = tmp_path / "secret"
    secret_file.write_text("from-a-file\n")
    async with alert_sink() as sink:
        config = LeakWatchConfig.model_validate({
            "source": "file", "allowed_senders": ["qp-test@*"],
            "file": {"path": str(log), "poll_interval": 0.02},
            "alert": {"url": sink.url, "secret_file": str(secret_file), "backoff": 0.01},
        })
        metrics = Metrics()
        stop = asyncio.Event()
        with capture_logs() as logs:
            task = asyncio.create_task(run_leakwatch(config, metrics, stop))
            await until(lambda: _value(metrics.leakwatch_last_poll_success) > 0)
            with log.open("a") as f:
                f.write(REAL)
                f.write(REAL)  # tail -F restarts re-send lines: no second alert
            await until(lambda: len(sink.requests) == 5)
            await asyncio.sleep(0.2)
            stop.set()
            await asyncio.wait_for(task, 5)
    leaks = [e for e in logs if e["event"] == "sinkhole_leak_detected"]
    assert [e["recipient"] for e in leaks] == [
        "nobody-2@sinkhole.test", "nobody-3@sinkhole.test", "nobody-4@sinkhole.test",
        "nobody-9@sinkhole.test", "nobody-8@sinkhole.test"]
    assert all(e["log_level"] == "error" and e["sender"] == "unknown" for e in leaks)
    assert {s for _, s in sink.requests} == {"from-a-file"}
    assert "nobody-2@sinkhole.test" in sink.requests[0][0]["summary"]
    assert _value(metrics.leaked_recipients) == 5
    assert _value(metrics.test_recipients) == 2
    assert _value(metrics.maillog_lines.labels(kind="to")) == 10
    assert _value(metrics.maillog_lines.labels(kind="from")) == 4
    assert _value(metrics.last_delivery_line) == 1795462313.567357
    assert _value(metrics.leakwatch_lag) > 0


async def test_stop_is_prompt_even_while_source_is_failing(tmp_path: Path) -> None:
    """A missing file is counted as an error, and setting stop returns within a second."""
    config = LeakWatchConfig(source="file", file=FileSource(path=tmp_path / "absent"))
    metrics = Metrics()
    stop = asyncio.Event()
    task = asyncio.create_task(run_leakwatch(config, metrics, stop))
    await until(lambda: _value(metrics.leakwatch_errors.labels(reason="file_missing")) == 1)
    stop.set()
    started = time.monotonic()
    await asyncio.wait_for(task, 5)
    assert time.monotonic() - started < 1.0


def test_blindness_warns_about_loglevel() -> None:
    """sendmail lines without to= lines for blind_after seconds: one LogLevel 9 warning."""
    watcher = LeakWatcher(LeakWatchConfig(source="stdin", blind_after=0.05), Metrics())
    line = "2026-11-23T19:30:26Z h sendmail[1]: 6ANJUQna010773: from=<a@b>, size=1"
    watcher.processor.feed_batch([line])
    watcher.started -= 1
    with capture_logs() as logs:
        watcher.check_blindness()
        watcher.check_blindness()
    blind = [e for e in logs if e["event"] == "leakwatch_blind"]
    assert len(blind) == 1
    assert "LogLevel 9" in blind[0]["hint"]


def test_no_blindness_warning_while_deliveries_flow() -> None:
    """A recent to= line means the watcher can see; no warning."""
    watcher = LeakWatcher(LeakWatchConfig(source="stdin", blind_after=60), Metrics())
    watcher.processor.feed_batch([
        "2026-11-23T19:30:26Z h sendmail[1]: 6ANJUQna010773: to=<a@b.org>, stat=Sent"])
    with capture_logs() as logs:
        watcher.check_blindness()
    assert [e for e in logs if e["event"].startswith("leakwatch_")] == []


async def test_sinkhole_mode_from_ssm(moto_url: str) -> None:
    """The SSM parameter is exported as sinkhole_mode{mode} and accept for too long warns."""
    async with get_session().create_client(
        "ssm", region_name="us-east-1", endpoint_url=moto_url
    ) as ssm:
        await ssm.put_parameter(Name="/cabal/sinkhole_mode", Value="accept", Type="String")
    metrics = Metrics()
    warnings: list[str] = []
    cfg = SinkholeModeWatch(enabled=True, endpoint_url=moto_url, region="us-east-1",
                            interval=0.05, max_accept_duration=3600)
    watcher = SinkholeModeWatcher(cfg, metrics, warn=lambda s, _k: warnings.append(s),
                                  clock=lambda: time.time() + 7200)
    with capture_logs() as logs:
        task = asyncio.create_task(watcher.run())
        await until(lambda: _value(metrics.sinkhole_mode.labels(mode="accept")) == 1)
        await asyncio.sleep(0.2)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert _value(metrics.sinkhole_mode.labels(mode="defer")) == 0
    assert len([e for e in logs if e["event"] == "sinkhole_mode_accepting_too_long"]) == 1
    assert len(warnings) == 1
    assert "set it back to defer" in warnings[0]


async def test_sinkhole_mode_missing_parameter_is_counted(moto_url: str) -> None:
    """A missing parameter is an error counted with a bounded reason, not a crash."""
    metrics = Metrics()
    cfg = SinkholeModeWatch(enabled=True, endpoint_url=moto_url, region="us-east-1",
                            interval=0.05)
    task = asyncio.create_task(SinkholeModeWatcher(cfg, metrics).run())
    await until(lambda: _value(metrics.leakwatch_errors.labels(reason="ssm_api_error")) >= 1)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
