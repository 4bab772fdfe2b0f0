"""Scheduler: cadence, jitter, no-overlap, deadlines, reload, shutdown; fake time, milliseconds."""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import re
import signal
from collections.abc import Callable

import pytest
from structlog.testing import capture_logs

from daemon.checks.scheduler import IDLE_TICK, Job, Scheduler

# A safety net in real seconds: a bug that spins the fake clock forever fails fast.
REAL_TIMEOUT = 5.0


class FakeTime:
    """A discrete-event clock: sleeping jumps from one scheduled event to the next.

    `at(t, fn)` calls `fn` when the clock reaches `t`; that is how tests stop or reload
    the scheduler or let a "slow" job finish at a chosen time. Before each jump the
    loop gets a few turns, so whatever was woken at the current time runs at that time.
    """

    SETTLE_TURNS = 10

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []
        self.oversleep: dict[float, float] = {}  # a sleep starting at t lasts this much longer
        self._hooks: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()  # equal times run in the order they were set

    def clock(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.sleeps.append(delay)
        target = self.now + delay + self.oversleep.pop(self.now, 0.0)
        await self._settle()
        while self._hooks and min(self._hooks)[0] <= target:
            hook = min(self._hooks)
            self._hooks.remove(hook)
            self.now = max(self.now, hook[0])
            hook[2]()
            await self._settle()  # a hook that wakes the scheduler cancels us here
        self.now = max(self.now, target)

    async def _settle(self) -> None:
        for _ in range(self.SETTLE_TURNS):
            await asyncio.sleep(0)

    def at(self, when: float, hook: Callable[[], None]) -> None:
        self._hooks.append((when, next(self._order), hook))

    def reached(self, when: float) -> asyncio.Event:
        event = asyncio.Event()
        if self.now >= when:
            event.set()
        else:
            self.at(when, event.set)
        return event


class Body:
    """A job body that records its start times and takes `duration` of fake time."""

    def __init__(self, fake: FakeTime, duration: float = 0.0) -> None:
        self.fake = fake
        self.duration = duration
        self.starts: list[float] = []
        self.ends: list[float] = []

    async def __call__(self) -> None:
        start = self.fake.now
        self.starts.append(start)
        if self.duration:
            await self.fake.reached(start + self.duration).wait()
        self.ends.append(self.fake.now)


class Counts:
    """Collects on_skip and on_deadline calls with the fake time they happened at."""

    def __init__(self, fake: FakeTime) -> None:
        self.fake = fake
        self.skips: list[tuple[str, int, float]] = []
        self.deadlines: list[tuple[str, float]] = []

    def on_skip(self, name: str, count: int) -> None:
        self.skips.append((name, count, self.fake.now))

    def on_deadline(self, name: str) -> None:
        self.deadlines.append((name, self.fake.now))


def scheduler(fake: FakeTime, jobs: list[Job], counts: Counts | None = None,
              rng: random.Random | None = None) -> Scheduler:
    counts = counts or Counts(fake)
    return Scheduler(jobs, clock=fake.clock, sleep=fake.sleep, rng=rng,
                     on_skip=counts.on_skip, on_deadline=counts.on_deadline)


async def run_until(fake: FakeTime, sched: Scheduler, horizon: float) -> None:
    """Run the scheduler until stop() at fake time `horizon`."""
    fake.at(horizon, sched.stop)
    async with asyncio.timeout(REAL_TIMEOUT):
        await sched.run()


async def assert_clean_shutdown(sched: Scheduler, timeout: float | None = None) -> None:
    """Cancel what is left and check the scheduler left no task behind."""
    async with asyncio.timeout(REAL_TIMEOUT):
        assert await sched.cancel_running(timeout)
    assert sched.running == {}
    assert asyncio.all_tasks() == {asyncio.current_task()}


def every(interval: float, start: float, stop: float) -> list[float]:
    times, t = [], start
    while t < stop:
        times.append(t)
        t += interval
    return times


async def test_first_run_happens_at_start_up() -> None:
    """Each job runs once at start-up, before the first interval has passed."""
    fake = FakeTime()
    a, b = Body(fake), Body(fake)
    sched = scheduler(fake, [Job("a", a, interval=60), Job("b", b, interval=300)])
    await run_until(fake, sched, 1)
    assert a.starts == [0.0]
    assert b.starts == [0.0]
    await assert_clean_shutdown(sched)


async def test_cadence_over_many_ticks_with_fake_clock() -> None:
    """Two jobs fire exactly every interval, each on its own cadence, for hundreds of ticks."""
    fake = FakeTime()
    a, b = Body(fake), Body(fake)
    sched = scheduler(fake, [Job("a", a, interval=10), Job("b", b, interval=25)])
    await run_until(fake, sched, 1000)
    assert a.starts == every(10, 0, 1000)
    assert b.starts == every(25, 0, 1000)
    await assert_clean_shutdown(sched)


async def test_slow_run_does_not_drift_fixed_rate_cadence() -> None:
    """A run taking most of its interval does not push later due times back."""
    fake = FakeTime()
    body = Body(fake, duration=9.5)
    sched = scheduler(fake, [Job("a", body, interval=10)])
    await run_until(fake, sched, 100)
    assert body.starts == every(10, 0, 100)
    await assert_clean_shutdown(sched, timeout=10)


async def test_jitter_stays_within_bounds_and_does_not_accumulate() -> None:
    """Every due time k*interval gets its own offset in [0, jitter]; offsets never add up."""
    fake = FakeTime()
    body = Body(fake)
    sched = scheduler(fake, [Job("a", body, interval=10, jitter=3)], rng=random.Random(7))
    await run_until(fake, sched, 1000)
    assert len(body.starts) == 100
    offsets = [start - 10 * k for k, start in enumerate(body.starts)]
    assert all(0 <= off <= 3 for off in offsets)
    assert len(set(offsets)) > 50  # really random, not one constant shift
    await assert_clean_shutdown(sched)


async def test_jitter_is_deterministic_with_a_seeded_rng() -> None:
    """The same seed gives the same run times; another seed gives other ones."""

    async def starts(seed: int) -> list[float]:
        fake = FakeTime()
        body = Body(fake)
        sched = scheduler(fake, [Job("a", body, interval=10, jitter=5)], rng=random.Random(seed))
        await run_until(fake, sched, 200)
        await assert_clean_shutdown(sched)
        return body.starts

    assert await starts(1) == await starts(1)
    assert await starts(1) != await starts(2)


async def test_overlapping_run_is_skipped_and_counted() -> None:
    """A due run that finds the previous one still going is not started but counted as a skip."""
    fake = FakeTime()
    counts = Counts(fake)
    body = Body(fake, duration=25)
    sched = scheduler(fake, [Job("a", body, interval=10)], counts)
    with capture_logs() as logs:
        await run_until(fake, sched, 95)
    assert body.starts == [0, 30, 60, 90]
    assert counts.skips == [("a", 1, t) for t in (10, 20, 40, 50, 70, 80)]
    skipped = [e for e in logs if e["event"] == "scheduled_run_skipped"]
    assert len(skipped) == 6
    assert skipped[0]["reason"] == "previous_run_still_going"
    await assert_clean_shutdown(sched, timeout=30)


async def test_other_routes_keep_cadence_while_one_ignores_cancellation() -> None:
    """A job that outlives its deadline is cancelled once; others keep firing, its ticks skip."""
    fake = FakeTime()
    counts = Counts(fake)
    fast = Body(fake)
    hung_starts: list[float] = []
    cleanups_done: list[float] = []

    async def hung() -> None:
        start = fake.now
        hung_starts.append(start)
        try:
            await fake.reached(start + 1000).wait()
        finally:
            # Ignores cancellation for a while, as a stuck TLS teardown would.
            await fake.reached(start + 55).wait()
            cleanups_done.append(fake.now)

    sched = scheduler(fake, [Job("fast", fast, interval=10),
                             Job("hung", hung, interval=10, deadline=5)], counts)
    await run_until(fake, sched, 95)
    assert fast.starts == every(10, 0, 95)
    assert hung_starts == [0, 60]
    assert counts.deadlines == [("hung", 5), ("hung", 65)]
    assert [(name, t) for name, _, t in counts.skips] == [
        ("hung", t) for t in (10, 20, 30, 40, 50, 70, 80, 90)]
    # The second run is already cancelled: cancel_running must not cut its cleanup short.
    await assert_clean_shutdown(sched, timeout=100)
    assert cleanups_done == [55, 115]


async def test_deadline_cancels_the_run_and_its_cleanup_runs_inside() -> None:
    """A run past its deadline is cancelled at the deadline and its finally block completes."""
    fake = FakeTime()
    counts = Counts(fake)
    cleaned: list[float] = []

    async def slow() -> None:
        try:
            await fake.reached(1000).wait()
        finally:
            await asyncio.sleep(0)  # cleanup that awaits is not cut short
            cleaned.append(fake.now)

    sched = scheduler(fake, [Job("a", slow, interval=10, deadline=3)], counts)
    with capture_logs() as logs:
        await run_until(fake, sched, 15)
    assert counts.deadlines == [("a", 3), ("a", 13)]
    assert cleaned == [3, 13]
    assert counts.skips == []
    assert [e["event"] for e in logs].count("scheduled_run_deadline_exceeded") == 2
    await assert_clean_shutdown(sched)


async def test_crashing_job_is_logged_and_scheduling_goes_on() -> None:
    """An exception from a job is logged and reported by name; every job keeps its cadence."""
    fake = FakeTime()
    crashes: list[float] = []
    reported: list[str] = []
    healthy = Body(fake)

    async def crash() -> None:
        crashes.append(fake.now)
        raise RuntimeError("imap exploded")

    sched = Scheduler([Job("crashy", crash, interval=10), Job("ok", healthy, interval=10)],
                      clock=fake.clock, sleep=fake.sleep, on_crash=reported.append)
    with capture_logs() as logs:
        await run_until(fake, sched, 35)
    assert crashes == [0, 10, 20, 30]
    assert reported == ["crashy"] * 4
    assert healthy.starts == [0, 10, 20, 30]
    crashed = [e for e in logs if e["event"] == "scheduled_job_crashed"]
    assert [e["job"] for e in crashed] == ["crashy"] * 4
    assert all(e["log_level"] == "error" and e["exc_info"] for e in crashed)
    await assert_clean_shutdown(sched)


async def test_missed_due_times_fire_once_and_count_the_rest() -> None:
    """After a suspend the job fires once, the other passed due times are one counted skip."""
    fake = FakeTime()
    counts = Counts(fake)
    body = Body(fake)
    fake.oversleep[10] = 35  # the sleep from 10 toward 20 ends at 55
    sched = scheduler(fake, [Job("a", body, interval=10)], counts)
    await run_until(fake, sched, 75)
    assert body.starts == [0, 10, 55, 60, 70]
    assert counts.skips == [("a", 3, 55)]  # 30, 40 and 50 were missed
    await assert_clean_shutdown(sched)


async def test_stop_then_wait_idle_reports_whether_runs_finished() -> None:
    """stop() ends run() without waiting; wait_idle is False until the in-flight run ends."""
    fake = FakeTime()
    body = Body(fake, duration=25)
    sched = scheduler(fake, [Job("a", body, interval=10)])
    await run_until(fake, sched, 15)  # the run started at 0 ends at 25
    assert list(sched.running) == ["a"]
    assert fake.now == 15
    async with asyncio.timeout(REAL_TIMEOUT):
        assert not await sched.wait_idle(5)
        assert await sched.wait_idle(30)
    assert body.ends == [25]
    assert fake.now == 25  # wait_idle returned when the run ended, not at its timeout
    await assert_clean_shutdown(sched)


async def test_wait_idle_with_nothing_running_returns_at_once() -> None:
    """wait_idle is True straight away when no run is in flight, without sleeping."""
    fake = FakeTime()
    sched = scheduler(fake, [Job("a", Body(fake), interval=10)])
    await run_until(fake, sched, 5)
    sleeps = len(fake.sleeps)
    assert await sched.wait_idle(30)
    assert len(fake.sleeps) == sleeps
    await assert_clean_shutdown(sched)


async def test_cancel_running_cancels_and_lets_finally_run() -> None:
    """cancel_running cancels in-flight runs once and waits for their cleanup to finish."""
    fake = FakeTime()
    cleaned: list[str] = []

    async def forever() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(0)
            cleaned.append("deleted probe")

    sched = scheduler(fake, [Job("a", forever, interval=10), Job("b", forever, interval=10)])
    await run_until(fake, sched, 5)
    assert sorted(sched.running) == ["a", "b"]
    tasks = list(sched.running.values())
    await assert_clean_shutdown(sched)
    assert cleaned == ["deleted probe", "deleted probe"]
    assert all(task.cancelled() for task in tasks)


async def test_stop_before_run_is_not_lost() -> None:
    """A stop() that arrives before run() starts makes run() return without firing a job."""
    fake = FakeTime()
    body = Body(fake)
    sched = scheduler(fake, [Job("a", body, interval=10)])
    sched.stop()
    async with asyncio.timeout(REAL_TIMEOUT):
        await sched.run()
    assert body.starts == []
    await assert_clean_shutdown(sched)


async def test_replace_jobs_applies_new_cadence_from_the_next_tick() -> None:
    """Reload keeps unchanged cadences, reschedules changed ones, adds and removes jobs."""
    fake = FakeTime()
    kept_old, kept_new = Body(fake), Body(fake)
    slowed, added = Body(fake), Body(fake)
    removed = Body(fake, duration=12)  # in flight (20 -> 32) across the reload
    sched = scheduler(fake, [Job("kept", kept_old, interval=10),
                             Job("slowed", slowed, interval=10),
                             Job("removed", removed, interval=10)])
    fake.at(25, lambda: sched.replace_jobs([Job("kept", kept_new, interval=10),
                                            Job("slowed", slowed, interval=25),
                                            Job("added", added, interval=4)]))
    with capture_logs() as logs:
        await run_until(fake, sched, 50)  # replace_jobs wakes the loop: applied at 25
    assert kept_old.starts == [0, 10, 20]
    assert kept_new.starts == [30, 40]  # same interval: keeps its planned due time
    assert slowed.starts == [0, 10, 20, 45]  # last due 20 + new interval 25
    assert added.starts == [25, 29, 33, 37, 41, 45, 49]  # new: due at the reload
    assert removed.starts == [0, 20]
    assert removed.ends == [12, 32]  # the old job's in-flight run was not cut short
    replaced = [e for e in logs if e["event"] == "scheduler_jobs_replaced"]
    assert replaced == [{"event": "scheduler_jobs_replaced", "log_level": "info",
                         "added": ["added"], "removed": ["removed"]}]
    await assert_clean_shutdown(sched)


async def test_replace_jobs_shorter_interval_fires_at_once_if_overdue() -> None:
    """A job whose new interval has already elapsed since its last due time fires at the reload."""
    fake = FakeTime()
    body = Body(fake)
    other = Body(fake)
    sched = scheduler(fake, [Job("a", body, interval=100), Job("tick", other, interval=30)])
    fake.at(55, lambda: sched.replace_jobs([Job("a", body, interval=20),
                                            Job("tick", other, interval=30)]))
    await run_until(fake, sched, 100)
    assert body.starts == [0, 55, 75, 95]  # 0 + 20 had passed at the reload: fires at 55
    await assert_clean_shutdown(sched)


async def test_every_tick_is_reported_even_without_jobs() -> None:
    """on_tick fires at each wake-up, at least every IDLE_TICK: the supervisor's progress."""
    fake = FakeTime()
    ticks: list[float] = []
    sched = Scheduler([], clock=fake.clock, sleep=fake.sleep,
                      on_tick=lambda: ticks.append(fake.now))
    await run_until(fake, sched, 3 * IDLE_TICK + 1)
    assert ticks == [0, IDLE_TICK, 2 * IDLE_TICK, 3 * IDLE_TICK]


async def test_broken_sleep_surfaces_from_run() -> None:
    """If the injected sleep raises, run() raises it (to the supervisor) instead of spinning."""
    fake = FakeTime()

    async def broken(delay: float) -> None:
        raise OSError("clock source gone")

    sched = Scheduler([Job("a", Body(fake), interval=10)], clock=fake.clock, sleep=broken)
    with pytest.raises(OSError, match="clock source gone"):
        await sched.run()
    await assert_clean_shutdown(sched)


async def test_cancelling_run_leaves_no_sleeper_behind() -> None:
    """Cancelling the run() task itself stops scheduling and leaves no scheduler task behind."""
    sched = Scheduler([Job("a", Body(FakeTime()), interval=3600)])
    task = asyncio.create_task(sched.run())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [t for t in asyncio.all_tasks() if t.get_name().startswith("scheduled:")] == []
    await assert_clean_shutdown(sched)


async def test_real_clock_and_signal_handler_stop() -> None:
    """With the real clock, runs repeat every few ms and stop() from SIGUSR1 ends run()."""
    loop = asyncio.get_running_loop()
    runs: list[float] = []

    async def body() -> None:
        runs.append(loop.time())
        if len(runs) == 3:
            os.kill(os.getpid(), signal.SIGUSR1)

    sched = Scheduler([Job("a", body, interval=0.005, deadline=1)])
    loop.add_signal_handler(signal.SIGUSR1, sched.stop)
    try:
        async with asyncio.timeout(REAL_TIMEOUT):
            await sched.run()
    finally:
        loop.remove_signal_handler(signal.SIGUSR1)
    assert len(runs) == 3
    await assert_clean_shutdown(sched)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": ""}, "job name must not be empty"),
        ({"interval": 0}, "job 'r': interval must be > 0, got 0"),
        ({"interval": float("inf")}, "job 'r': interval must be > 0, got inf"),
        ({"jitter": -1}, "job 'r': jitter must be >= 0 and < interval (10s), got -1"),
        ({"jitter": 10}, "job 'r': jitter must be >= 0 and < interval (10s), got 10"),
        ({"deadline": 0}, "job 'r': deadline must be > 0, got 0"),
    ],
)
def test_job_rejects_bad_timing(kwargs: dict[str, object], message: str) -> None:
    """Invalid interval, jitter or deadline is refused with the job name and the rule."""
    fields: dict[str, object] = {"name": "r", "interval": 10, **kwargs}
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        Job(run=_noop, **fields)  # type: ignore[arg-type]


