"""The running leak watcher (`selfcheckd run`): source -> parser -> detector -> alert outbox.

`LeakWatch` assembles the parts from `[leakwatch]` and hands the app its
components: `leakwatch-source` (the read loop, with the blindness check),
`leakwatch-alerts` (the outbox, when `[leakwatch.alert]` is set) and
`sinkhole-mode` (when enabled). It owns the state file: restored once at
start (or handed over from the watcher a reload replaces), saved after every
read that found something, every few seconds while the position moves, after
every change of the outbox's pending set, and once more, completely, at
shutdown; saves run one at a time, coalesced, within the writer's bound
(saving.py). The parsed lines also feed the queue
tracker (queue.py: the mta_* metrics); its messages are saved in the same
document as the position, so a restart neither recounts a line nor forgets a
deferred message.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import structlog

from daemon.delivery import SessionFactory, default_session
from daemon.delivery.outbox import Alert, Outbox
from daemon.logwatch.config import FileSource, LeakWatchConfig
from daemon.logwatch.detector import LOGLEVEL_HINT, Finding, LeakDetector, format_sender
from daemon.logwatch.parser import line_timestamp, timestamp_to_epoch
from daemon.logwatch.pipeline import LineCounts, LineProcessor
from daemon.logwatch.queue import Message, QueueTracker, Result, iso
from daemon.logwatch.queue_errors import ErrorKind
from daemon.logwatch.saving import SAVE_TIMEOUT, Saver
from daemon.logwatch.sinkhole_mode import SinkholeModeWatcher
from daemon.logwatch.sources import EndOfInput, LineSource, SourceError
from daemon.logwatch.sources.cloudwatch import CloudWatchPoller, call_deadline
from daemon.logwatch.sources.file import FilePosition, FileTail, SourceUnavailable
from daemon.logwatch.sources.stdin import StdinReader
from daemon.metrics import Metrics
from daemon.retry import Backoff
from daemon.state import (
    READ_TIMEOUT,
    VERSION,
    LeakwatchState,
    StateFile,
    StateUnreadable,
    parse_state,
    trim,
)
from daemon.state_io import KILL_GRACE
from daemon.state_s3 import S3StateStore
from daemon.supervisor import Component, Progress

log = structlog.get_logger("daemon.leakwatch")

Sleep = Callable[[float], Awaitable[None]]

# A read loop that fails waits at least this long before the next try.
MIN_RETRY = 1.0
# No successful read for this long (at least) and the source counts as stalled.
MIN_DEADLINE = 15.0
# Reads that only moved the position are saved at most this often (a restart then
# re-reads at most this much, which found nothing); findings are saved at once.
POSITION_SAVE_INTERVAL = 5.0
# Messages past the queue retention are looked for at most this often (seconds).
QUEUE_EXPIRE_INTERVAL = 60.0
# /status lists at most this many silent messages (the longest silent first).
STATUS_SILENT_LISTED = 20


def leak_summary(f: Finding) -> str:
    return (
        f"sinkhole leak: mail to {f.recipient} from {format_sender(f.sender)} "
        f"(queue id {f.queue_id}, stat={f.stat})"
    )


def leak_key(f: Finding) -> str:
    """The outbox key of a leak; `leak ` + the detector's (queue id, recipient) key."""
    return f"leak {f.key}"


