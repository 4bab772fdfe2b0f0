"""Fires each job on its own fixed-rate cadence, never overlapping a job with itself.

Rules, in the order a reader will ask about them:

* **First run** at start-up (plus that due time's jitter), then every
  `interval` seconds. The cadence is fixed-rate: due times are
  `start + k * interval`, so a slow run does not drift the schedule.
* **Jitter**: each due time gets its own uniform offset in `[0, jitter]`
  from the injected rng; offsets never accumulate. `jitter < interval`.
* **No overlap**: a due run that finds the previous run of its job still
  going is not started; it is counted with `on_skip(name, 1)`.
* **On demand** (`fire_now`, /probe): a due time that finds an on-demand run
  going, or one that started less than the job's `on_demand_window` ago, is
  served by it (not started again, not counted as skipped); the cadence is
  untouched either way, so /probe never delays or doubles a scheduled run.
* **Missed due times** (process suspended, event loop blocked, clock jump):
  the job fires once when the loop wakes and each further due time that
  passed meanwhile is counted with one `on_skip(name, missed)` call. They are
  not made up, so a resumed laptop does not fire a burst of checks.
* **Hard deadline**: a run still going `deadline` seconds after it started is
  cancelled once (`on_deadline(name)`); its own cleanup runs inside that
  cancellation. Until it actually ends, due runs of that job are skipped while
  other jobs keep their cadence: the loop never awaits a run.
* **Crashes**: an exception from a job is logged (`scheduled_job_crashed`),
  reported with `on_crash(name)` and the next due run happens as usual.
* **Reload** (`replace_jobs`): applied at the next tick. A job whose interval
  and jitter are unchanged keeps its planned due time; a changed one is due
  `interval` after its last due time (or now, if that has passed); a new one is
  due now. In-flight runs of replaced or removed jobs continue and still count
  for no-overlap, `wait_idle` and `cancel_running`.

Every duration (intervals, deadlines, `wait_idle`'s timeout) is measured with
the injected `clock` and waited with the injected `sleep`, so tests drive the
whole schedule with a fake clock in milliseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

import structlog

log = structlog.get_logger("daemon.checks.scheduler")

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

# With no jobs the loop still wakes now and then: each tick is the supervisor's progress.
IDLE_TICK = 60.0


@dataclass(frozen=True)
class Job:
    """A named coroutine function the scheduler runs every `interval` seconds."""

    name: str
    run: Callable[[], Awaitable[None]]
    interval: float
    jitter: float = 0.0
    deadline: float | None = None
    # An on-demand run started at most this long before a due time serves it.
    on_demand_window: float = 0.0

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("job name must not be empty")
        if not (math.isfinite(self.interval) and self.interval > 0):
            raise ValueError(f"job {self.name!r}: interval must be > 0, got {self.interval!r}")
        if not (0 <= self.jitter < self.interval):
            raise ValueError(f"job {self.name!r}: jitter must be >= 0 and < interval "
                             f"({self.interval:g}s), got {self.jitter!r}")
        if not (math.isfinite(self.on_demand_window) and self.on_demand_window >= 0):
            raise ValueError(f"job {self.name!r}: on_demand_window must be >= 0, "
                             f"got {self.on_demand_window!r}")
        if self.deadline is not None and not self.deadline > 0:
            raise ValueError(f"job {self.name!r}: deadline must be > 0, got {self.deadline!r}")


@dataclass
class _Cadence:
    """Where one job is in its schedule."""

    job: Job
    anchor: float  # due times are anchor + k * interval
    k: int = 0
    fire_at: float = 0.0  # the current due time plus its jitter
    last_due: float | None = None  # latest due time already fired or skipped

    @property
    def due(self) -> float:
        return self.anchor + self.k * self.job.interval


@dataclass
class _Run:
    task: asyncio.Task[None]
    deadline_at: float
    cancelling: bool = False  # cancel() is sent once: a second one would cut its cleanup short
    on_demand: bool = False  # started by fire_now, not by the cadence


def _ignore_skip(name: str, count: int) -> None:
    pass


def _ignore_name(name: str) -> None:
    pass


def _validated(jobs: Iterable[Job]) -> tuple[Job, ...]:
    jobs = tuple(jobs)
    seen: set[str] = set()
    for job in jobs:
        if job.name in seen:
            raise ValueError(f"job name {job.name!r} is used twice")
        seen.add(job.name)
    return jobs


class Scheduler:
    """Runs `jobs` until `stop()`; see the module docstring for the rules."""

    def __init__(
        self,
        jobs: Sequence[Job],
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        rng: random.Random | None = None,
        on_skip: Callable[[str, int], None] = _ignore_skip,
        on_deadline: Callable[[str], None] = _ignore_name,
        on_tick: Callable[[], None] | None = None,
        on_crash: Callable[[str], None] = _ignore_name,
    ) -> None:
        self._clock = clock
        self._sleep = sleep
        self._rng = rng if rng is not None else random.Random()
        self._on_skip = on_skip
        self._on_deadline = on_deadline
        # Called at every tick of the loop: the supervisor's progress signal.
        self.on_tick = on_tick
        self._on_crash = on_crash
        self._jobs = _validated(jobs)
        self._jobs_changed = True  # the first tick plans every job
        self._cadences: dict[str, _Cadence] = {}
        self._runs: dict[str, _Run] = {}
        self._on_demand_at: dict[str, float] = {}  # the latest fire_now start per job
        self._stopping = False
        self._active = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sleeper: asyncio.Future[None] | None = None
        self._wake_at: float | None = None

    # -- public surface -------------------------------------------------------------------

    @property
    def jobs(self) -> tuple[Job, ...]:
        """The jobs as last given (a `replace_jobs` takes effect at the next tick)."""
        return self._jobs

    @property
    def running(self) -> dict[str, asyncio.Task[None]]:
        """In-flight runs by job name (a copy)."""
        return {name: run.task for name, run in self._runs.items()}

    @property
    def stopping(self) -> bool:
        """True once stop() was called: run() returns and stays returned."""
        return self._stopping

    async def run(self) -> None:
        """Schedule until `stop()`. Returns without waiting for in-flight runs.

        A stopped scheduler stays stopped (a stop() that races start-up is not lost).
        """
        if self._active:
            raise RuntimeError("Scheduler.run() is already running")
        self._loop = asyncio.get_running_loop()
        self._active = True
        log.info("scheduler_started", jobs=len(self._jobs))
        try:
            while not self._stopping:
                now = self._clock()
                if self.on_tick is not None:
                    self.on_tick()
                if self._jobs_changed:
                    self._plan(now)
                self._enforce_deadlines(now)
                self._fire_due(now)
                self._wake_at = self._next_wake(now)
                await self._nap(self._wake_at - now)
        finally:
            self._active = False
            self._wake_at = None
            log.info("scheduler_stopped", in_flight=sorted(self._runs))

    def stop(self) -> None:
        """Start no new runs. Safe from a signal handler: sets a flag and pokes the loop."""
        self._stopping = True
        self._poke()

    def replace_jobs(self, jobs: Sequence[Job]) -> None:
        """Swap in a new job list from the next tick (rules in the module docstring)."""
        self._jobs = _validated(jobs)
        self._jobs_changed = True
        self._poke()

    def fire_now(self, name: str) -> asyncio.Task[None] | None:
        """Run job `name` now, or hand back its run in flight (on demand: /probe).

        The run is like a scheduled one: no overlap with the job's own runs, its
        deadline, cancelled at shutdown; the cadence is untouched (a due time that
        finds it still going counts as served, not as skipped). None if stopping
        or no such job.
        """
        run = self._runs.get(name)
        if run is not None:
            return run.task
        job = next((j for j in self._jobs if j.name == name), None)
        if job is None or self._stopping or self._loop is None:
            return None
        now = self._clock()
        self._start(job, now, on_demand=True)
        self._on_demand_at[name] = now
        self._poke()  # the loop plans its next wake-up with this run's deadline
        return self._runs[name].task

    async def wait_idle(self, timeout: float | None) -> bool:
        """Wait until no run is in flight or `timeout` passes; True if none is in flight."""
        timer = None if timeout is None else asyncio.ensure_future(self._sleep(timeout))
        try:
            while pending := self._pending_runs():
                if timer is not None:
                    if timer.done():
                        timer.result()  # a broken sleep fails loudly
                        return False
                    pending.add(timer)
                await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            return True
        finally:
            if timer is not None:
                timer.cancel()
                await asyncio.wait({timer})

    async def cancel_running(self, timeout: float | None = None) -> bool:
        """Cancel every in-flight run once and wait for its cleanup; True if all ended.

        Call after `stop()`; runs started meanwhile are waited for, not cancelled.
        """
        self.cancel_runs()
        return await self.wait_idle(timeout)

    def cancel_runs(self) -> None:
        """Cancel every in-flight run once, now (their cleanups run on; `wait_idle` waits)."""
        for name, run in self._runs.items():
            if not run.cancelling:
                run.cancelling = True
                run.task.cancel(msg=f"scheduler cancelled the run of {name}")

    # -- one tick --------------------------------------------------------------------------

    def _plan(self, now: float) -> None:
        self._jobs_changed = False
        old = self._cadences
        self._cadences = {}
        for job in self._jobs:
            previous = old.get(job.name)
            if previous is not None and (previous.job.interval, previous.job.jitter) == (
                job.interval, job.jitter
            ):
                previous.job = job
                self._cadences[job.name] = previous
                continue
            if previous is None or previous.last_due is None:
                anchor = now
            else:
                anchor = max(now, previous.last_due + job.interval)
            cadence = _Cadence(job=job, anchor=anchor)
            cadence.fire_at = cadence.due + self._offset(job)
            self._cadences[job.name] = cadence
        if old:
            log.info("scheduler_jobs_replaced", added=sorted(self._cadences.keys() - old.keys()),
                     removed=sorted(old.keys() - self._cadences.keys()))

    def _enforce_deadlines(self, now: float) -> None:
        for name, run in self._runs.items():
            if not run.cancelling and run.deadline_at <= now:
                run.cancelling = True
                run.task.cancel(msg=f"run of {name} exceeded its hard deadline")
                log.warning("scheduled_run_deadline_exceeded", job=name)
                self._on_deadline(name)

    def _fire_due(self, now: float) -> None:
        for name, cadence in self._cadences.items():
            if cadence.fire_at > now:
                continue
            if (name in self._runs and self._runs[name].on_demand) or (
                    name not in self._runs
                    and now - self._on_demand_at.get(name, -math.inf)
                    < cadence.job.on_demand_window):
                # An on-demand run is doing (or just did) this due run's work.
                log.debug("scheduled_run_served_on_demand", job=name)
            elif name in self._runs:
                log.warning("scheduled_run_skipped", job=name, reason="previous_run_still_going")
                self._on_skip(name, 1)
            else:
                self._start(cadence.job, now)
            cadence.k += 1
            missed = 0
            if cadence.due <= now:
                missed = math.floor((now - cadence.due) / cadence.job.interval) + 1
                cadence.k += missed
                while cadence.due <= now:  # float rounding in the division above
                    cadence.k += 1
                    missed += 1
            cadence.last_due = cadence.due - cadence.job.interval
            cadence.fire_at = cadence.due + self._offset(cadence.job)
            if missed:
                log.warning("scheduled_run_skipped", job=name, reason="missed_due_times",
                            count=missed)
                self._on_skip(name, missed)

    def _start(self, job: Job, now: float, on_demand: bool = False) -> None:
        task = asyncio.create_task(self._guarded(job), name=f"scheduled:{job.name}")
        deadline_at = math.inf if job.deadline is None else now + job.deadline
        self._runs[job.name] = _Run(task=task, deadline_at=deadline_at, on_demand=on_demand)
        task.add_done_callback(functools.partial(self._finished, job.name))

    async def _guarded(self, job: Job) -> None:
        try:
            await job.run()
        except Exception:
            log.exception("scheduled_job_crashed", job=job.name)
            self._on_crash(job.name)

    def _finished(self, name: str, task: asyncio.Task[None]) -> None:
        run = self._runs.get(name)
        if run is not None and run.task is task:
            del self._runs[name]

    def _offset(self, job: Job) -> float:
        # Draw only for jittered jobs, so adding one does not reshuffle the others.
        return self._rng.uniform(0.0, job.jitter) if job.jitter else 0.0

    def _next_wake(self, now: float) -> float:
        wake = now + IDLE_TICK
        for cadence in self._cadences.values():
            wake = min(wake, cadence.fire_at)
        for run in self._runs.values():
            if not run.cancelling:
                wake = min(wake, run.deadline_at)
        return wake

    # -- sleeping and waking ----------------------------------------------------------------

    async def _nap(self, delay: float) -> None:
        sleeper = asyncio.ensure_future(self._sleep(max(0.0, delay)))
        self._sleeper = sleeper
        try:
            await asyncio.wait({sleeper})
        finally:
            self._sleeper = None
            if not sleeper.done():  # run() itself was cancelled
                sleeper.cancel()
                await asyncio.wait({sleeper})
        if not sleeper.cancelled():
            sleeper.result()  # a broken sleep should fail loudly, not spin

    def _pending_runs(self) -> set[asyncio.Future[None]]:
        return {run.task for run in self._runs.values() if not run.task.done()}

    def _poke(self) -> None:
        # call_soon_threadsafe only appends to a deque and writes the self-pipe,
        # which is what a plain signal.signal handler may safely do.
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed in between
            loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        if self._sleeper is not None and not self._sleeper.done():
            self._sleeper.cancel()