def test_duplicate_job_names_are_refused() -> None:
    """Two jobs with one name are refused at construction and at reload."""
    jobs = [Job("a", _noop, interval=1), Job("a", _noop, interval=2)]
    with pytest.raises(ValueError, match="job name 'a' is used twice"):
        Scheduler(jobs)
    sched = Scheduler(jobs[:1])
    with pytest.raises(ValueError, match="job name 'a' is used twice"):
        sched.replace_jobs(jobs)
    assert sched.jobs == (jobs[0],)


async def _noop() -> None:
    pass


async def test_fire_now_starts_a_run_or_hands_back_the_one_in_flight() -> None:
    """fire_now runs a job at once without moving its cadence, or joins its run in flight."""
    fake = FakeTime()
    body = Body(fake, duration=3)
    counts = Counts(fake)
    sched = scheduler(fake, [Job("a", body, interval=10)], counts)
    assert sched.fire_now("a") is None  # not running yet

    async def at_nine() -> None:  # an on-demand run going at the due time 10 serves it
        await fake.reached(9).wait()
        assert sched.fire_now("a") is not None

    async def scenario() -> None:
        await fake.reached(1).wait()
        joined = sched.fire_now("a")  # the start-up run (0 to 3) is in flight
        assert joined is sched.running["a"]
        await fake.reached(5).wait()
        fresh = sched.fire_now("a")  # idle now: a run of its own, 5 to 8
        assert fresh is not None and fresh is not joined
        assert sched.fire_now("nope") is None

    task = asyncio.create_task(scenario())
    nine = asyncio.create_task(at_nine())
    await run_until(fake, sched, 25)
    await task
    await nine
    assert body.starts == [0, 5, 9, 20]  # the cadence is untouched; 9 served the 10
    assert counts.skips == []  # nothing was missed
    assert sched.fire_now("a") is None  # stopped
    await assert_clean_shutdown(sched)


async def test_an_on_demand_run_just_before_a_due_time_serves_it() -> None:
    """A fire_now run that ended within on_demand_window of a due time is not run again
    at it (no double run); the cadence stays where it was (no delay)."""
    fake = FakeTime()
    body = Body(fake, duration=1)
    counts = Counts(fake)
    sched = scheduler(fake, [Job("a", body, interval=10, on_demand_window=4)], counts)

    async def scenario() -> None:
        await fake.reached(7).wait()
        assert sched.fire_now("a") is not None  # 7 to 8; due 10 is within 4 s: served
        await fake.reached(13).wait()
        assert sched.fire_now("a") is not None  # 13 to 14; due 20 is 7 s later: runs

    task = asyncio.create_task(scenario())
    await run_until(fake, sched, 25)
    await task
    assert body.starts == [0, 7, 13, 20]
    assert counts.skips == []
    await assert_clean_shutdown(sched)
