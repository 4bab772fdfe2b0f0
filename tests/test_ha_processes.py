"""Two real `selfcheckd run` processes, one [ha] lease in moto's DynamoDB: issue 21's checks.

Everything they talk to is real and on loopback: moto's server (DynamoDB for the lease,
CloudWatch Logs for the leak source), the embedded mail stack for the round trips, an
aiohttp heartbeat receiver and alert sink. Leases are short (3 s, renewed every 1 s), so
each scenario takes seconds; every timing asserted is the issue's bound.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import boto3  # type: ignore[import-untyped]  # moto's dependency; no stubs installed
import pytest

from daemon.embedded.stack import EmbeddedMailStack
from tests.ha_processes import Cutter, LeakFeed, Proc, processes, stamp, wait_started
from tests.logwatch.aws_fakes import AWS_ENV, moto_server
from tests.logwatch.receiver import Sink, alert_sink
from tests.test_daemon import Receiver
from tests.test_ha_dynamodb import TABLE, create_lease_table

pytestmark = pytest.mark.slow

LEASE, RENEW = 3.0, 1.0
CUT_LEASE, CUT_RENEW = 4.0, 0.5  # the partition test's
# Set to a file to collect the measured hand-over times (JSON lines), e.g. for a report:
# SELFCHECKD_HA_TIMINGS=/tmp/t.jsonl pytest tests/test_ha_processes.py
TIMINGS = os.environ.get("SELFCHECKD_HA_TIMINGS")
BUCKET = "selfcheckd-state-ha"
STATE = f"s3://{BUCKET}/leakwatch-state.json"


@pytest.fixture(scope="module")
def moto_base() -> Iterator[str]:
    yield from moto_server()


@pytest.fixture
async def moto_url(moto_base: str, monkeypatch: pytest.MonkeyPatch) -> str:
    for key, value in AWS_ENV.items():
        monkeypatch.setenv(key, value)
    async with aiohttp.ClientSession() as session, session.post(
            f"{moto_base}/moto-api/reset", timeout=aiohttp.ClientTimeout(total=10)) as resp:
        assert resp.status == 200
    create_lease_table(moto_base)
    s3 = boto3.client("s3", endpoint_url=moto_base, region_name="us-east-1")
    s3.create_bucket(Bucket=BUCKET)
    s3.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
    return moto_base


@pytest.fixture
async def pulses() -> AsyncIterator[Receiver]:
    r = await Receiver().start()
    yield r
    await r.stop()


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    async with alert_sink() as s:
        yield s


@pytest.fixture
async def feed(moto_url: str) -> AsyncIterator[LeakFeed]:
    f = LeakFeed(moto_url)
    await f.setup()
    yield f
    await f.stop()


def write_config(path: Path, *, stack: EmbeddedMailStack, moto: str, lease_endpoint: str,
                 pulse: str, alert: str, state: str, lease: float = LEASE,
                 renew: float = RENEW, grace: float = 5) -> Path:
    route = stack.route_table()
    smtp, imap = route["smtp"], route["imap"]
    assert isinstance(smtp, dict) and isinstance(imap, dict)
    path.write_text(f"""
