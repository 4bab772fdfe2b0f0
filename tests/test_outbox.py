"""The alert outbox against a real aiohttp alert_sink: at-least-once, concurrent, persisted.

Backoff waits run on a fake clock; HTTP is real, so tests wait for requests to
arrive with bounded polls on the receiver's record.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from structlog.testing import capture_logs

from daemon.delivery.outbox import Alert, Outbox, alert_id
from daemon.logwatch.config import AlertWebhook
from daemon.metrics import Metrics
from daemon.supervisor import Supervisor
from tests.fake_time import FakeClock
from tests.logwatch.receiver import Sink, alert_sink
from tests.waiting import until

SECRET = "s3cret-value-for-tests"
SOURCE = "selfcheckd-leakwatch"


def deliveries(metrics: Metrics, result: str) -> float:
    return metrics.registry.get_sample_value(
        "selfcheckd_alert_deliveries_total", {"result": result}) or 0.0


class Harness:
    def __init__(self, outbox: Outbox, clock: FakeClock, metrics: Metrics) -> None:
        self.outbox = outbox
        self.clock = clock
        self.metrics = metrics
        self.saves = 0
        self.expired: list[str] = []

    async def advance_until(self, predicate: Any, limit: float, step: float = 5.0) -> None:
        """Advance fake time in steps, letting real HTTP complete in between."""
        start = self.clock.now
        while not predicate():
            assert self.clock.now - start <= limit, "not reached in fake time"
            await self.clock.advance(step)
            await self.quiet()

    async def quiet(self) -> None:
        """Wait (real time, bounded) until no delivery is in flight."""
        await until(lambda: not self.outbox._in_flight)


@asynccontextmanager
async def running(sink: Sink, wall: Callable[[], float] | None = None,
                  **cfg: Any) -> AsyncIterator[Harness]:
    """An outbox under a supervisor; `wall` replaces the wall clock (else the fake clock)."""
    clock = FakeClock()
    metrics = Metrics()
    config = AlertWebhook.model_validate({"url": sink.url, "secret": SECRET, "timeout": 2,
                                          **cfg})
    harness: Harness | None = None

    async def on_change() -> None:
        assert harness is not None
        harness.saves += 1

    outbox = Outbox(config, metrics, on_change=on_change,
                    on_expired=lambda key: harness.expired.append(key) if harness else None,
                    clock=clock, wall=wall or clock, sleep=clock.sleep)
    harness = Harness(outbox, clock, metrics)
    sup = Supervisor(metrics, clock=clock, wall=clock, sleep=clock.sleep)
    sup.start(outbox)
    task = asyncio.create_task(sup.run())
    await sup.started()
    try:
        yield harness
    finally:
        sup.stop()
        await asyncio.wait_for(task, 5)


async def test_posts_json_with_stable_id_and_secret_once_per_key() -> None:
    """One POST per key: {summary,severity,source,id}, X-Alert-Id and X-Alert-Secret headers."""
    async with alert_sink() as sink, running(sink) as h:
        assert h.outbox.submit("leak one", key="leak Q1 a@sinkhole.test")
        assert not h.outbox.submit("leak one again", key="leak Q1 a@sinkhole.test")
        await until(lambda: len(sink.accepted) == 1)
        await h.quiet()
        assert not h.outbox.submit("and again", key="leak Q1 a@sinkhole.test")
    expected_id = alert_id(SOURCE, "leak Q1 a@sinkhole.test")
    assert sink.requests == [({"summary": "leak one", "severity": "critical", "source": SOURCE,
                               "id": expected_id}, SECRET)]
    assert sink.alert_ids == [expected_id]
    assert deliveries(h.metrics, "sent") == 1
    assert h.metrics.registry.get_sample_value(
        "selfcheckd_alerts_suppressed_total", {"reason": "duplicate"}) == 2
    assert h.metrics.registry.get_sample_value("selfcheckd_alerts_pending") == 0


async def test_outage_longer_than_any_retry_budget_still_delivers() -> None:
    """A webhook answering 503 for ten minutes gets the alert once it recovers, exactly once."""
    async with alert_sink(default=503) as sink, running(sink) as h:
        h.outbox.submit("leak", key="k")
        await until(lambda: len(sink.requests) == 1)
        await h.advance_until(lambda: h.clock.now - 1000.0 >= 600, limit=700)
        failed = len(sink.requests)
        assert failed >= 5 and sink.accepted == []
        assert h.metrics.registry.get_sample_value(
            "selfcheckd_alerts_oldest_pending_age_seconds") >= 600
        assert h.outbox.pending()[0].attempts == failed
        sink.default = 200
        await h.advance_until(lambda: len(sink.accepted) == 1, limit=400)
    assert [body["summary"] for body in sink.accepted] == ["leak"]
    assert deliveries(h.metrics, "failed") == failed
    assert deliveries(h.metrics, "sent") == 1
    assert len(set(sink.alert_ids)) == 1  # every retry carried the same id


async def test_a_hanging_request_does_not_hold_back_other_alerts() -> None:
    """While one delivery hangs, a later alert is delivered; the hung one is retried later."""
    async with alert_sink() as sink, running(sink, timeout=1) as h:
        sink.hold = lambda body: body["summary"] == "stuck" and not sink.release.is_set()
        h.outbox.submit("stuck", key="a")
        await asyncio.sleep(0.05)
        h.outbox.submit("free", key="b")
        await until(lambda: [b["summary"] for b in sink.accepted] == ["free"], timeout=0.9)
        await h.quiet()  # the stuck request times out after 1 s
        assert deliveries(h.metrics, "failed") == 1
        sink.release.set()
        await h.advance_until(lambda: len(sink.accepted) == 2, limit=60, step=1.0)
    assert [b["summary"] for b in sink.accepted] == ["free", "stuck"]


async def test_at_most_max_concurrent_requests_in_flight() -> None:
    """With every request hanging, only max_concurrent are open at once."""
    async with alert_sink() as sink, running(sink, max_concurrent=2, timeout=30) as h:
        sink.hold = lambda _body: True
        for i in range(5):
            h.outbox.submit(f"leak {i}", key=str(i))
        await until(lambda: len(h.outbox._in_flight) == 2)
        await asyncio.sleep(0.1)
        assert len(h.outbox._in_flight) == 2


async def test_a_refused_alert_stays_pending_until_accepted() -> None:
    """A 401 (wrong secret) is counted as rejected and retried; never dropped or logged with it."""
    async with alert_sink(statuses=[401, 401]) as sink, running(sink) as h:
        with capture_logs() as logs:
            h.outbox.submit("leak", key="k")
            await h.advance_until(lambda: len(sink.accepted) == 1, limit=60, step=1.0)
    assert deliveries(h.metrics, "rejected") == 2 and deliveries(h.metrics, "sent") == 1
    failures = [e for e in logs if e["event"] == "alert_delivery_failed"]
    assert [e["error"] for e in failures] == ["HTTP 401", "HTTP 401"]
    assert SECRET not in repr(logs) and sink.url not in repr(logs)


async def test_an_alert_older_than_max_age_expires_loudly() -> None:
    """After max_age undelivered, the alert is counted expired, logged as an error, forgotten."""
    async with alert_sink(default=503) as sink, running(sink, max_age=3600) as h:
        with capture_logs() as logs:
            h.outbox.submit("leak", key="leak Q1 a@sinkhole.test")
            await h.advance_until(lambda: not h.outbox.pending(), limit=4000, step=60)
        assert deliveries(h.metrics, "expired") == 1
        [expired] = [e for e in logs if e["event"] == "alert_expired"]
        assert expired["log_level"] == "error" and expired["summary"] == "leak"
        assert h.expired == ["leak Q1 a@sinkhole.test"]
        # Forgotten: the same leak, logged again by sendmail, alerts again.
        assert h.outbox.submit("leak", key="leak Q1 a@sinkhole.test")


async def test_rate_limit_folds_waiting_alerts_into_one_digest() -> None:
    """Past rate_limit per period, the waiting alerts go out as one digest naming them."""
    async with alert_sink() as sink, running(sink, rate_limit=2, rate_period=60) as h:
        for i in range(5):
            h.outbox.submit(f"leak {i}", key=str(i), severity="warning" if i else "critical")
        await until(lambda: len(sink.accepted) == 2)
        await h.quiet()
        await h.advance_until(lambda: len(sink.accepted) == 3, limit=70)
    summaries = [b["summary"] for b in sink.accepted]
    assert summaries[:2] == ["leak 0", "leak 1"]
    assert summaries[2].startswith("3 further alerts were held back by the rate limit")
    assert all(f"leak {i}" in summaries[2] for i in (2, 3, 4))
    assert h.metrics.registry.get_sample_value(
        "selfcheckd_alerts_suppressed_total", {"reason": "folded"}) == 3


async def test_a_digest_is_saved_before_it_is_sent() -> None:
    """The digest is in the state file before its request leaves: killed just after the
    receiver accepted it, a restart sends the same digest (same id), not its alerts again
    under new ids. The save here is slow, as on EFS."""
    on_disk: set[str] = set()  # the ids the last completed save holds
    seen_on_arrival: dict[str, set[str]] = {}
    clock, metrics = FakeClock(), Metrics()
    async with alert_sink() as sink:
        def note_arrival(body: dict[str, Any]) -> bool:
            seen_on_arrival.setdefault(body["id"], set(on_disk))
            return False  # answered at once

        sink.hold = note_arrival
        config = AlertWebhook.model_validate({"url": sink.url, "timeout": 2,
                                              "rate_limit": 1, "rate_period": 60})
        outbox: Outbox

        async def slow_save() -> None:
            pending = {a.id for a in outbox.pending()}
            await asyncio.sleep(0.05)
            on_disk.clear()
            on_disk.update(pending)

        outbox = Outbox(config, metrics, on_change=slow_save, clock=clock, wall=clock,
                        sleep=clock.sleep)
        sup = Supervisor(metrics, clock=clock, wall=clock, sleep=clock.sleep)
        sup.start(outbox)
        task = asyncio.create_task(sup.run())
        await sup.started()
        try:
            for i in range(4):
                outbox.submit(f"leak {i}", key=str(i))
            await until(lambda: len(sink.accepted) == 1)
            await clock.advance(61)
            await until(lambda: len(sink.accepted) == 2)
        finally:
            sup.stop()
            await asyncio.wait_for(task, 5)
    digest = sink.accepted[1]
    assert digest["summary"].startswith("3 further alerts")
    assert digest["id"] in seen_on_arrival[digest["id"]]


async def test_pending_alerts_carry_over_with_their_id() -> None:
    """A snapshot taken while the sink is down is delivered by a new outbox, same id."""
    async with alert_sink(default=503) as sink, running(sink) as h:
        h.outbox.submit("leak", key="k")
        await until(lambda: len(sink.requests) == 1)
        await h.quiet()
        saved = h.outbox.snapshot()
    assert saved[0]["attempts"] == 1 and saved[0]["admitted"] is True
    async with alert_sink() as sink2, running(sink2) as h2:
        h2.outbox.restore([Alert(**a) for a in saved])
        await h2.clock.advance(0)
        await until(lambda: len(sink2.accepted) == 1)
    assert sink2.alert_ids == [alert_id(SOURCE, "k")]


async def test_flush_tries_every_pending_alert_now() -> None:
    """flush() skips the backoff wait: an alert backed off for minutes goes out at once."""
    async with alert_sink(statuses=[503] * 3) as sink, running(sink, backoff=100,
                                                                max_backoff=300) as h:
        h.outbox.submit("leak", key="k")
        await until(lambda: len(sink.requests) == 1)
        await h.quiet()
        assert not await h.outbox.flush(5.0)  # one more try, answered 503
        assert len(sink.requests) == 2
        sink.statuses.clear()
        assert await h.outbox.flush(5.0)
    assert len(sink.accepted) == 1


def accounted(sink: Sink) -> int:
    """Alerts the receiver accepted, a digest counting what its summary says (by id)."""
    counts: dict[str, int] = {}
    for body in sink.accepted:
        m = re.match(r"([\d,]+) further alerts", body["summary"])
        counts[body["id"]] = int(m.group(1).replace(",", "")) if m else 1
    return sum(counts.values())


async def test_a_flood_is_held_within_max_pending_and_counted_in_full_after_the_heal() -> None:
    """5,000 alerts while the webhook is down: at most max_pending are held, the rest are
    counted in digests; after the heal the accepted alerts account for all 5,000."""
    async with alert_sink(default=503) as sink, running(sink, max_pending=50) as h:
        for i in range(5000):
            assert h.outbox.submit(f"leak {i}", key=f"leak Q{i} a@sinkhole.test")
        assert len(h.outbox.pending()) <= 50 and len(h.outbox.snapshot()) <= 50
        assert sum(a.count for a in h.outbox.pending()) == 5000
        await h.advance_until(lambda: h.clock.now - 1000 >= 900, limit=1000, step=30)
        assert len(h.outbox.pending()) <= 50
        assert sum(a.count for a in h.outbox.pending()) == 5000
        sink.default = 200
        await h.advance_until(lambda: accounted(sink) >= 5000, limit=900, step=30)
        await h.quiet()
    assert accounted(sink) == 5000
    digests = [b["summary"] for b in sink.accepted if "further alerts" in b["summary"]]
    # The first alert not sent on its own leads the first digest (leak 0-9 went alone).
    assert any(d.startswith("4,990 further alerts") and ": leak 10; leak 11;" in d
               for d in digests), digests
    summaries: dict[str, set[str]] = {}
    for body, _ in sink.requests:  # every attempt of one id carried the same text
        summaries.setdefault(body["id"], set()).add(body["summary"])
    assert all(len(texts) == 1 for texts in summaries.values())


async def test_a_failed_attempt_does_not_save_the_outbox() -> None:
    """Retries against a failing webhook change nothing at-least-once needs: no save each."""
    async with alert_sink(default=503) as sink, running(sink) as h:
        h.outbox.submit("leak", key="k")
        await h.advance_until(lambda: len(sink.requests) >= 6, limit=600)
        await h.quiet()
        assert h.saves == 1  # when it was admitted
        sink.default = 200
        await h.advance_until(lambda: len(sink.accepted) == 1, limit=600)
        await h.quiet()
    assert h.saves == 2  # and when it was delivered


async def test_a_wall_clock_step_past_max_age_expires_nothing() -> None:
    """A forward step of the wall clock (NTP, a resumed VM) ages no pending alert; max_age
    is counted on the monotonic clock while the process runs."""
    wall = [1_800_000_000.0]
    async with alert_sink(default=503) as sink, running(sink, wall=lambda: wall[0],
                                                       max_age=3600) as h:
        h.outbox.submit("leak", key="k")
        await until(lambda: len(sink.requests) == 1)
        wall[0] += 2 * 86400
        await h.advance_until(lambda: h.clock.now - 1000 >= 600, limit=700, step=60)
        assert len(h.outbox.pending()) == 1 and deliveries(h.metrics, "expired") == 0
        assert h.metrics.registry.get_sample_value(
            "selfcheckd_alerts_oldest_pending_age_seconds") == pytest.approx(600, abs=61)
        await h.advance_until(lambda: not h.outbox.pending(), limit=3200, step=60)
        assert h.clock.now - 1000 >= 3600
        assert deliveries(h.metrics, "expired") == 1


async def test_a_saved_alert_keeps_its_monotonic_age_across_a_restart() -> None:
    """After a wall step while running, the saved creation time is the wall time matching
    the alert's real age, so the next process neither expires it nor restarts its clock."""
    wall = [1_800_000_000.0]
    async with alert_sink(default=503) as sink, running(sink, wall=lambda: wall[0],
                                                       max_age=7200) as h:
        h.outbox.submit("leak", key="k")
        await until(lambda: len(sink.requests) == 1)
        wall[0] += 2 * 86400
        await h.advance_until(lambda: h.clock.now - 1000 >= 3600, limit=3700, step=60)
        saved = h.outbox.snapshot()
    assert wall[0] - saved[0]["created_at"] == pytest.approx(3600, abs=61)
    wall[0] += 600  # down for ten minutes
    async with alert_sink(default=503) as sink2, running(sink2, wall=lambda: wall[0],
                                                         max_age=7200) as h2:
        h2.outbox.restore([Alert(**a) for a in saved])
        [alert] = h2.outbox.pending()
        assert h2.outbox.age(alert) == pytest.approx(4200, abs=61)
        await h2.advance_until(lambda: not h2.outbox.pending(), limit=3100, step=60)
        assert h2.clock.now - 1000 == pytest.approx(3000, abs=61)


