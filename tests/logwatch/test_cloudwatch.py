"""CloudWatch polling against moto's server, through a proxy that injects faults."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import time
from pathlib import Path
from typing import Any

import pytest
from aiobotocore.session import get_session
from structlog.testing import capture_logs

from daemon.logwatch import scan_command
from daemon.logwatch.config import CloudWatchSource, LeakWatchConfig
from daemon.logwatch.sources.cloudwatch import CloudWatchPoller, create_logs_client
from daemon.metrics import Metrics
from tests.fake_time import FakeClock
from tests.logwatch.aws_fakes import AWS_ENV, Faults, fault_proxy
from tests.logwatch.harness import advance_until, until, watching

GROUP = "/ecs/cabal-smtp-out"
STREAM = "smtp-out/smtp-out/abc123"


def _ts(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms / 1000)) + f".{ms % 1000:03d}+00:00"


def from_line(ms: int, qid: str, sender: str) -> str:
    return (f"{_ts(ms)} ip-10-0-1-5 sendmail[10773]: {qid}: from=<{sender}>, size=237, "
            "class=0, nrcpts=1, msgid=<m@x>, proto=ESMTP, daemon=MSA, relay=localhost")


def to_line(ms: int, qid: str, rcpt: str, stat: str = "Deferred: 421 4.3.2 Try later") -> str:
    return (f"{_ts(ms)} ip-10-0-1-5 sendmail[10775]: {qid}: to=<{rcpt}>, delay=00:00:00, "
            f"xdelay=00:00:00, mailer=smtp, pri=30237, relay=sinkhole.cabal.internal. "
            f"[127.0.0.2], dsn=4.0.0, stat={stat}")


class Logs:
    """Writes events into moto's CloudWatch Logs."""

    def __init__(self, url: str) -> None:
        self.url = url

    async def put(self, *events: tuple[int, str]) -> None:
        async with get_session().create_client(
            "logs", region_name="us-east-1", endpoint_url=self.url
        ) as client:
            groups = await client.describe_log_groups(logGroupNamePrefix=GROUP)
            if not groups["logGroups"]:
                await client.create_log_group(logGroupName=GROUP)
                await client.create_log_stream(logGroupName=GROUP, logStreamName=STREAM)
            for ms, message in events:
                await client.put_log_events(
                    logGroupName=GROUP, logStreamName=STREAM,
                    logEvents=[{"timestamp": ms, "message": message}])


def _source(url: str, **kw: Any) -> CloudWatchSource:
    base: dict[str, Any] = {
        "log_groups": [GROUP], "endpoint_url": url, "region": "us-east-1",
        "poll_interval": 0.05, "overlap": 300, "lookback": 3600, "page_size": 2,
        "max_backoff": 0.2, "request_timeout": 5,
    }
    base.update(kw)
    return CloudWatchSource(**base)


def now_ms() -> int:
    return int(time.time() * 1000)


async def test_late_ingested_event_is_caught_once(moto_url: str) -> None:
    """An event ingested after newer ones, with an older timestamp, is emitted exactly once."""
    logs = Logs(moto_url)
    t = now_ms() - 120_000
    await logs.put((t, "line-1"), (t + 60_000, "line-3"))
    poller = CloudWatchPoller(_source(moto_url))
    async with create_logs_client(poller.cfg) as client:
        assert await poller.poll_once(client) == ["line-1", "line-3"]
        await logs.put((t + 30_000, "line-2 (late)"))
        assert await poller.poll_once(client) == ["line-2 (late)"]
        assert await poller.poll_once(client) == []
    assert poller.cursor_ms == t + 60_000


async def test_follows_next_token_through_empty_pages(moto_url: str) -> None:
    """Empty pages that still carry a nextToken do not end the query early."""
    logs = Logs(moto_url)
    t = now_ms() - 60_000
    await logs.put(*[(t + i, f"line-{i}") for i in range(5)])
    faults = Faults(empty_pages=3)
    async with fault_proxy(moto_url, faults) as proxy:
        poller = CloudWatchPoller(_source(proxy))
        async with create_logs_client(poller.cfg) as client:
            lines = await poller.poll_once(client)
    assert lines == [f"line-{i}" for i in range(5)]
    assert sum(tok.startswith("injected-") for tok in faults.seen_tokens) == 3


@pytest.mark.parametrize(("fault", "reason"), [("throttles", "throttled"),
                                               ("resets", "connection")])
async def test_backs_off_and_recovers(moto_url: str, fault: str, reason: str) -> None:
    """Throttling and resets beyond botocore's retries are counted and reported down, then heal."""
    logs = Logs(moto_url)
    t = now_ms() - 60_000
    await logs.put((t, "line-a"), (t + 1, "line-b"))
    faults = Faults(**{fault: 8})
    clock = FakeClock()
    async with fault_proxy(moto_url, faults) as proxy:
        config = LeakWatchConfig(source="cloudwatch", cloudwatch=_source(proxy))
        async with watching(config, health_clock=clock, sleep=clock.sleep) as w:
            await until(lambda: w.value("leakwatch_errors_total", reason=reason) >= 1,
                        timeout=30)
            assert w.up("leakwatch-source") == 0
            assert w.value("leakwatch_last_poll_success_timestamp_seconds") == 0
            await advance_until(clock, lambda: w.value("maillog_lines_total", kind="other")
                                + w.value("maillog_lines_total", kind="unparsed") == 2,
                                limit=120)
            assert w.up("leakwatch-source") == 1
    assert w.value("leakwatch_errors_total", reason="other") == 0


