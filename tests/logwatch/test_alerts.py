"""The alert webhook against a real aiohttp receiver: body, secret, dedupe, retries, rate."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from structlog.testing import capture_logs

from daemon.logwatch.alerts import AlertSender
from daemon.logwatch.config import AlertWebhook
from daemon.metrics import Metrics
from tests.logwatch.receiver import Sink, alert_sink

SECRET = "s3cret-value-for-tests"


@asynccontextmanager
async def running(sender: AlertSender) -> AsyncIterator[AlertSender]:
    task = asyncio.create_task(sender.run())
    try:
        yield sender
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def until(predicate: Any, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


def _cfg(sink: Sink, **kw: Any) -> AlertWebhook:
    return AlertWebhook(url=sink.url, secret=SECRET, backoff=0.01, timeout=5, **kw)


async def test_posts_alert_sink_json_with_secret_once_per_key() -> None:
    """One POST per distinct key, JSON {summary,severity,source}, X-Alert-Secret header."""
    async with alert_sink() as sink:
        metrics = Metrics()
        async with running(AlertSender(_cfg(sink), metrics)) as sender:
            sender.submit("leak one", key="Q1 a@sinkhole.test")
            sender.submit("leak one again", key="Q1 a@sinkhole.test")
            sender.submit("leak two", key="Q1 b@sinkhole.test")
            await until(lambda: len(sink.requests) == 2)
            await asyncio.sleep(0.1)
    assert sink.requests == [
        ({"summary": "leak one", "severity": "critical", "source": "selfcheckd-leakwatch"},
         SECRET),
        ({"summary": "leak two", "severity": "critical", "source": "selfcheckd-leakwatch"},
         SECRET),
    ]
    assert metrics.leakwatch_alerts.labels(result="sent")._value.get() == 2
    assert metrics.leakwatch_alerts.labels(result="duplicate")._value.get() == 1


async def test_retries_server_errors_with_backoff() -> None:
    """5xx and 429 answers are retried until the sink accepts; one alert arrives."""
    async with alert_sink(statuses=[503, 429, 500]) as sink:
        metrics = Metrics()
        async with running(AlertSender(_cfg(sink, retries=4), metrics)) as sender:
            sender.submit("leak", key="k")
            await until(lambda: len(sink.accepted) == 1)
    assert len(sink.requests) == 4
    assert metrics.leakwatch_alerts.labels(result="sent")._value.get() == 1


async def test_refusal_is_not_retried_and_secret_not_logged() -> None:
    """A 401 (wrong secret) fails at once; the log line names the status, not the secret."""
    async with alert_sink(statuses=[401]) as sink:
        metrics = Metrics()
        with capture_logs() as logs:
            async with running(AlertSender(_cfg(sink), metrics)) as sender:
                sender.submit("leak", key="k")
                await until(lambda: metrics.leakwatch_alerts.labels(result="failed")
                            ._value.get() == 1)
    assert len(sink.requests) == 1
    [failed] = [e for e in logs if e["event"] == "leakwatch_alert_failed"]
    assert failed["problem"] == "HTTP 401"
    assert SECRET not in repr(logs)


async def test_unreachable_sink_gives_up_after_retries() -> None:
    """Connection refusals are retried `retries` times, then counted as failed."""
    cfg = AlertWebhook(url="http://127.0.0.1:9/alert", backoff=0.01, retries=2, timeout=2)
    metrics = Metrics()
    async with running(AlertSender(cfg, metrics)) as sender:
        sender.submit("leak", key="k")
        await until(lambda: metrics.leakwatch_alerts.labels(result="failed")._value.get() == 1)


async def test_rate_limit_folds_excess_into_one_rollup() -> None:
    """Past rate_limit per period, further alerts become one roll-up alert."""
    async with alert_sink() as sink:
        metrics = Metrics()
        cfg = _cfg(sink, rate_limit=2, rate_period=0.5)
        async with running(AlertSender(cfg, metrics)) as sender:
            for i in range(5):
                sender.submit(f"leak {i}", key=str(i))
            await until(lambda: len(sink.requests) == 3)
            await asyncio.sleep(0.7)
    summaries = [body["summary"] for body, _ in sink.requests]
    assert summaries[:2] == ["leak 0", "leak 1"]
    assert summaries[2].startswith("3 further")
    assert len(summaries) == 3
    assert metrics.leakwatch_alerts.labels(result="rate_limited")._value.get() == 3
