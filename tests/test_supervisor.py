"""The supervisor: restarts crashed components with backoff, reports health, stops everything."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from structlog.processors import format_exc_info
from structlog.testing import capture_logs

from daemon.metrics import Metrics
from daemon.retry import Backoff
from daemon.supervisor import Progress, Supervisor
from tests.fake_time import FakeClock


class Worker:
    """A component whose behaviour each test scripts."""

    def __init__(self, name: str = "worker", deadline: float = 30.0, crashes: int = 0,
                 returns: bool = False, may_finish: bool = False) -> None:
        self.name = name
        self.progress_deadline = deadline
        self.crashes = crashes
        self.returns = returns
        self.may_finish = may_finish
        self.starts = 0
        self.progress: Progress | None = None
        self.tick = asyncio.Event()

    async def run(self, progress: Progress) -> None:
        self.starts += 1
        self.progress = progress
        if self.starts <= self.crashes:
            raise RuntimeError(f"boom {self.starts}")
        if self.returns:
            return
        while True:
            await self.tick.wait()
            self.tick.clear()
            progress.progress()


def sample(metrics: Metrics, name: str, component: str) -> float | None:
    return metrics.registry.get_sample_value(name, {"component": component})


@pytest.fixture
async def running() -> AsyncIterator[tuple[Supervisor, FakeClock, Metrics]]:
    clock = FakeClock()
    metrics = Metrics()
    sup = Supervisor(metrics, clock=clock, wall=clock, sleep=clock.sleep,
                     restart_backoff=Backoff(initial=1.0, maximum=8.0, jitter=0.0))
    task = asyncio.create_task(sup.run())
    await sup.started()
    yield sup, clock, metrics
    sup.stop()
    await asyncio.wait_for(task, 5)


async def test_crash_is_logged_once_counted_and_restarted_with_backoff(
    running: tuple[Supervisor, FakeClock, Metrics],
) -> None:
    """A component that raises is logged with its traceback, counted, restarted after 1, 2, 4 s."""
    sup, clock, metrics = running
    worker = Worker(crashes=3)
    with capture_logs() as logs:
        sup.start(worker)
        await clock.settle()
        assert worker.starts == 1
        # Its own restart may mend it: degraded, not dead.
        assert sup.problems() == {}
        assert sup.degraded() == {"worker": ("crashed", "RuntimeError: boom 1")}
        assert sample(metrics, "selfcheckd_component_up", "worker") == 0
        await clock.advance(1.0)
        assert worker.starts == 2
        await clock.advance(1.9)
        assert worker.starts == 2  # the second wait is 2 s
        await clock.advance(0.1)
        assert worker.starts == 3
        await clock.advance(4.0)
        assert worker.starts == 4
    crashes = [e for e in logs if e["event"] == "component_crashed"]
    assert [e["restart_in"] for e in crashes] == [1.0, 2.0, 4.0]
    assert all(e["log_level"] == "error" for e in crashes)
    # The traceback itself, as the log renders it (exc_info=True after the except block
    # rendered nothing).
    rendered = [format_exc_info(None, "error", dict(e)).get("exception", "") for e in crashes]
    assert [r.startswith("Traceback") and f"RuntimeError: boom {i}" in r
            for i, r in enumerate(rendered, 1)] == [True] * 3
    assert sample(metrics, "selfcheckd_component_restarts_total", "worker") == 3
    assert sample(metrics, "selfcheckd_component_up", "worker") == 1
    assert sup.problems() == {}


async def test_a_crash_inside_a_task_group_is_named_by_its_cause(
    running: tuple[Supervisor, FakeClock, Metrics],
) -> None:
    """A component whose TaskGroup failed is reported by the error inside the group, not
    by the group's "unhandled errors in a TaskGroup (1 sub-exception)"."""
    sup, clock, _ = running

    class Grouped(Worker):
        async def run(self, progress: Progress) -> None:
            self.starts += 1
            async with asyncio.TaskGroup() as group:
                group.create_task(asyncio.sleep(3600))
                raise OverflowError("backoff too large")

    sup.start(Grouped("grouped"))
    await clock.settle()
    assert sup.degraded() == {"grouped": ("crashed", "OverflowError: backoff too large")}


async def test_returning_without_being_stopped_is_a_death(
    running: tuple[Supervisor, FakeClock, Metrics],
) -> None:
    """A loop that ends on its own is restarted like a crash, unless it may finish."""
    sup, clock, metrics = running
    dead, done = Worker("dead", returns=True), Worker("done", returns=True, may_finish=True)
    sup.start(dead)
    sup.start(done)
    await clock.settle()
    assert "dead" in sup.degraded()
    assert sup.states()["done"]["state"] == "finished"
    await clock.advance(1.0)
    assert dead.starts == 2 and done.starts == 1
    assert sample(metrics, "selfcheckd_component_restarts_total", "done") == 0
    # Finished, it has no deadline left to miss: the stall rule must not fire on it.
    assert sample(metrics, "selfcheckd_component_progress_deadline_seconds", "done") == (
        float("inf"))