async def test_restart_from_checkpoint_neither_misses_nor_repeats(
    moto_url: str, tmp_path: Path
) -> None:
    """A replaced task resumes from the state file: old leaks stay quiet, new ones alert."""
    logs = Logs(moto_url)
    t = now_ms() - 200_000
    await logs.put((t, from_line(t, "6ANJUQna010773", "app@example.com")),
                   (t + 1000, to_line(t + 1000, "6ANJUQna010773", "nobody-1@sinkhole.test")))
    config = LeakWatchConfig(cloudwatch=_source(moto_url, state_file=tmp_path / "state.json"))

    async def run_until(metrics: Metrics, leaks: int) -> list[dict[str, Any]]:
        with capture_logs() as logs_seen:
            async with watching(config, metrics) as w:
                await until(lambda: w.value("leakwatch_last_poll_success_timestamp_seconds")
                            and w.value("sinkhole_leaked_recipients_total") >= leaks,
                            timeout=30)
                await asyncio.sleep(0.3)  # a few more polls: nothing new may appear
        return [e for e in logs_seen if e["event"] == "sinkhole_leak_detected"]

    first = await run_until(Metrics(), 1)
    assert [(e["queue_id"], e["recipient"]) for e in first] == [
        ("6ANJUQna010773", "nobody-1@sinkhole.test")]
    assert first[0]["sender"] == "app@example.com"

    # While "replaced": a retry of the old leak, a late old event, and a new leak.
    await logs.put(
        (t + 2000, to_line(t + 2000, "6ANJUQna010773", "nobody-1@sinkhole.test")),
        (now_ms() - 5000, from_line(now_ms() - 5000, "6ANJVrcF011285", "cron@example.com")),
        (now_ms() - 4000, to_line(now_ms() - 4000, "6ANJVrcF011285", "nobody-8@sinkhole.test")),
    )
    second = await run_until(Metrics(), 1)
    assert [(e["queue_id"], e["recipient"], e["sender"]) for e in second] == [
        ("6ANJVrcF011285", "nobody-8@sinkhole.test", "cron@example.com")]
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["version"] == 2
    assert state["cloudwatch"]["cursor_ms"] is not None


async def test_server_side_filter_looks_up_the_sender(moto_url: str) -> None:
    """With filter_pattern, from= lines are fetched by a targeted query on the queue id."""
    logs = Logs(moto_url)
    t = now_ms() - 60_000
    await logs.put(
        (t, from_line(t, "6ANJUQna010773", "qp-test-2026-05@sub.example.com")),
        (t + 10, to_line(t + 10, "6ANJUQna010773", "nobody-1@sinkhole.test")),
        (t + 20, from_line(t + 20, "6ANJUTfa010820", "app@example.com")),
        (t + 30, to_line(t + 30, "6ANJUTfa010820", "nobody-2@sinkhole.test")),
        (t + 40, "unrelated line"),
    )
    faults = Faults()
    async with fault_proxy(moto_url, faults) as proxy:
        config = LeakWatchConfig(cloudwatch=_source(proxy, filter_pattern="sinkhole.test"))
        metrics = Metrics()
        with capture_logs() as seen:
            async with watching(config, metrics) as w:
                await until(lambda: w.value("sinkhole_leaked_recipients_total") >= 1,
                            timeout=30)
    leaks = [e for e in seen if e["event"] == "sinkhole_leak_detected"]
    assert [(e["recipient"], e["sender"]) for e in leaks] == [
        ("nobody-2@sinkhole.test", "app@example.com")]
    assert metrics.test_recipients._value.get() == 1
    assert "sinkhole.test" in faults.patterns
    assert '"6ANJUQna010773: from="' in faults.patterns
    # Only the to= lines were transferred by the polls: the from= lines matched no poll.
    assert metrics.maillog_lines.labels(kind="from")._value.get() == 0


def test_scan_cloudwatch_since(moto_url: str) -> None:
    """`scan --cloudwatch --since 1h` prints the leaks of the window as JSON lines."""
    t = now_ms() - 60_000
    asyncio.run(Logs(moto_url).put(
        (t, from_line(t, "6ANJUQna010773", "app@example.com")),
        (t + 10, to_line(t + 10, "6ANJUQna010773", "Nobody-14@SinkHole.TEST")),
        (t - 7_200_000, to_line(t - 7_200_000, "6ANJUaaa000001", "old@sinkhole.test")),
    ))
    parser = argparse.ArgumentParser()
    scan_command.add_arguments(parser)
    out, err = io.StringIO(), io.StringIO()
    code = scan_command.run(parser.parse_args(["--cloudwatch", "--since", "1h", "--json"]),
                            LeakWatchConfig(cloudwatch=_source(moto_url)), out, err)
    assert code == 1, err.getvalue()
    [leak] = [json.loads(x) for x in out.getvalue().splitlines()]
    assert (leak["recipient"], leak["sender"]) == ("Nobody-14@SinkHole.TEST", "app@example.com")


def test_scan_cloudwatch_unreachable_is_exit_two(monkeypatch: pytest.MonkeyPatch) -> None:
    """An unreachable endpoint is a clear one-line error and exit 2."""
    for key, value in AWS_ENV.items():
        monkeypatch.setenv(key, value)
    parser = argparse.ArgumentParser()
    scan_command.add_arguments(parser)
    out, err = io.StringIO(), io.StringIO()
    cfg = _source("http://127.0.0.1:9", request_timeout=2)
    code = scan_command.run(parser.parse_args(["--cloudwatch", "--since", "5m"]),
                            LeakWatchConfig(cloudwatch=cfg), out, err)
    assert code == 2
    assert err.getvalue().startswith("scan: CloudWatch query failed (")