shutdown_grace = {grace:g}
[selfcheck]
interval = 1
timeout = 5
secret = "ha-process-secret"
[[selfcheck.routes]]
from = "{route['from']}"
to = "{route['to']}"
[selfcheck.routes.smtp]
host = "127.0.0.1"
port = {smtp['port']}
security = "none"
[selfcheck.routes.imap]
host = "127.0.0.1"
port = {imap['port']}
security = "none"
username = "{imap['username']}"
password = "{imap['password']}"
[server]
listen = "127.0.0.1:0"
[logging]
format = "json"
[[heartbeat]]
name = "pulse"
url = "{pulse}"
retries = 0
[leakwatch]
source = "cloudwatch"
state_file = "{state}"
allowed_senders = ["qp-test@*"]
[leakwatch.cloudwatch]
log_groups = ["/ecs/cabal-smtp-out"]
endpoint_url = "{moto}"
region = "us-east-1"
poll_interval = 0.3
lookback = 600
max_backoff = 1
request_timeout = 3
[leakwatch.alert]
url = "{alert}"
backoff = 0.2
max_backoff = 1
rate_limit = 10000
[ha]
lease_table = "{TABLE}"
lease_duration = {lease:g}
renew_every = {renew:g}
region = "us-east-1"
endpoint_url = "{lease_endpoint}"
""")
    return path


async def roles(*procs: Proc) -> list[str | None]:
    return list(await asyncio.gather(*(p.role() for p in procs)))


async def one_leader(a: Proc, b: Proc, timeout: float = 20.0) -> tuple[Proc, Proc]:
    """Wait until exactly one of them leads; (leader, standby)."""
    deadline = time.monotonic() + timeout
    while True:
        ra, rb = await roles(a, b)
        if {ra, rb} == {"leader", "standby"}:
            return (a, b) if ra == "leader" else (b, a)
        assert time.monotonic() < deadline, f"roles {ra}, {rb}:\n{a.log_text()}\n{b.log_text()}"
        await asyncio.sleep(0.05)


async def never_two_leaders(a: Proc, b: Proc, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        assert await roles(a, b) != ["leader", "leader"]
        await asyncio.sleep(0.05)


def alert_ids_by_leak(sink: Sink) -> dict[str, set[str | None]]:
    """For each leaked recipient: the X-Alert-Ids of the accepted deliveries naming it."""
    ids: dict[str, set[str | None]] = defaultdict(set)
    for (body, _secret), alert_id, ok in zip(sink.requests, sink.alert_ids, sink.oks,
                                             strict=True):
        if ok:
            rcpt = body["summary"].split("mail to ", 1)[1].split(" ", 1)[0]
            ids[rcpt].add(alert_id)
    return ids


async def until(predicate: Any, timeout: float, what: str, *procs: Proc) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what}:\n" + "\n".join(
            p.log_text() for p in procs)
        await asyncio.sleep(0.05)


async def leader_work(p: Proc) -> dict[str, float]:
    """What a process did as leader: round trips and alerts (its log), pulses (/metrics)."""
    pulses = 0.0
    async with aiohttp.ClientSession() as http, http.get(
            f"http://127.0.0.1:{p.port}/metrics", timeout=aiohttp.ClientTimeout(total=5)) as r:
        for line in (await r.text()).splitlines():
            if line.startswith("selfcheck_heartbeats_total{") and 'result="success"' in line:
                pulses += float(line.rsplit(" ", 1)[1])
    return {"runs": len(p.events("selfcheck_completed")), "pulses": pulses,
            "alerts": len(p.events("alert_delivered"))}


async def test_two_processes_one_leader_and_sigkill_hands_over_every_leak_once(
        make_stack: Any, moto_url: str, pulses: Receiver, sink: Sink, feed: LeakFeed,
        tmp_path: Path) -> None:
    """Started in the same instant: one leader, which alone sends probes, pulses and leak
    alerts. SIGKILL it while leaks keep coming: the standby leads within lease_duration +
    renew_every, and every leak is alerted, none twice under different ids."""
    stack = await make_stack()
    common = {"stack": stack, "moto": moto_url, "lease_endpoint": moto_url,
              "pulse": pulses.url, "alert": sink.url, "state": STATE}
    a = Proc("a", write_config(tmp_path / "a.toml", **common), {})
    b = Proc("b", write_config(tmp_path / "b.toml", **common), {})
    async with processes(a, b):
        await wait_started(a, b)
        leader, standby = await one_leader(a, b)
        await never_two_leaders(a, b, 2.0)
        feed.start()
        await until(lambda: len(sink.accepted) >= 5 and len(pulses.bodies) >= 2, 30,
                    "alerts and pulses from the leader", a, b)
        # The standby did none of the leader's work.
        assert await leader_work(standby) == {"runs": 0, "pulses": 0, "alerts": 0}
        done = await leader_work(leader)
        assert done["runs"] >= 1
        assert done["pulses"] >= 1
        assert done["alerts"] >= 5
        leader.signal(signal.SIGKILL)
        killed = time.time()
        await until(lambda: standby.first("ha_leading") is not None, 30, "takeover", standby)
        await asyncio.sleep(3.0)  # leaks keep arriving under the new leader
        await feed.stop()
        await until(lambda: set(alert_ids_by_leak(sink)) >= {r for _, r in feed.written},
                    30, "every leak alerted", standby)
        assert await standby.role() == "leader"
        assert (await leader_work(standby))["runs"] >= 1
    leads = standby.first("ha_leading")
    assert leads is not None
    took = stamp(leads) - killed  # both on this host's clock
    record("sigkill_to_new_leader", took)
    assert took <= LEASE + RENEW, f"took {took:.2f}s"
    ids = alert_ids_by_leak(sink)
    assert len(feed.written) >= 10
    twice = {rcpt: alert_ids for rcpt, alert_ids in ids.items() if len(alert_ids) != 1}
    assert twice == {}


async def test_sigterm_hands_over_within_renew_every_plus_one_second(
        make_stack: Any, moto_url: str, pulses: Receiver, sink: Sink, feed: LeakFeed,
        tmp_path: Path) -> None:
    """SIGTERM: the leader stops, saves, releases the lease and exits 0 within the budget;
    the standby leads within renew_every + 1 s; leaks still all alerted, once each."""
    stack = await make_stack()
    common = {"stack": stack, "moto": moto_url, "lease_endpoint": moto_url,
              "pulse": pulses.url, "alert": sink.url, "state": STATE}
    a = Proc("a", write_config(tmp_path / "a.toml", **common), {})
    b = Proc("b", write_config(tmp_path / "b.toml", **common), {})
    async with processes(a, b):
        await wait_started(a, b)
        leader, standby = await one_leader(a, b)
        feed.start()
        await until(lambda: len(sink.accepted) >= 3, 30, "alerts", a, b)
        leader.signal(signal.SIGTERM)
        sent = time.time()
        await until(lambda: standby.first("ha_leading") is not None, 30, "takeover", standby)
        assert await standby.role() == "leader"
        code = await leader.wait(timeout=15)
        exited = time.time() - sent
        leads = standby.first("ha_leading")
        assert leads is not None
        took = stamp(leads) - sent
        record("sigterm_to_new_leader", took)
        record("sigterm_to_exit", exited)
        await asyncio.sleep(1.5)
        await feed.stop()
        await until(lambda: set(alert_ids_by_leak(sink)) >= {r for _, r in feed.written},
                    30, "every leak alerted", standby)
    assert code == 0, leader.log_text()
    timeline = sorted([(stamp(e), p.name, e["event"]) for p in (leader, standby)
                       for e in p.lines if e.get("event") in TIMELINE and stamp(e) >= sent - 0.5])
    assert took <= RENEW + 1.0, f"took {took:.2f}s:\n" + "\n".join(
        f"{t - sent:+.3f} {who} {event}" for t, who, event in timeline)
    assert exited < 5 + 5  # shutdown_grace + the daemon's overrun bound
    assert leader.first("ha_lease_released") is not None
    twice = {r: i for r, i in alert_ids_by_leak(sink).items() if len(i) != 1}
    assert twice == {}


async def test_a_leader_cut_off_stops_acting_before_its_lease_expires_and_its_late_write_is_refused(
        make_stack: Any, moto_url: str, pulses: Receiver, sink: Sink, feed: LeakFeed,
        tmp_path: Path) -> None:
    """A proxy between the leader and AWS (its DynamoDB and S3 endpoint) stops forwarding:
    the leader halts its work (by its own log's clock) before the lease's expiry in the
    item, the standby acquires after it; the two never act at once. The state write the
    proxy held back reaches S3 late, after the new leader's claim, and is refused (412):
    the object stays the new leader's. Healed, the old leader stands by, and leads again
    (token 3, on the state the other left) when the other is killed."""
    stack = await make_stack()
    host, _, port = moto_url.removeprefix("http://").partition(":")
    cutter = await Cutter((host, int(port))).start()
    try:
        # A longer lease and a shorter renew_every than the other tests': the new leader
        # claims the state at most 2 x renew_every (and its S3 client's start, slow on a
        # loaded machine) after the cut-off one halted (its last renewal applied, the
        # answer lost), well inside the lease its fenced save waits (the grace is long
        # enough not to shorten that): it is still waiting when S3 refuses the write.
        common = {"stack": stack, "moto": moto_url, "pulse": pulses.url, "alert": sink.url,
                  "state": STATE, "lease": CUT_LEASE, "renew": CUT_RENEW,
                  "grace": 10}
        a = Proc("a", write_config(tmp_path / "a.toml", lease_endpoint=cutter.url, **common),
                 {})
        b = Proc("b", write_config(tmp_path / "b.toml", lease_endpoint=moto_url, **common),
                 {})
        async with processes(a):
            await wait_started(a)
            await until(lambda: a.first("ha_leader_work_started") is not None, 20, "a leads",
                        a)
            async with processes(b):
                await wait_started(b)
                feed.start()
                await until(lambda: len(sink.accepted) >= 2, 30, "alerts", a, b)
                cutter.cut()
                await asyncio.sleep(0.3)  # a renewal already in moto lands; none after
                a_expiry = float(lease_item(moto_url)["expires"]["N"])
                await until(lambda: b.first("leakwatch_started") is not None, 20,
                            "b takes over and reads the state", a, b)
                cutter.heal()  # what a sent before and after the cut arrives now, late
                item = lease_item(moto_url)
                await asyncio.sleep(1.0)
                await feed.stop()
                await until(lambda: set(alert_ids_by_leak(sink))
                            >= {r for _, r in feed.written}, 30, "every leak alerted", b)
                await asyncio.sleep(1.0)
                # Healed, the deposed leader is a standby like any other (its fenced
                # store was its last term's), ...
                assert await roles(a, b) == ["standby", "leader"]
                b_state = state_object(moto_url)
                # ... and leads again when b dies, on the state b left: token 3.
                b.signal(signal.SIGKILL)
                killed = time.time()
                feed.start()
                await until(lambda: len(a.events("ha_leading")) >= 2, 30, "a leads again", a)
                await asyncio.sleep(1.0)
                await feed.stop()
                await until(lambda: set(alert_ids_by_leak(sink))
                            >= {r for _, r in feed.written}, 30, "every leak alerted", a)
                await until(lambda: state_object(moto_url)[1]["selfcheckd-token"] == "3", 10,
                            "a claims the state", a)
    finally:
        await cutter.close()
    again = a.events("ha_leading")[1]
    # Not held to the SIGKILL bound here (the first test is): with renew_every
    # 0.5 s the expected time, up to a lease after b's last renewal, is 0.5 s below it.
    record("partition_healed_then_sigkill_to_old_leader", stamp(again) - killed)
    assert state_object(moto_url)[0]["fence"] == {"holder": a.events("ha_lease_acquired")[1][
        "holder"], "token": 3}
    halted = a.first("ha_leader_work_halted")
    acquired = b.first("ha_lease_acquired")
    assert halted is not None, a.log_text()
    assert acquired is not None
    record("partition_halt_before_expiry", a_expiry - stamp(halted))
    record("partition_expiry_to_new_leader", stamp(acquired) - a_expiry)
    assert stamp(halted) < a_expiry, (stamp(halted), a_expiry)
    assert stamp(acquired) >= a_expiry - 0.01
    assert stamp(halted) < stamp(acquired)
    assert item["holder"]["S"] == acquired["holder"]
    assert int(item["token"]["N"]) == 2
    twice = {r: i for r, i in alert_ids_by_leak(sink).items() if len(i) != 1}
    assert twice == {}
    # a's held-back write reached S3 after b's claim and was refused (412), and a, still
    # waiting for it (a deposed leader's fenced save may wait up to a lease), saw that.
    # (The proxy alone cannot show it: PutObject sends `Expect: 100-continue`, so a write
    # given up before the heal never sent its body and S3 had nothing to refuse.)
    refused = a.first("state_save_refused")
    assert refused is not None, (cutter.late_answers, a.log_text())
    record("partition_halt_to_refusal_seen", stamp(refused) - stamp(halted))
    assert stamp(refused) > stamp(acquired)
    body, meta = b_state
    assert body["fence"] == {"holder": acquired["holder"], "token": 2}
    assert meta["selfcheckd-token"] == "2"


def state_object(moto_url: str) -> tuple[dict[str, Any], dict[str, str]]:
    import json

    answer = boto3.client("s3", endpoint_url=moto_url, region_name="us-east-1").get_object(
        Bucket=BUCKET, Key="leakwatch-state.json")
    return json.loads(answer["Body"].read()), answer["Metadata"]


TIMELINE = {"selfcheckd_signal", "ha_stepping_down", "ha_leader_work_halted",
            "leakwatch_stopped", "ha_standby", "ha_lease_released", "ha_lease_acquired",
            "ha_leading", "selfcheckd_stopped", "state_file_write_failed"}


def record(what: str, seconds: float) -> None:
    """A measured time, kept when SELFCHECKD_HA_TIMINGS names a file (never asserted on
    here: the assertions are the issue's bounds)."""
    if TIMINGS:
        with open(TIMINGS, "a", encoding="utf-8") as out:
            out.write(json.dumps({"what": what, "seconds": round(seconds, 3)}) + "\n")


def lease_item(moto_url: str) -> dict[str, Any]:
    item: dict[str, Any] = boto3.client("dynamodb", endpoint_url=moto_url,
                                        region_name="us-east-1").get_item(
        TableName=TABLE, Key={"key": {"S": "selfcheckd"}}, ConsistentRead=True)["Item"]
    return item