class FileLines:
    """`LineSource` over a `FileTail` that remembers its position between openings."""

    kind = "file"

    def __init__(self, cfg: FileSource) -> None:
        self.cfg = cfg
        self.poll_interval = cfg.poll_interval
        # Checking for a missing file is cheap: retry often, at most every few seconds.
        self.max_backoff = max(5.0, 5 * cfg.poll_interval)
        self.position: FilePosition | None = None
        self._tail: FileTail | None = None

    @property
    def more_pending(self) -> bool:
        return self._tail is not None and self._tail.more_pending

    @contextlib.asynccontextmanager
    async def opened(self) -> AsyncIterator[None]:
        self._tail = FileTail(self.cfg.path, from_beginning=self.cfg.from_beginning,
                              position=self.position)
        try:
            yield
        finally:
            self._tail.close()
            self._tail = None

    async def prime(self) -> list[str]:
        """Fix where reading starts now (the end, like tail -F), not at the first poll.

        Lines written between start-up (or a reload) and the first poll would
        otherwise fall before the end the first poll finds. Returns the lines that
        completed meanwhile: the position is already past them, so the caller
        handles them before anything can save it.
        """
        if self.position is not None or self.cfg.from_beginning:
            return []
        tail = FileTail(self.cfg.path)
        try:
            lines = await tail.read()
        except SourceUnavailable:
            return []  # a file that appears later is read from its start anyway
        finally:
            tail.close()
        self.position = tail.position
        return lines

    async def read(self) -> list[str]:
        if self._tail is None:
            raise SourceError("other", "file source not open")
        try:
            lines = await self._tail.read()
        except SourceUnavailable as exc:
            raise SourceError(exc.reason, str(exc)) from None
        if self._tail.position is not None:
            self.position = self._tail.position
        return lines

    def state(self) -> dict[str, Any] | None:
        if self.position is None:
            return None
        return {"path": str(self.cfg.path), **self.position.as_dict()}

    def restore(self, state: dict[str, Any]) -> None:
        if state.get("path") == str(self.cfg.path):
            self.position = FilePosition.from_dict(
                {k: v for k, v in state.items() if k != "path"})


class SourceLoop:
    """The `leakwatch-source` component: read, detect, save, check blindness, repeat."""

    name = "leakwatch-source"

    def __init__(self, watch: LeakWatch, sleep: Sleep, clock: Callable[[], float]) -> None:
        self.watch = watch
        self.source = watch.source
        self._sleep = sleep
        self._clock = clock
        self._saved_at = clock()
        self._tried_first_save = False  # a failing state file is retried at the interval
        self.ended = False
        interval = self.source.poll_interval
        self._backoff = Backoff(initial=max(MIN_RETRY, interval),
                                maximum=max(MIN_RETRY, interval, self.source.max_backoff))
        # Room for a slow poll and the longest backoff before counting as stalled.
        slow_call = call_deadline(watch.config.cloudwatch.request_timeout) \
            if self.source.kind == "cloudwatch" else 0.0
        self.progress_deadline = max(MIN_DEADLINE,
                                     3 * interval + self._backoff.maximum + slow_call)

    @property
    def may_finish(self) -> bool:
        return self.ended  # standard input closed

    async def run(self, progress: Progress) -> None:
        failures = 0
        while True:
            try:
                async with self.source.opened():
                    while True:
                        try:
                            batch = await self.source.read()
                        except SourceError as exc:
                            failures += 1
                            await self._failed(exc, failures, progress)
                            continue
                        if failures:
                            log.info("leakwatch_source_recovered", source=self.source.kind,
                                     failures=failures)
                            failures = 0
                        found = await self.watch.handle_batch(batch)
                        progress.progress()
                        progress.up()
                        saved = self.watch.saved_source
                        # A finding at once; a position that moved, every few seconds, and
                        # the first one at once: a first start on a quiet log that is then
                        # killed must still resume where it began.
                        # stdin has no position: its lines still change what is kept.
                        moved = bool(batch) or self.source.state() != saved
                        if found or (moved and (
                                (saved is None and not self._tried_first_save)
                                or self._clock() - self._saved_at >= POSITION_SAVE_INTERVAL)):
                            await self.watch.save()
                            self._saved_at = self._clock()
                            self._tried_first_save = True
                        self.watch.check_blindness()
                        if not self.source.more_pending:
                            await self._sleep(self.source.poll_interval)
            except SourceError as exc:  # opening the source failed
                failures += 1
                await self._failed(exc, failures, progress)
            except EndOfInput:
                log.info("leakwatch_source_ended", source=self.source.kind)
                self.ended = True
                return

    async def _failed(self, exc: SourceError, failures: int, progress: Progress) -> None:
        """Count every failure, log the first of an episode, report down, back off."""
        delay = round(self._backoff.delay(failures), 3)
        self.watch.count_error(exc.reason)
        # Alive and saying why (a file that is missing, CloudWatch unreachable): degraded,
        # not dead. A restart would not bring the file back and would stop the round trip.
        progress.retrying(f"{exc.reason}: {exc}", exc.reason)
        if failures == 1:
            log.warning("leakwatch_poll_failed", source=self.source.kind, reason=exc.reason,
                        error=str(exc), retry_in=delay)
        else:
            log.debug("leakwatch_poll_failed", source=self.source.kind, reason=exc.reason,
                      error=str(exc), retry_in=delay, failures=failures)
        await self._sleep(delay)


