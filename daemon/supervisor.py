"""Owns every long-running loop: starts it, restarts it when it crashes, knows if it is healthy.

A component is a named coroutine (`run(progress)`) that runs until cancelled.
It reports through its `Progress` handle: `progress()` after each unit of
work (a poll, a tick, a delivery), `down(reason, code)` while it cannot do its
job, `retrying(reason, code)` when an attempt of its loop failed and it will
try again (log file missing, CloudWatch unreachable). The supervisor runs all
of them in one `asyncio.TaskGroup`:

* a component that raises is logged once with its traceback, counted in
  `selfcheckd_component_restarts_total` and restarted after a capped backoff;
  returning without being asked to is treated the same way (a loop that ends
  on its own is dead), unless the component declares `may_finish` (stdin
  reaching its end);
* liveness (`problems()`, `/healthz` 503) is only what a restart of the process
  can mend: a component that crashed `DEAD_AFTER_CRASHES` times in a row and
  waits for yet another restart, or one that made no progress (and reported
  no failed attempt) within its own `progress_deadline`: a wedged loop;
* a component that is alive but down (it says why: file missing, webhook
  refusing, a crash its restart may still mend) is *degraded* (`degraded()`):
  `/healthz` stays 200 and names it, `selfcheckd_component_up` is 0 and
  `selfcheckd_component_degraded{reason}` says why. A restart cannot fix a
  missing file; restarting over it would stop everything else too.

Time comes from the injected `clock` and `sleep`, so tests drive restarts and
deadlines with a fake clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from daemon.logs import shorten
from daemon.metrics import Metrics
from daemon.retry import RESTART_BACKOFF, Backoff

log = structlog.get_logger("daemon.supervisor")

# The longest reason a component reports down (shown whole by /status and /healthz).
MAX_REASON = 300

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

# A component that ran at least this long before crashing starts its restart
# backoff afresh: a crash a day should not wait a minute to restart.
HEALTHY_RUN = 300.0
# Crashes in a row (none after a healthy run) after which a component waiting to
# restart counts as dead for /healthz: its own restarts did not mend it (1 + 2 + 4 s
# of backoff have passed), a restart of the process may. Before that it is degraded.
DEAD_AFTER_CRASHES = 3
# The bounded `reason` label of a component that reports down without one.
OTHER = "other"


def _being_cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class Component(Protocol):
    """A long-running loop the supervisor owns."""

    @property
    def name(self) -> str:
        """The `component` label; also how /healthz and /status name it."""

    @property
    def progress_deadline(self) -> float:
        """Seconds without progress after which the component counts as stalled."""

    async def run(self, progress: Progress) -> None:
        """Work until cancelled, reporting through `progress`."""


@dataclass
class ComponentState:
    """What /status shows about one component."""

    name: str
    deadline: float
    state: str = "starting"  # starting | running | restarting | finished | stopped
    up: bool = False
    reason: str | None = None  # why it is down, or why it last crashed
    code: str | None = None  # `reason` as a bounded label value (file_missing, crashed)
    started_at: float | None = None  # wall clock, for /status
    last_progress_at: float | None = None  # wall clock
    last_progress_mono: float = 0.0
    restarts: int = 0
    crashes_in_a_row: int = 0  # reset by a run of HEALTHY_RUN seconds

    def as_dict(self, now_mono: float) -> dict[str, Any]:
        return {
            "state": self.state,
            "up": self.up,
            "reason": self.reason,
            "reason_code": self.code,
            "started_at": self.started_at,
            "last_progress_at": self.last_progress_at,
            "seconds_since_progress": round(now_mono - self.last_progress_mono, 3),
            "progress_deadline": self.deadline,
            "restarts": self.restarts,
        }


class Progress:
    """The handle a component reports through; every call is cheap and synchronous."""

    def __init__(self, supervisor: Supervisor, state: ComponentState) -> None:
        self._sup = supervisor
        self._state = state

    @property
    def _attached(self) -> bool:
        """Still supervised: a removed component's last words (its cancellation) must
        not bring back the series `remove` dropped."""
        return self._sup.supervises(self._state)

    def progress(self) -> None:
        """One unit of work done (a successful poll, a loop tick): not stalled.

        Says nothing about being up: a loop that keeps ticking while its webhook
        fails is alive but down, and reports that with `down()`.
        """
        st = self._state
        if not self._attached:
            return
        st.last_progress_mono = self._sup.clock()
        st.last_progress_at = self._sup.wall()
        self._sup.metrics.component_progress.labels(st.name).set(st.last_progress_at)

    def up(self) -> None:
        """The component can do its job again."""
        st = self._state
        if not st.up and self._attached:
            st.up = True
            st.reason = st.code = None
            self._sup.metrics.component_up.labels(st.name).set(1)

    def down(self, reason: str, code: str = OTHER) -> None:
        """The component cannot do its job right now (it keeps running and retrying).

        `reason` is for people (/status, /healthz); `code` is a bounded label value
        (`file_missing`, `webhook`): never error text, never a path.
        """
        st = self._state
        st.reason = shorten(reason, MAX_REASON)  # shown by /status and /healthz
        st.code = code
        if st.up and self._attached:
            st.up = False
            self._sup.metrics.component_up.labels(st.name).set(0)

    def retrying(self, reason: str, code: str = OTHER) -> None:
        """An attempt of the loop failed for `reason` and the loop will try again.

        The loop is alive (this counts as progress: it is not wedged, and a
        restart would not help) but degraded: down until its next success.
        """
        self.progress()
        self.down(reason, code)


class Supervisor:
    """Runs components in one task group until `stop()`."""

    def __init__(
        self,
        metrics: Metrics,
        *,
        clock: Clock = time.monotonic,
        wall: Clock = time.time,
        sleep: Sleep = asyncio.sleep,
        restart_backoff: Backoff = RESTART_BACKOFF,
    ) -> None:
        self.metrics = metrics
        self.clock = clock
        self.wall = wall
        self._sleep = sleep
        self._backoff = restart_backoff
        self._group: asyncio.TaskGroup | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._components: dict[str, Component] = {}
        self._states: dict[str, ComponentState] = {}
        self._queued: list[Component] = []
        self._stop = asyncio.Event()
        self._running = asyncio.Event()
        metrics.watch_degraded(
            lambda: {name: code for name, (code, _why) in self.degraded().items()})

    # -- membership ---------------------------------------------------------------------

    def start(self, component: Component) -> None:
        """Run `component` (now if the supervisor runs, else as soon as it does)."""
        if component.name in self._components:
            raise ValueError(f"component {component.name!r} is already supervised")
        self._components[component.name] = component
        state = ComponentState(name=component.name, deadline=component.progress_deadline)
        self._states[component.name] = state
        self.metrics.component_deadline.labels(component.name).set(component.progress_deadline)
        self.metrics.component_up.labels(component.name).set(0)
        self.metrics.component_restarts.labels(component.name)  # export 0 from the start
        if self._group is None:
            self._queued.append(component)
        else:
            self._spawn(component)

    def detach(self, name: str) -> asyncio.Task[None] | None:
        """Cancel component `name` now and forget it (its series too); its task, to wait for.

        Synchronous, so several components stop in the same instant (a leader stepping
        down stops acting at once, not one awaited component after another).
        """
        task = self._tasks.pop(name, None)
        self._components.pop(name, None)
        self._queued = [c for c in self._queued if c.name != name]
        state = self._states.pop(name, None)
        if task is not None:
            task.cancel()
        if state is not None:
            for metric in (self.metrics.component_up, self.metrics.component_progress,
                           self.metrics.component_deadline, self.metrics.component_restarts):
                with contextlib.suppress(KeyError):
                    metric.remove(name)
        return task

    async def remove(self, name: str, timeout: float) -> bool:
        """Cancel component `name`, wait up to `timeout` s, forget it; True if it ended."""
        return await self.remove_all([name], timeout)

    async def remove_all(self, names: list[str], timeout: float) -> bool:
        """Cancel every component of `names` at once, then wait up to `timeout` s for them
        all; True if they all ended."""
        tasks = {name: task for name in names if (task := self.detach(name)) is not None}
        if not tasks:
            return True
        done, _ = await asyncio.wait(set(tasks.values()), timeout=max(0.0, timeout))
        for name, task in tasks.items():
            if task not in done:
                log.error("component_ignored_cancel", component=name, waited=timeout)
        return len(done) == len(tasks)

    async def replace(self, component: Component, timeout: float) -> bool:
        """Stop the component of the same name (if any), then start this one."""
        ended = await self.remove(component.name, timeout)
        self.start(component)
        return ended

    def names(self) -> list[str]:
        return sorted(self._components)

    def supervises(self, state: ComponentState) -> bool:
        return self._states.get(state.name) is state

    # -- health -------------------------------------------------------------------------

    def states(self) -> dict[str, dict[str, Any]]:
        now = self.clock()
        return {name: st.as_dict(now) for name, st in sorted(self._states.items())}

    def problems(self) -> dict[str, str]:
        """Components a restart may mend (dead or wedged), with why (empty when none)."""
        now = self.clock()
        out: dict[str, str] = {}
        for name, st in sorted(self._states.items()):
            if st.state == "restarting" and st.crashes_in_a_row >= DEAD_AFTER_CRASHES:
                out[name] = (f"crashed {st.crashes_in_a_row} times in a row, restarting "
                             f"({st.reason})")
            elif st.state in ("starting", "running") and now - st.last_progress_mono > st.deadline:
                since = round(now - st.last_progress_mono)
                why = f"no progress for {since}s (deadline {st.deadline:g}s)"
                out[name] = f"{why}: {st.reason}" if st.reason else why
        return out

    def degraded(self) -> dict[str, tuple[str, str]]:
        """Components alive but down, with (reason code, reason); none of `problems()`."""
        dead = self.problems()
        return {name: (st.code or OTHER, st.reason or "down")
                for name, st in sorted(self._states.items())
                if name not in dead and not st.up and st.state in ("running", "restarting")}

    # -- running ------------------------------------------------------------------------

    async def run(self) -> None:
        """Supervise until `stop()`; every component is cancelled before this returns."""
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                queued, self._queued = self._queued, []
                for component in queued:
                    self._spawn(component)
                self._running.set()
                await self._stop.wait()
                for task in self._tasks.values():
                    task.cancel()
        finally:
            self._group = None
            self._tasks.clear()
            self._running.clear()

    async def started(self) -> None:
        """Return once `run()` has started every queued component."""
        await self._running.wait()

    def stop(self) -> None:
        """Cancel every component; `run()` returns once they have ended."""
        self._stop.set()

    def _spawn(self, component: Component) -> None:
        assert self._group is not None
        self._tasks[component.name] = self._group.create_task(
            self._supervise(component), name=f"component:{component.name}")

    async def _supervise(self, component: Component) -> None:
        """Run one component forever: restart it with backoff when it crashes."""
        name = component.name
        state = self._states[name]
        progress = Progress(self, state)
        failures = 0
        while True:
            started = self.clock()
            state.state = "running"
            state.started_at = self.wall()
            progress.progress()  # starting counts as progress; the deadline runs from here
            progress.up()  # until it reports otherwise
            try:
                await component.run(progress)
            except asyncio.CancelledError as cancelled:
                if _being_cancelled():
                    state.state = "stopped"
                    progress.down("stopped", "stopped")
                    raise
                # Nobody cancelled us: a cancellation leaked out of the component's own
                # awaits. It is as dead as after a crash.
                why = "CancelledError escaped the component"
                crash: BaseException | None = cancelled
            except Exception as exc:
                why = crash_reason(exc)
                # Kept: the log line below is written after this block, where
                # exc_info=True would find no exception and print no traceback.
                crash = exc
            else:
                if getattr(component, "may_finish", False):
                    state.state = "finished"
                    # Its work is done (standard input ended): no deadline is missed any
                    # more, so SelfcheckdComponentStalled must not fire on the frozen
                    # progress timestamp.
                    self.metrics.component_deadline.labels(name).set(math.inf)
                    log.info("component_finished", component=name)
                    return
                why = "returned without being stopped"
                crash = None
            failures = 1 if self.clock() - started >= HEALTHY_RUN else failures + 1
            delay = round(self._backoff.delay(failures), 3)
            state.restarts += 1
            state.crashes_in_a_row = failures
            state.state = "restarting"
            progress.down(why, "crashed")
            self.metrics.component_restarts.labels(name).inc()
            log.error("component_crashed", component=name, error=why, restart_in=delay,
                      restarts=state.restarts, exc_info=crash or False)
            crash = None  # its traceback holds the dead run's frames; not across the sleep
            await self._sleep(delay)


def crash_reason(exc: BaseException) -> str:
    """`Type: message` of what killed a component, looking inside the exception groups a
    TaskGroup wraps errors in (their own text says only how many there were)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"