async def test_no_progress_within_the_deadline_is_a_stall(
    running: tuple[Supervisor, FakeClock, Metrics],
) -> None:
    """A component that stops reporting progress is named by problems() after its deadline."""
    sup, clock, metrics = running
    worker = Worker(deadline=30.0)
    sup.start(worker)
    await clock.advance(20.0)
    worker.tick.set()
    await clock.advance(29.0)
    assert sup.problems() == {}
    await clock.advance(2.0)
    assert sup.problems() == {"worker": "no progress for 31s (deadline 30s)"}
    assert sample(metrics, "selfcheckd_component_progress_deadline_seconds", "worker") == 30
    assert sample(metrics, "selfcheckd_component_last_progress_timestamp_seconds",
                  "worker") == clock.now - 31


async def test_down_is_exported_and_named_with_its_reason(
    running: tuple[Supervisor, FakeClock, Metrics],
) -> None:
    """down(reason) sets up=0 at once; the reason joins the stall message after the deadline."""
    sup, clock, metrics = running
    worker = Worker(deadline=10.0)
    sup.start(worker)
    await clock.settle()
    assert worker.progress is not None
    worker.progress.down("file_missing: /var/log/maillog", "file_missing")
    assert sample(metrics, "selfcheckd_component_up", "worker") == 0
    assert sup.states()["worker"]["reason"] == "file_missing: /var/log/maillog"
    await clock.advance(11.0)
    assert sup.problems() == {
        "worker": "no progress for 11s (deadline 10s): file_missing: /var/log/maillog"}


async def test_a_loop_that_keeps_retrying_is_degraded_not_dead(
    running: tuple[Supervisor, FakeClock, Metrics],
) -> None:
    """retrying(reason) past the deadline: 200-worthy (no problem), degraded with its code."""
    sup, clock, metrics = running
    worker = Worker(deadline=10.0)
    sup.start(worker)
    await clock.settle()
    assert worker.progress is not None
    for _ in range(6):  # an hour's worth of deadlines would do the same
        worker.progress.retrying("file_missing: /var/log/maillog", "file_missing")
        await clock.advance(5.0)
    assert sup.problems() == {}
    assert sup.degraded() == {"worker": ("file_missing", "file_missing: /var/log/maillog")}
    assert metrics.registry.get_sample_value(
        "selfcheckd_component_degraded", {"component": "worker", "reason": "file_missing"}) == 1
    assert sample(metrics, "selfcheckd_component_up", "worker") == 0
    # It stops retrying and reports nothing more: wedged, whatever it said before.
    await clock.advance(11.0)
    assert "worker" in sup.problems() and sup.degraded() == {}
    assert metrics.registry.get_sample_value(
        "selfcheckd_component_degraded", {"component": "worker", "reason": "file_missing"}) is None


async def test_crashing_again_and_again_is_dead(
    running: tuple[Supervisor, FakeClock, Metrics],
) -> None:
    """A component whose own restarts did not mend it (3 crashes in a row) fails liveness."""
    sup, clock, _ = running
    worker = Worker(crashes=10)
    sup.start(worker)
    await clock.settle()
    await clock.advance(1.0)  # second crash
    assert sup.problems() == {} and "worker" in sup.degraded()
    await clock.advance(2.0)  # third crash
    assert sup.problems() == {
        "worker": "crashed 3 times in a row, restarting (RuntimeError: boom 3)"}
    assert sup.degraded() == {}


async def test_remove_cancels_and_forgets_the_component(
    running: tuple[Supervisor, FakeClock, Metrics],
) -> None:
    """remove() ends the component's task and drops its series."""
    sup, clock, metrics = running
    worker = Worker()
    sup.start(worker)
    await clock.settle()
    assert await sup.remove("worker", timeout=1.0)
    assert sup.names() == []
    assert sample(metrics, "selfcheckd_component_up", "worker") is None


async def test_stop_cancels_every_component() -> None:
    """stop() makes run() return once every component has ended."""
    sup = Supervisor(Metrics())
    workers = [Worker("a"), Worker("b")]
    for w in workers:
        sup.start(w)
    task = asyncio.create_task(sup.run())
    await sup.started()
    await asyncio.sleep(0)
    sup.stop()
    await asyncio.wait_for(task, 2)
    assert all(w.starts == 1 for w in workers)
    assert {s["state"] for s in sup.states().values()} == {"stopped"}


def test_a_name_is_supervised_once() -> None:
    """Two components with one name would share metrics: refused."""
    sup = Supervisor(Metrics())
    sup.start(Worker())
    with pytest.raises(ValueError, match="already supervised"):
        sup.start(Worker())


async def test_a_stray_cancellation_is_a_death_not_a_stop(
    running: tuple[Supervisor, FakeClock, Metrics],
) -> None:
    """A CancelledError nobody asked for (leaked from an inner await) restarts the component."""
    sup, clock, metrics = running

    class Leaky(Worker):
        async def run(self, progress: Progress) -> None:
            if self.starts == 0:
                self.starts += 1
                raise asyncio.CancelledError  # e.g. awaiting a future someone else cancelled
            await super().run(progress)

    worker = Leaky()
    sup.start(worker)
    await clock.settle()
    assert sup.degraded() == {
        "worker": ("crashed", "CancelledError escaped the component")}
    await clock.advance(1.0)
    assert worker.starts == 2
    assert sample(metrics, "selfcheckd_component_restarts_total", "worker") == 1