async def test_restoring_a_flooded_outbox_folds_it_within_max_pending() -> None:
    """A state file from before the cap (20,000 alerts and a digest listing 5,000 keys) is
    taken over within max_pending, every alert still counted, the old digest's id kept."""
    old_digest = {"id": alert_id(SOURCE, "digest old"), "key": "digest old",
                  "summary": "5000 further alerts were held back by the rate limit: ...",
                  "severity": "critical", "created_at": 1000.0, "attempts": 3,
                  "last_error": "HTTP 503", "admitted": True,
                  "folded": [f"leak R{i} a@sinkhole.test" for i in range(5000)]}
    saved = [old_digest] + [
        {"id": alert_id(SOURCE, f"leak Q{i}"), "key": f"leak Q{i}", "summary": f"leak {i}",
         "severity": "critical", "created_at": 1000.0, "admitted": i < 10}
        for i in range(20_000)]
    async with alert_sink(default=503) as sink, running(sink, max_pending=100) as h:
        h.outbox.restore([Alert(**a) for a in saved])
        pending = h.outbox.pending()
        assert len(pending) <= 100 and len(h.outbox.snapshot()) <= 100
        assert sum(a.count for a in pending) == 25_000
        assert pending[0].id == old_digest["id"] and pending[0].count == 5000
        assert len(pending[0].folded) <= 10
