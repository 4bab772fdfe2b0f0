"""`[drill] schedule`: `selfcheckd run` runs the queue-persistence drill as the `drill` component.

One drill at a time (this loop runs them one after the other, and the drill's
lock file keeps a manual `selfcheckd drill` on the same host out). Each run's
journal goes to `[drill] journal_dir` (the newest MAX_JOURNALS kept), where the
next start finds when the last drill ran and when one last passed: the
schedule and `selfcheck_drill_last_success_timestamp_seconds` survive restarts.
Without history the first drill runs min(interval, FIRST_DELAY) after the start,
so a service restarted more often than its interval still gets drilled.

Stopping: `stop()` interrupts a drill in flight (its cleanup parks the sinkhole
in defer within the given budget) and waits for it.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from daemon.config import Config
from daemon.drill.journal import Journal
from daemon.drill.steps import Drill
from daemon.metrics import Metrics
from daemon.supervisor import Progress

log = structlog.get_logger("daemon.drill")

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]
Build = Callable[..., Drill]

FIRST_DELAY = 3600.0
TICK = 60.0  # the loop reports progress at least this often while it waits
MAX_JOURNALS = 50
RESULTS = ("passed", "failed", "aborted", "refused", "cleanup_failed")


class ScheduledDrill:
    name = "drill"

    def __init__(self, config: Config, metrics: Metrics, *, build: Build | None = None,
                 clock: Clock = time.monotonic, wall: Clock = time.time,
                 sleep: Sleep = asyncio.sleep, interrupt_budget: float | None = None) -> None:
        drill = config.drill
        assert drill is not None
        assert drill.schedule_interval is not None
        self.config = config
        self.cfg = drill
        self.interval = drill.schedule_interval
        self.metrics = metrics
        if build is None:
            from daemon.drill.command import build_drill
            build = build_drill
        self.build = build
        self.clock = clock
        self.wall = wall
        self.sleep = sleep
        self.interrupt_budget = interrupt_budget
        # The longest a drill can take without reporting progress, with margin.
        self.progress_deadline = (TICK + drill.settle_timeout + 3 * drill.queue_timeout
                                  + drill.retry_timeout + drill.cleanup_timeout
                                  + 2 * drill.mode_cache + 600.0)
        self.current: Drill | None = None
        self.last: Journal | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._started_at: float | None = None

    # -- history -------------------------------------------------------------------------

    def _history(self) -> tuple[float | None, float | None]:
        """(when the last drill started, when the last passing drill ended) from journals."""
        folder = self.cfg.journal_dir
        if folder is None or not folder.is_dir():
            return None, None
        last_start = last_pass = None
        for path in folder.glob("drill-*.json"):
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                started = _ts(data.get("started"))
                ended = _ts(data.get("ended"))
            except (OSError, ValueError, AttributeError) as exc:
                log.warning("drill_journal_unreadable", path=str(path),
                            error=f"{type(exc).__name__}: {exc}"[:300])
                continue
            if started is not None and (last_start is None or started > last_start):
                last_start = started
            if data.get("result") == "passed" and ended is not None and \
                    (last_pass is None or ended > last_pass):
                last_pass = ended
        return last_start, last_pass

    def _keep(self, journal: Journal) -> None:
        folder = self.cfg.journal_dir
        if folder is None:
            return
        from daemon.drill.command import write_journal

        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            log.error("drill_journal_not_written", path=str(folder), error=str(exc)[:300])
            return
        problem = write_journal(journal, folder / f"drill-{journal.drill_id}.json")
        if problem:
            log.error("drill_journal_not_written", error=problem)
        journals = sorted(folder.glob("drill-*.json"), key=lambda p: p.stat().st_mtime)
        for old in journals[:-MAX_JOURNALS]:
            old.unlink(missing_ok=True)

    # -- the loop ------------------------------------------------------------------------

    async def run(self, progress: Progress) -> None:
        last_start, last_pass = await asyncio.to_thread(self._history)
        now = self.wall()
        self.metrics.drill_scheduled_since.set(now)
        if last_pass is not None:
            self.metrics.drill_last_success.set(last_pass)
        due_in = (max(0.0, last_start + self.interval - now) if last_start is not None
                  else min(self.interval, FIRST_DELAY))
        log.info("drill_scheduled", every=self.interval, next_in=round(due_in))
        while True:
            due = self.clock() + due_in
            while (left := due - self.clock()) > 0:
                progress.progress()
                await self.sleep(min(TICK, left))
            progress.progress()
            journal = await self.run_once()
            progress.progress()
            if journal.metric_result in ("passed", "failed"):
                progress.up()
            else:
                progress.down(f"last drill {journal.metric_result}: {journal.error}"[:300],
                              code=f"drill_{journal.metric_result}")
            due_in = self.interval

    async def run_once(self) -> Journal:
        """One drill now; its metrics, log line and kept journal."""
        seams: dict[str, Any] = {"lines": _LogLines(), "wall": self.wall}
        drill = self.build(self.config, **seams)
        if self.interrupt_budget is not None:
            drill.cfg = drill.cfg.model_copy(update={
                "interrupt_budget": min(drill.cfg.interrupt_budget, self.interrupt_budget)})
        self.current = drill
        self._idle.clear()
        started = self.clock()
        try:
            journal = await drill.run()
        finally:
            self.current = None
            self._idle.set()
        took = self.clock() - started
        result = journal.metric_result
        self.last = journal
        # Kept first (and shielded): a shutdown right after the drill still keeps it.
        await asyncio.shield(asyncio.to_thread(self._keep, journal))
        self.metrics.drill_runs.labels(result=result).inc()
        self.metrics.drill_duration.set(took)
        for name in RESULTS:
            self.metrics.drill_last_result.labels(result=name).set(1 if name == result else 0)
        if result == "passed":
            self.metrics.drill_last_success.set(self.wall())
        event = log.info if result == "passed" else log.error
        event("drill_completed", result=result, drill_id=journal.drill_id,
              failed_step=journal.failed_step, error=journal.error, seconds=round(took, 1),
              queue_id=journal.queue_id, cleanup_ok=journal.cleanup.get("ok"))
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise asyncio.CancelledError  # stopped mid-drill: the cleanup ran, now stop
        return journal

    async def stop(self, timeout: float) -> bool:
        """Interrupt a drill in flight and wait up to `timeout` for its cleanup."""
        if self.current is not None:
            self.current.interrupt("shutdown")
        try:
            async with asyncio.timeout(max(0.0, timeout)):
                await self._idle.wait()
        except TimeoutError:
            log.error("drill_cleanup_outlived_shutdown", waited=timeout)
            return False
        return True


class _LogLines(io.StringIO):
    """The step lines of a scheduled drill, each as a log line."""

    def write(self, text: str) -> int:
        for line in text.splitlines():
            if line.strip():
                log.info("drill_step", line=line)
        return len(text)


def _ts(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    from datetime import datetime

    return datetime.fromisoformat(value).timestamp()

