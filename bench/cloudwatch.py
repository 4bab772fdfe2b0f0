"""The CloudWatch source against moto's server: API calls per idle poll, put-to-alert latency.

The watcher runs as `run` runs it (LeakWatch under a Supervisor, tests/logwatch/harness.py),
reading moto through the counting proxy of tests/logwatch/aws_fakes.py, and alerting a local
webhook receiver. Both settings that decide the latency are the shipped defaults except
`poll_interval`, given here: the latency is about half of it plus the work.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from dataclasses import dataclass
from typing import Any

from bench import procs

GROUP = "/ecs/cabal-smtp-out"
STREAM = "smtp-out/smtp-out/bench"


@dataclass
class CloudWatchBench:
    poll_interval: float
    idle_polls: int
    idle_calls: int
    latencies: list[float]  # seconds from PutLogEvents returning to the webhook receiving
    failures: int

    @property
    def calls_per_idle_poll(self) -> float:
        return self.idle_calls / self.idle_polls if self.idle_polls else float("nan")


def _ts(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms / 1000)) + f".{ms % 1000:03d}+00:00"


def _lines(ms: int, i: int) -> list[str]:
    qid = f"6ANJBn{i:02d}{i:06d}"
    return [
        f"{_ts(ms)} ip-10-0-1-5 sendmail[10773]: {qid}: from=<app@example.com>, size=237, "
        "class=0, nrcpts=1, msgid=<m@x>, proto=ESMTP, daemon=MTA, relay=localhost",
        f"{_ts(ms)} ip-10-0-1-5 sendmail[10775]: {qid}: to=<nobody-{i}@sinkhole.test>, "
        "delay=00:00:00, xdelay=00:00:00, mailer=smtp, pri=30237, relay=sinkhole.cabal."
        "internal. [127.0.0.2], dsn=4.0.0, stat=Deferred: 421 4.3.2 Try later",
    ]


async def _measure(moto: str, poll_interval: float, idle_seconds: float,
                   leaks: int) -> CloudWatchBench:
    from aiobotocore.session import get_session

    from daemon.logwatch.config import LeakWatchConfig
    from tests.logwatch.aws_fakes import Faults, fault_proxy
    from tests.logwatch.harness import watching
    from tests.logwatch.receiver import alert_sink

    session = get_session()
    async with session.create_client("logs", region_name="us-east-1",
                                     endpoint_url=moto) as client:
        await client.create_log_group(logGroupName=GROUP)
        await client.create_log_stream(logGroupName=GROUP, logStreamName=STREAM)
        # Some history inside the re-queried overlap, as a live stream has.
        now = int(time.time() * 1000) - 60_000
        history: list[Any] = [{"timestamp": now + i, "message": f"{_ts(now + i)} ip-10-0-1-5 "
                    f"sendmail[1]: STARTTLS=client, relay=mx{i}.example.org., verify=OK"}
                   for i in range(50)]
        await client.put_log_events(logGroupName=GROUP, logStreamName=STREAM,
                                    logEvents=history)
        faults = Faults()
        received: dict[str, float] = {}

        def seen(body: dict[str, Any]) -> bool:
            summary = str(body.get("summary", ""))
            for i in range(leaks):
                if f"nobody-{i}@sinkhole.test" in summary:
                    received.setdefault(str(i), time.perf_counter())
            return False

        async with fault_proxy(moto, faults) as proxy, alert_sink() as sink:
            sink.hold = seen
            config = LeakWatchConfig.model_validate({
                "source": "cloudwatch",
                "cloudwatch": {"log_groups": [GROUP], "endpoint_url": proxy,
                               "region": "us-east-1", "poll_interval": poll_interval},
                "alert": {"url": sink.url, "rate_limit": 1000},
            })
            async with watching(config) as w:
                poller = w.watch.poller
                assert poller is not None
                polls = 0
                poll_once = poller.poll_once

                async def counted(client: Any) -> list[str]:
                    nonlocal polls
                    polls += 1
                    return await poll_once(client)

                poller.poll_once = counted  # type: ignore[method-assign]
                # Idle: the history is already read; count calls over whole polls.
                await asyncio.sleep(poll_interval * 1.5)
                polls_before, calls_before = polls, faults.filter_calls
                await asyncio.sleep(idle_seconds)
                idle_polls = polls - polls_before
                idle_calls = faults.filter_calls - calls_before
                latencies: list[float] = []
                rnd = random.Random(3)
                for i in range(leaks):
                    ms = int(time.time() * 1000)
                    events: list[Any] = [{"timestamp": ms, "message": m}
                                         for m in _lines(ms, i)]
                    await client.put_log_events(logGroupName=GROUP, logStreamName=STREAM,
                                                logEvents=events)
                    put_at = time.perf_counter()
                    deadline = put_at + poll_interval * 3 + 10
                    while str(i) not in received and time.perf_counter() < deadline:
                        await asyncio.sleep(0.005)
                    if str(i) in received:
                        latencies.append(received[str(i)] - put_at)
                    # The next one at another (seeded, random) phase of the poll cycle.
                    await asyncio.sleep(rnd.uniform(0, poll_interval))
    return CloudWatchBench(poll_interval, idle_polls, idle_calls, latencies,
                           leaks - len(latencies))


def cloudwatch_bench(poll_interval: float, idle_seconds: float, leaks: int) -> CloudWatchBench:
    from tests.logwatch.aws_fakes import AWS_ENV, moto_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's access log
    saved = {k: os.environ.get(k) for k in AWS_ENV}
    os.environ.update(AWS_ENV)
    server = moto_server()
    try:
        moto = next(server)
        return asyncio.run(_measure(moto, poll_interval, idle_seconds, leaks))
    finally:
        for _ in server:  # runs the generator's finally: stops the server
            pass
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def p50(values: list[float]) -> float:
    return procs.percentile(values, 50)


def p95(values: list[float]) -> float:
    return procs.percentile(values, 95)