class LeakWatch:
    """One configured leak watcher: detector memory, source, outbox, state file."""

    def __init__(
        self,
        config: LeakWatchConfig,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        sleep: Sleep = asyncio.sleep,
        session_factory: SessionFactory = default_session,
        stdin: LineSource | None = None,
        state: StateFile | S3StateStore | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self._clock = clock
        self._wall = wall
        self.detector = LeakDetector(
            config.domains, config.allowed_senders, config.max_tracked_queue_ids)
        self.queue = QueueTracker(config.queue_retention, config.max_tracked_messages,
                                  clock=wall, wall=wall,
                                  silent_after=config.queue_silent_after)
        self.processor = LineProcessor(self.detector, clock=clock, queue=self.queue)
        self._bind_queue_metrics(self.queue)
        self._flushed_results = dict(self.queue.counts)
        self._flushed_skips = self._skips()
        self._flushed_handoffs = self.queue.handoffs
        self._flushed_errors = dict(self.queue.errors)
        self._expired_at = clock()
        self._evicted_warned = False
        # The state file, or the S3 object a caller built (its fence: daemon/ha.py).
        self.state = state if state is not None else StateFile(config.state_path, metrics, wall)
        # The source's position as the state file holds it (None: not written yet).
        self.saved_source: dict[str, Any] | None = None
        self.saver = Saver(
            self.state, self.snapshot, metrics,
            source=config.alert.source if config.alert else "selfcheckd-leakwatch",
            on_saved=self._saved, on_failed=lambda: self.count_error("state_write"))
        # Findings of the batch being handled that are not in the outbox yet (a sender
        # lookup runs first): a save leaves them unreported, so a restart finds them again.
        self._unreported: set[str] = set()
        self.outbox: Outbox | None = None
        if config.alert is not None:
            self.outbox = Outbox(config.alert, metrics, on_change=self.save,
                                 on_expired=self._expired, clock=clock, wall=wall,
                                 sleep=sleep, session_factory=session_factory)
        # Undelivered alerts restored while no webhook is configured: kept, not dropped.
        self._orphans: list[dict[str, Any]] = []
        self.poller: CloudWatchPoller | None = None
        self.source: LineSource
        if config.source == "cloudwatch":
            self.poller = CloudWatchPoller(config.cloudwatch, on_error=self.count_error)
            self.source = self.poller
        elif config.source == "file":
            self.source = FileLines(config.file)
        else:
            self.source = stdin if stdin is not None else StdinReader()
        self.source_loop = SourceLoop(self, sleep, clock)
        self.sinkhole: SinkholeModeWatcher | None = None
        if config.sinkhole_mode.enabled:
            self.sinkhole = SinkholeModeWatcher(config.sinkhole_mode, metrics, warn=self.warn,
                                                sleep=sleep)
        self._flushed = LineCounts()
        # Until open() found the saved state: nothing known, so nothing to save over it or
        # hand over to a reload's watcher.
        self.opened = False
        # The saved state is applied (or there was none); False while the store does not
        # hand it over (daemon.app.StateReader retries before a line is read).
        self.restored = False
        self.unread_reason: str | None = None
        self._read_timeout = READ_TIMEOUT
        self.started = clock()
        self._blind_since: float | None = None
        self._blind_at = 0.0  # when the episode began, on self._clock
        self._silent_warned = False

    def components(self) -> list[Component]:
        parts: list[Component] = [self.source_loop]
        if self.outbox is not None:
            parts.append(self.outbox)
        if self.sinkhole is not None:
            parts.append(self.sinkhole)
        return parts

    # -- state ------------------------------------------------------------------------------

    async def open(
        self, handover: dict[str, Any] | None = None, *, read_timeout: float = READ_TIMEOUT,
    ) -> None:
        """Restore what an earlier process (or the watcher being replaced) left; log start.

        A state the store does not hand over (a state file the volume does not hand over
        within `read_timeout`, an S3 object not fetched yet) is not known: the watcher
        stays unopened (`restored` False, `unread_reason` says why), and the caller has
        `daemon.app.StateReader` retry `restore_saved` before it starts the components
        and so before a line is read; nothing is saved over the state meanwhile.
        """
        self._read_timeout = read_timeout
        if handover is not None:
            self._restore_document(handover, origin="handover")
            self.restored = True
        elif not self.restored and await self.restore_saved() is not None:
            return
        self.opened = True
        if self.outbox is not None and self.state.path is None:
            log.warning("leakwatch_without_state_file",
                        consequence="alerts still pending when selfcheckd stops are lost; "
                                    "set [leakwatch] state_file")
        cursor = self.poller.cursor_ms if self.poller is not None else None
        log.info("leakwatch_started", source=self.config.source,
                 domains=",".join(self.config.domains),
                 state_file=str(self.state.path) if self.state.path else None,
                 resumed=cursor is not None or self._file_position() is not None,
                 pending_alerts=len(self.outbox.pending()) if self.outbox else 0,
                 deferred_messages=self.queue.deferred_count())
        if self.poller is not None and self.poller.cfg.filter_pattern:
            log.info("queue_health_partial", filter_pattern=self.poller.cfg.filter_pattern,
                     consequence="mta_* metrics count only the lines the filter pattern "
                                 "fetches; set filter_pattern = \"\" for the whole queue")

    async def restore_saved(self, timeout: float | None = None) -> str | None:
        """Read the saved state and apply it; why not (the store did not answer), else None.

        The file store reads in a worker process within `timeout` s (default: open's
        `read_timeout`); the S3 store fetches the object whole (and claims it) first.
        """
        timeout = self._read_timeout if timeout is None else timeout
        state = self.state
        try:
            if isinstance(state, S3StateStore):
                if state.needs_fetch:
                    await state.fetch(timeout)
                loaded = state.load()
            else:
                loaded = await state.load(timeout)
        except StateUnreadable as exc:
            self.unread_reason = str(exc)
            return self.unread_reason
        if loaded is not None and (why := self._apply(loaded)) is not None:
            if isinstance(state, S3StateStore):
                state.quarantine(why)
            else:
                await state.quarantine(why)
        self.restored, self.unread_reason = True, None
        return None

    def _restore_document(self, document: dict[str, Any], origin: str) -> None:
        try:
            parsed = parse_state({"version": VERSION, **document})
        except ValueError as exc:
            log.warning("leakwatch_state_not_taken", origin=origin, reason=str(exc))
            return
        if (why := self._apply(parsed)) is not None:
            log.warning("leakwatch_state_not_taken", origin=origin, reason=why)

    def _apply(self, state: LeakwatchState) -> str | None:
        """Apply every section or none; why not (nothing changed) if one does not fit."""
        try:
            position = None
            if state.file is not None and isinstance(self.source, FileLines):
                probe = FileLines(self.source.cfg)
                probe.restore(state.file.model_dump())
                position = probe.position
            alerts = [Alert(**a.model_dump()) for a in state.outbox]
            messages = [] if state.queue is None else [
                Message.from_state(m.model_dump()) for m in state.queue.messages]
            tasks = [] if state.queue is None else [
                (t.task, t.last_line) for t in state.queue.tasks]
        except (ValueError, TypeError, KeyError) as exc:
            return f"{type(exc).__name__}: {exc}"[:300]
        if state.detector is not None:
            self.detector.restore(state.detector.senders, state.detector.reported)
        if state.queue is not None:
            self.queue.restore(messages, tasks)
            self.queue.expire()
        if state.cloudwatch is not None and self.poller is not None:
            self.poller.restore(state.cloudwatch.cursor_ms, state.cloudwatch.seen)
        if position is not None and isinstance(self.source, FileLines):
            self.source.position = position
        if self.outbox is not None:
            self.outbox.restore(alerts)
        elif alerts:
            self._orphans = [a.as_dict() for a in alerts]
            log.warning("leakwatch_alerts_undeliverable", pending=len(alerts),
                        hint="configure [leakwatch.alert] to deliver them; they are kept "
                             "in the state file meanwhile")
        return None

    async def prime(self) -> None:
        """Fix the source's starting point now (see FileLines.prime); once restored."""
        if (self.restored and isinstance(self.source, FileLines)
                and (lines := await self.source.prime())):
            await self.handle_batch(lines)

    def _file_position(self) -> FilePosition | None:
        return self.source.position if isinstance(self.source, FileLines) else None

    def snapshot(self) -> dict[str, Any]:
        """Everything worth keeping, as the state file stores it (without the version)."""
        detector = self.detector.state()
        reported = detector["reported"]
        if self._unreported:  # in no saved state before they are in the outbox
            reported = [k for k in reported if k not in self._unreported]
        document: dict[str, Any] = {
            "detector": {"senders": trim(detector["senders"]), "reported": trim(reported)},
            "outbox": self.outbox.snapshot() if self.outbox is not None else self._orphans,
            "queue": {"messages": self.queue.state(), "tasks": self.queue.task_state()},
        }
        if isinstance(self.state, S3StateStore) and (fence := self.state.fence()) is not None:
            document["fence"] = fence  # who wrote it: the lease's holder and token
        source = self.source.state()
        if source is not None and self.source.kind in ("cloudwatch", "file"):
            document[self.source.kind] = source
        return document

    async def save(self, timeout: float | None = SAVE_TIMEOUT) -> bool:
        """Have the state as it is now written (saving.py: one write at a time, coalesced)."""
        return await self.saver.save(timeout)

    def _saved(self, document: dict[str, Any]) -> None:
        self.saved_source = document.get(self.source.kind)

    async def close(self, timeout: float | None = SAVE_TIMEOUT, *, save: bool = True) -> None:
        """The final save, after the source stopped and the outbox was flushed.

        `save=False`: none, and no write asked for earlier is waited for (a leader
        whose lease may have passed to another task must not write a state file
        over its successor's).
        """
        loop = asyncio.get_running_loop()
        started, asked_at = loop.time(), self._wall()
        saved = await self.save(timeout) if save else False
        await self.saver.close(0.0 if not save else None if timeout is None
                               else max(0.0, timeout - (loop.time() - started)))
        if save:  # a write for this request may have ended while the saver closed
            last = self.state.last_saved_at
            saved = saved or (last is not None and last >= asked_at
                              and self.state.last_error is None)
        if isinstance(self.state, S3StateStore):
            await self.state.close()  # a reload's new watcher may reuse it: a new client
        else:  # a write cut short killed its worker: reap it (not past the time left)
            left = KILL_GRACE if timeout is None else timeout - (loop.time() - started)
            await self.state.io.settle(max(0.0, min(KILL_GRACE, left)))
        # A reload may drop [leakwatch]: no deferred message and no pending alert may stay
        # on /metrics, ageing, for a watcher that is gone (a new one binds its own). The
        # alerts themselves stay in the state file.
        self._bind_queue_metrics(None)
        if self.outbox is not None:
            self.outbox.unbind_metrics()
        pending = len(self.outbox.pending()) if self.outbox else 0
        if pending and self.state.path is None:
            log.error("alerts_lost_at_exit", pending=pending,
                      why="no [leakwatch] state_file to keep them in")
        elif save and not saved:  # save=False is the caller's choice, logged by it
            stuck = self.state.io.stuck() if isinstance(self.state, StateFile) else None
            error = self.state.last_error or (
                f"no write finished within the {timeout:.1f}s left to stop" if timeout is not None
                else "the write did not finish")
            log.error("leakwatch_state_not_saved", path=str(self.state.path),
                      error=error, pending_alerts=pending,
                      stuck_worker=stuck[0] if stuck else None,
                      consequence="the next start resumes from the last state saved: what "
                                  "was read since is read again, alerts pending since are "
                                  "not kept")
        log.info("leakwatch_stopped", source=self.config.source, pending_alerts=pending)

    # -- lines, findings, alerts ------------------------------------------------------------

    def count_error(self, reason: str) -> None:
        self.metrics.leakwatch_errors.labels(reason=reason).inc()

    def warn(self, summary: str, key: str) -> None:
        """A warning alert (blindness, sinkhole mode), if warnings go to the webhook."""
        if self.outbox is not None and self.outbox.cfg.send_warnings:
            self.outbox.submit(summary, "warning", key)

    def _expired(self, key: str) -> None:
        # Its alert was never delivered: alert again if sendmail logs it again.
        if key.startswith("leak "):
            self.detector.forget_reported(key.removeprefix("leak "))

    def report(self, f: Finding) -> None:
        self._unreported.discard(f.key)
        if f.expected:
            self.metrics.test_recipients.inc()
            log.info("sinkhole_test_recipient", queue_id=f.queue_id, recipient=f.recipient,
                     sender=format_sender(f.sender), stat=f.stat)
            return
        self.metrics.leaked_recipients.inc()
        log.error("sinkhole_leak_detected", queue_id=f.queue_id, recipient=f.recipient,
                  sender=format_sender(f.sender), stat=f.stat)
        if self.outbox is not None:
            self.outbox.submit(leak_summary(f), key=leak_key(f))

    def _bind_queue_metrics(self, queue: QueueTracker | None) -> None:
        """Compute the queue gauges at scrape time from `queue` (so the age grows between
        reads); None: they read 0."""
        m = self.metrics
        if queue is None:
            for gauge in (m.mta_deferred_messages, m.mta_oldest_deferred,
                          m.mta_tracked_messages, m.mta_deferred_silent, m.mta_oldest_silent,
                          m.mta_tasks_logging):
                gauge.set_function(lambda: 0.0)
            return
        for result in Result:
            m.mta_deliveries.labels(result=result.value)  # every result shows, from 0
        for reason in ("truncated", "duplicate"):
            m.mta_skipped_lines.labels(reason=reason)
        for kind in ErrorKind:
            m.mta_queue_errors.labels(kind=kind.value)
        m.mta_deferred_messages.set_function(queue.deferred_count)
        m.mta_oldest_deferred.set_function(lambda: queue.oldest_deferred_age(self._wall()))
        m.mta_tracked_messages.set_function(queue.tracked_count)
        m.mta_deferred_silent.set_function(lambda: queue.silent_count(self._wall()))
        m.mta_oldest_silent.set_function(lambda: queue.oldest_silent_age(self._wall()))
        m.mta_tasks_logging.set_function(lambda: queue.tasks_logging(self._wall()))

    def queue_status(self) -> dict[str, Any]:
        """The shared queue as /status shows it: silence, hand-offs, tasks, errors."""
        queue, now = self.queue, self._wall()
        return {
            "silent_after": queue.silent_after,
            # Silence is judged at this time: now, or the last read of the whole log.
            "judged_at": iso(queue.reference(now)),
            "deferred_messages": queue.deferred_count(),
            "silent_messages": [
                {"queue_id": m.queue_id, "last_line": iso(m.last_seen),
                 "seconds_since_last_line": round(queue.reference(now) - m.last_seen, 3),
                 "last_task": m.last_task}
                for m in queue.silent_messages(now)[:STATUS_SILENT_LISTED]],
            "handoffs": queue.handoffs,
            "tasks": queue.task_listing(now),
            "errors": {"counts": {k.value: n for k, n in queue.errors.items()},
                       "recent": queue.recent_error_lines()},
        }

    def _skips(self) -> dict[str, int]:
        return {"truncated": self.queue.truncated, "duplicate": self.queue.duplicates}

    def _flush_queue(self) -> None:
        """Hand the tracker's new counts and delays to Prometheus; age out old messages."""
        queue, m = self.queue, self.metrics
        for result, value in queue.counts.items():
            delta = value - self._flushed_results[result]
            if delta:
                m.mta_deliveries.labels(result=result.value).inc(delta)
        self._flushed_results = dict(queue.counts)
        skips = self._skips()
        for reason, value in skips.items():
            if delta := value - self._flushed_skips[reason]:
                m.mta_skipped_lines.labels(reason=reason).inc(delta)
        self._flushed_skips = skips
        for delay in queue.take_delays():
            m.mta_delivery_delay.observe(delay)
        if delta := queue.handoffs - self._flushed_handoffs:
            m.mta_handoffs.inc(delta)
        self._flushed_handoffs = queue.handoffs
        for kind, value in queue.errors.items():
            if delta := value - self._flushed_errors[kind]:
                m.mta_queue_errors.labels(kind=kind.value).inc(delta)
        self._flushed_errors = dict(queue.errors)
        if self._clock() - self._expired_at >= QUEUE_EXPIRE_INTERVAL:
            self._expired_at = self._clock()
            queue.expire()
        if queue.evicted and not self._evicted_warned:
            self._evicted_warned = True
            log.warning("queue_tracker_full", max_tracked_messages=queue.max_messages,
                        consequence="the least recently active messages are forgotten "
                                    "(finished ones first); raise "
                                    "leakwatch.max_tracked_messages")

    def _flush_counts(self) -> None:
        now, was = self.processor.counts.as_dict(), self._flushed.as_dict()
        m = self.metrics.maillog_lines
        for kind, value in now.items():
            delta = value - was[kind]
            if delta:
                m.labels(kind=kind).inc(delta)
        self._flushed = dataclasses.replace(self.processor.counts)
        ts = self.processor.last_delivery_timestamp
        if ts is not None:
            epoch = timestamp_to_epoch(ts)
            if epoch is not None:
                self.metrics.last_delivery_line.set(epoch)

    async def resolve_sender(self, f: Finding) -> Finding:
        """With a server-side filter, from= lines are not fetched: look the sender up."""
        poller = self.poller
        if f.sender is not None or poller is None or not poller.cfg.filter_pattern:
            return f
        epoch = timestamp_to_epoch(f.timestamp)
        before_ms = int((epoch if epoch is not None else self._wall()) * 1000)
        sender = await poller.lookup_sender(f.queue_id, before_ms)
        if sender is None:
            return f
        self.detector.senders.put(f.queue_id, sender)
        return dataclasses.replace(f, sender=sender, expected=self.detector.is_allowed(sender))

    async def handle_batch(self, batch: list[str]) -> bool:
        """One successful read: detect, report, export counts, lag and the poll time.

        True if the batch held a sinkhole recipient (the state then changed)."""
        streams = None
        if self.poller is not None and len(self.poller.last_streams) == len(batch):
            streams = self.poller.last_streams
        # The detector counts the findings reported now; the queue tracker takes the lines.
        findings = self.processor.feed_batch(batch, streams)
        # Silence is judged up to what was read: a backlog still being read, at its newest
        # line; a read that reached the end, at now; a source that fails, at its last read.
        self.queue.reading_backlog = self.source.more_pending
        if not self.source.more_pending:
            self.queue.read_up_to = self._wall()
        self._flush_queue()
        # Sender lookups take seconds, and the outbox saves meanwhile: until a finding is
        # in the outbox, a save neither marks it reported nor moves the read past its
        # line (the poller's unsettled batch), so a kill makes the next start find it again.
        self._unreported = {f.key for f in findings}
        try:
            for i, finding in enumerate(findings):
                try:
                    finding = await self.resolve_sender(finding)
                except BaseException:
                    # Stopped or crashed mid-lookup: report what is left with the sender
                    # unknown rather than lose it (the detector already took them).
                    for rest in findings[i:]:
                        self.report(rest)
                    raise
                self.report(finding)
        finally:
            self._unreported.clear()
            if self.poller is not None:
                self.poller.settle()
        self._flush_counts()
        now = self._wall()
        self.metrics.leakwatch_last_poll_success.set(now)
        newest: float | None = None
        if self.poller is not None and self.poller.newest_event_ms is not None:
            newest = self.poller.newest_event_ms / 1000
        elif batch:
            ts = line_timestamp(batch[-1])
            newest = timestamp_to_epoch(ts) if ts else None
        if newest is not None:
            self.metrics.leakwatch_lag.set(max(0.0, now - newest))
        return bool(findings)

    def check_blindness(self) -> None:
        """Warn once per episode while sendmail lines flow without delivery lines."""
        now = self._clock()
        window = self.config.blind_after
        p = self.processor
        last_to = p.last_delivery_seen if p.last_delivery_seen is not None else self.started
        mta_flowing = p.last_mta_seen is not None and now - p.last_mta_seen < window
        if self._blind_since is None:
            if mta_flowing and now - last_to > window:
                self._blind_since = self._wall()
                self._blind_at = now
                log.warning("leakwatch_blind", reason="sendmail lines but no to= lines",
                            seconds=round(now - last_to), hint=LOGLEVEL_HINT)
                self.warn(
                    f"leak watcher is blind: sendmail logs lines but no delivery (to=) line "
                    f"for {round(now - last_to)} s; sendmail needs LogLevel 9",
                    f"blind {self._blind_since}")
        elif p.last_delivery_seen is not None and p.last_delivery_seen > self._blind_at:
            # Only a delivery line ends the episode: a quiet MTA (no line at all for a
            # while) is no cure, and must not start a second warning when it speaks again.
            log.info("leakwatch_sees_deliveries_again")
            self._blind_since = None
        last_line = p.last_line_seen if p.last_line_seen is not None else self.started
        if now - last_line > window:
            if not self._silent_warned:
                self._silent_warned = True
                log.warning("leakwatch_no_lines", source=self.config.source,
                            seconds=round(now - last_line))
        else:
            self._silent_warned = False
