"""The queue-persistence drill: the runbook's eight steps, each checked, and a cleanup that
always runs.

Where each step checks its evidence is here: `_queued` (3), `_survived` (5),
`_retry` (7) and `_drained` (8) read every task's `mailq` (or, for a task
without ECS Exec, its log stream) through `_observe`, and judge what they saw
in `_judge_listed` / `_judge_gone`.

Exit paths: a step that sees the queue misbehave raises DrillFailedError (exit 1);
the environment (an API unreachable, no settle in time, a signal) DrillAbortedError
(exit 3); prod, a missing harness or another drill running DrillRefusedError (exit 2,
before anything is touched). From the moment the harness is known to exist,
every path ends in the cleanup: park the sinkhole in `defer` (retried until it
reads back `defer` or the cleanup's time is up: exit 4), then, when nothing
interrupted the drill and the message may still be queued, drain it (accept,
queue run, defer again). A first signal cancels the steps; a second during the
cleanup cancels only the drain, never the parking; `hard_exit` is the third's.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import re
import secrets
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import make_msgid
from typing import Any, TextIO

import structlog

from daemon.config import SmtpSettings
from daemon.drill.config import DrillConfig
from daemon.drill.driver import (
    Cluster,
    DrillAbortedError,
    DrillFailedError,
    DrillRefusedError,
    ExecUnavailableError,
    LogLine,
    LogSource,
    ModeStore,
)
from daemon.drill.journal import Journal, StepRecord
from daemon.drill.mailq import QueueEntry, entries_for, unanswered
from daemon.drill.send import drill_message, send_message
from daemon.sinkhole import MODES

log = structlog.get_logger("daemon.drill")

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]
Send = Callable[[SmtpSettings, EmailMessage, str, str, float], Awaitable[str]]

SEND_TIMEOUT = 60.0
# Kept from the interrupt budget for stopping the local tasks and printing the journal.
CLOSE_RESERVE = 3.0
PARK_RETRY = (1.0, 10.0)  # first and longest wait between parking attempts
PARK_MIN_ATTEMPT = 1.0  # one parking attempt's least time, whatever the deadline
# A cancellation can be swallowed (Python 3.11's asyncio.wait_for returns a result that
# arrived with it; aiosmtplib reads every SMTP reply through it): cancel again this often.
RECANCEL = 0.5
MAX_EVIDENCE_LINES = 40
# Why a queue run passes a deferred message by: sendmail's MinQueueAge (5m on smtp-out).
MIN_QUEUE_AGE_HINT = ("sendmail skips a message tried less than MinQueueAge ago; give the "
                      "queue run -OMinQueueAge=0 ([drill.local] run_queue, [drill.ecs] "
                      "run_queue_command; docs/drill.md)")
MAX_SAID_LINES = 10  # of a mailq that does not list the message: what it said instead
_QID = r"[0-9A-Za-z]{8}\d{3,}"


@dataclass
class Observation:
    """What one task shows of the drill's message at one moment."""

    task: str
    source: str  # "mailq" | "log"
    answered: bool = False  # a definite reading (mailq ran; a log search returned)
    entries: list[QueueEntry] = field(default_factory=list)  # mailq: listed copies
    log_lines: list[str] = field(default_factory=list)
    said: list[str] = field(default_factory=list)  # mailq's lines when it lists nothing of ours
    error: str | None = None

    @property
    def qids(self) -> set[str]:
        if self.source == "mailq":
            return {e.qid for e in self.entries}
        return {m.group(1) for line in self.log_lines
                if (m := re.search(rf"\b({_QID}): to=", line))}

    def status(self, qid: str) -> str | None:
        if self.source == "mailq":
            return next((e.status for e in self.entries if e.qid == qid), None)
        mine = [line for line in self.log_lines if f"{qid}: to=" in line]
        return mine[-1].partition("stat=")[2] or None if mine else None

    def evidence(self) -> dict[str, Any]:
        lines = ([line for e in self.entries for line in e.lines] if self.source == "mailq"
                 else self.log_lines)
        out: dict[str, Any] = {"source": self.source, "listed": sorted(self.qids),
                               "lines": lines[-MAX_EVIDENCE_LINES:]}
        if self.said:
            out["said"] = self.said
        if self.error:
            out["error"] = self.error
        return out


class Drill:
    """One run of the queue-persistence drill; `run()` returns its journal."""

    def __init__(
        self,
        cfg: DrillConfig,
        smtp: SmtpSettings,
        cluster: Cluster,
        modes: ModeStore,
        logs: LogSource | None = None,
        *,
        keep_going: bool = False,
        lines: TextIO | None = None,
        clock: Clock = time.monotonic,
        wall: Clock = time.time,
        sleep: Sleep = asyncio.sleep,
        send: Send = send_message,
        drill_id: str | None = None,
        hard_exit: Callable[[], None] | None = None,
        lock: bool = True,
    ) -> None:
        self.cfg = cfg
        self.smtp = smtp
        self.cluster = cluster
        self.modes = modes
        self.logs = logs
        self.keep_going = keep_going
        self.lines = lines if lines is not None else sys.stderr
        self.clock = clock
        self.wall = wall
        self.sleep = sleep
        self.send = send
        self.id = drill_id or f"{time.strftime('%Y%m%d%H%M%S', time.gmtime(wall()))}-" \
                              f"{secrets.token_hex(3)}"
        self.hard_exit = hard_exit or _hard_exit
        self.use_lock = lock
        self.recipient = f"{cfg.local_part_prefix}-{self.id}@{cfg.domain}"
        self.journal = Journal(drill_id=self.id, config=cfg.summary(), started=wall(),
                               recipient=self.recipient)
        self.current: StepRecord | None = None
        self.qid: str | None = None
        self.sent = False
        self.delivered = False
        self.gone = False  # every task's mailq answered without it (lost, not delivered)
        self.run_skipped = False  # step 7's queue run did not try the message
        self.replacements: list[str] = []
        self.since = wall()  # log searches start here
        self._armed = False
        self._phase = "idle"  # idle | steps | cleanup | done
        self._signals = 0
        self._interrupted_at: float | None = None
        self._steps_task: asyncio.Task[None] | None = None
        self._recancel: asyncio.TimerHandle | None = None
        self._park_limit: asyncio.Timeout | None = None  # the parking attempt under way
        self._drain_task: asyncio.Task[None] | None = None
        self._failures: list[tuple[str, str]] = []
        self._lock_fd: int | None = None

    # -- signals -------------------------------------------------------------------------

    def interrupt(self, why: str) -> None:
        """SIGTERM / Ctrl-C (or a stopping daemon): see the module docstring."""
        self._signals += 1
        if self._signals == 1:
            self._interrupted_at = self.clock()
            self.journal.interrupted_by = why
        if self._phase == "steps" and self._steps_task is not None and self._signals == 1:
            self._say(f"drill: {why}: stopping; the cleanup runs (parks the sinkhole in defer)")
            self._cancel_steps()
        elif self._phase == "cleanup" and self._signals >= 3:
            self._say(f"drill: {why} again: exiting NOW, the cleanup did not finish: the "
                      f"sinkhole may not be in defer ({self.modes.describe()})")
            self.hard_exit()
        elif self._phase == "cleanup":
            if self._drain_task is not None and not self._drain_task.done():
                self._drain_task.cancel()
            limit = self._park_limit
            if limit is not None:  # parking goes on, but within the interrupt budget
                when, current = _loop_time_for(self._cleanup_deadline(), self.clock), limit.when()
                if current is None or when < current:
                    limit.reschedule(when)
            self._say(f"drill: {why}: the cleanup still parks the sinkhole in defer "
                      "(a third signal exits at once)")

    def _cancel_steps(self) -> None:
        """Cancel the steps, and again until they have ended: one cancellation may be
        swallowed (RECANCEL); `_step` also refuses to start a step once interrupted."""
        task = self._steps_task
        if task is None or task.done():
            return
        task.cancel()
        self._recancel = asyncio.get_running_loop().call_later(RECANCEL, self._cancel_steps)

    # -- the run -------------------------------------------------------------------------

    async def run(self) -> Journal:
        j = self.journal
        try:
            if self.cfg.refused:
                raise DrillRefusedError(
                    f"environment = {self.cfg.environment!r}: the drill stops a task and "
                    "flips the sinkhole; it never runs in production")
            self._take_lock()
            self._phase = "steps"
            self._steps_task = asyncio.create_task(self._steps(), name=f"drill:{self.id}")
            try:
                await asyncio.wait({self._steps_task})
            except asyncio.CancelledError:  # our caller is cancelled: a signal too
                self.interrupt("cancelled")
                await asyncio.wait({self._steps_task})
            finally:
                if self._recancel is not None:
                    self._recancel.cancel()
            self._steps_task.result()
        except DrillRefusedError as exc:
            j.result, j.error = "refused", str(exc)
        except DrillFailedError as exc:
            j.result, j.error = "failed", str(exc)
        except asyncio.CancelledError:
            j.result = "aborted"
            j.error = f"interrupted by {j.interrupted_by or 'cancellation'}"
        except DrillAbortedError as exc:
            j.result, j.error = "aborted", str(exc)
        except Exception as exc:  # a bug or an unforeseen answer: aborted, never silent
            log.exception("drill_internal_error")
            j.result, j.error = "aborted", f"internal error: {type(exc).__name__}: {exc}"
        else:
            if self._failures:
                j.result = "failed"
                j.error = "; ".join(f"{step}: {why}" for step, why in self._failures)
            else:
                j.result = "passed"
        if self._failures and j.failed_step is None:
            j.failed_step = self._failures[0][0]
        try:
            if self._armed:
                await self._cleanup()
        finally:
            self._phase = "done"
            await self._close()
            j.ended = self.wall()
        self._say(f"drill {self.id}: {j.result}" + (f" at {j.failed_step}" if j.failed_step
                                                     else "")
                  + (f": {j.error}" if j.error else "") + f" (exit {j.exit_code})")
        return j

    def _take_lock(self) -> None:
        if not self.use_lock:
            return
        path = self.cfg.lock_file
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise DrillRefusedError(f"cannot open the drill lock {path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise DrillRefusedError(f"another drill is running (it holds {path})") from None
        self._lock_fd = fd

    async def _close(self) -> None:
        interrupted = self._interrupted_at is not None
        for what, closer in (
                ("cluster", lambda: self.cluster.close(interrupted)),
                ("mode store", self.modes.close),
                ("log source", self.logs.close if self.logs else None)):
            if closer is None:
                continue
            try:
                await closer()
            except Exception as exc:  # the journal still gets printed
                log.warning("drill_close_failed", what=what, error=f"{type(exc).__name__}: {exc}")
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    async def _steps(self) -> None:
        await self._step(0, "preflight", self._preflight)
        await self._step(1, "park", self._park_step)
        await self._step(2, "send", self._send)
        await self._step(3, "queued", self._queued)
        await self._step(4, "replace", self._replace)
        await self._step(5, "survived", self._survived)
        await self._step(6, "flip", self._flip)
        await self._step(7, "retry", self._retry)
        await self._step(8, "drained", self._drained)

    async def _step(self, number: int, name: str,
                    body: Callable[[StepRecord], Awaitable[str]]) -> None:
        rec = StepRecord(number=number, name=name, started=self.wall(),
                         mono_started=self.clock())
        self.current = rec
        self.journal.steps.append(rec)
        try:
            if self._interrupted_at is not None:  # its cancellation was swallowed
                raise asyncio.CancelledError
            rec.summary = await body(rec)
            rec.ok = True
        except asyncio.CancelledError:
            rec.ok, rec.error = False, f"interrupted by {self.journal.interrupted_by}"
            self.journal.failed_step = self.journal.failed_step or f"{number} {name}"
            raise
        except DrillFailedError as exc:
            rec.ok, rec.error = False, str(exc)
            self._failures.append((f"{number} {name}", str(exc)))
            if not (self.keep_going and number in (3, 5) and self.qid is not None):
                self.journal.failed_step = self._failures[0][0]
                self._failures.clear()
                raise DrillFailedError(str(exc)) from None
        except Exception as exc:
            rec.ok = False
            rec.error = str(exc) if isinstance(exc, DrillAbortedError | DrillRefusedError) \
                else f"{type(exc).__name__}: {exc}"
            self.journal.failed_step = self.journal.failed_step or f"{number} {name}"
            raise
        finally:
            rec.ended = self.wall()
            rec.duration = self.clock() - rec.mono_started
            self._say(rec.line())

    def _say(self, line: str) -> None:
        self.lines.write(line + "\n")
        self.lines.flush()

    def _record(self, call: dict[str, Any]) -> None:
        if self.current is not None:
            self.current.call(call)

    # -- steps ---------------------------------------------------------------------------

    async def _preflight(self, rec: StepRecord) -> str:
        mode = await self._read_mode()
        rec.evidence["mode"] = mode
        rec.evidence["mode_store"] = self.modes.describe()
        if mode is None:
            raise DrillRefusedError(
                f"{self.modes.describe()} does not exist: the sinkhole harness is not "
                f"deployed here (a send to {self.cfg.domain} would bounce for real)")
        if mode not in MODES:
            raise DrillRefusedError(f"{self.modes.describe()} holds {mode!r}, not a sinkhole mode "
                          f"({', '.join(MODES)})")
        self._armed = True  # from here on every exit path runs the cleanup
        await self.cluster.open(self._record)
        tasks = await self.cluster.tasks()
        rec.evidence["tasks"] = tasks
        if not tasks:
            raise DrillAbortedError(f"{self.cluster.name}: no running task")
        no_exec = [t for t in tasks if not self.cluster.can_exec(t)]
        rec.evidence["exec"] = {t: t not in no_exec for t in tasks}
        if self.logs is not None:
            await self.logs.open()
            rec.evidence["log_source"] = self.logs.describe()
        if no_exec and (self.logs is None or not self.logs.per_task):
            raise DrillAbortedError(f"task(s) {', '.join(no_exec)} cannot run mailq (ECS Exec not "
                          "enabled) and no per-task log source is configured: steps 3, 5 "
                          "and 8 would have no evidence")
        return f"mode {mode}, {len(tasks)} task(s)" + (
            f", log source {self.logs.describe()}" if self.logs is not None else "")

    async def _write_mode(self, mode: str) -> None:
        kind, _, name = self.modes.describe().partition(":")
        self._record({"call": "ssm:PutParameter" if kind == "ssm" else f"{kind}:write",
                      "name": name, "value": mode})
        await self.modes.write(mode)

    async def _read_mode(self) -> str | None:
        kind, _, name = self.modes.describe().partition(":")
        self._record({"call": "ssm:GetParameter" if kind == "ssm" else f"{kind}:read",
                      "name": name})
        return await self.modes.read()

    async def _set_mode(self, mode: str, rec: StepRecord) -> None:
        await self._write_mode(mode)
        back = await self._read_mode()
        rec.evidence["mode"] = back
        if back != mode:
            raise DrillAbortedError(
                f"{self.modes.describe()} reads back {back!r} after writing {mode!r}")
        if self.cfg.mode_cache > 0:
            rec.evidence["waited_for_mode_cache"] = self.cfg.mode_cache + 1
            await self.sleep(self.cfg.mode_cache + 1)

    def _cache_note(self) -> str:
        if self.cfg.mode_cache > 0:
            return f"(waited {self.cfg.mode_cache + 1:g} s for the listener's cache)"
        return "(mode_cache = 0: no wait for a listener cache)"

    async def _park_step(self, rec: StepRecord) -> str:
        await self._set_mode("defer", rec)
        return f"mode defer {self._cache_note()}"

    async def _send(self, rec: StepRecord) -> str:
        domain = self.cfg.sender.rpartition("@")[2]
        message_id = make_msgid(idstring=f"drill-{self.id}", domain=domain)
        msg = drill_message(self.cfg.sender, self.recipient, message_id, self.id)
        self.journal.message_id = message_id
        self.since = self.wall() - 5  # log timestamps may lag our clock a little
        rec.evidence.update(route=self.cfg.route, smtp=f"{self.smtp.host}:{self.smtp.port}",
                            sender=self.cfg.sender, recipient=self.recipient,
                            message_id=message_id)
        reply = await self.send(self.smtp, msg, self.cfg.sender, self.recipient, SEND_TIMEOUT)
        self.sent = True
        rec.evidence["reply"] = reply
        return f"{self.recipient} accepted: {reply}"[:200]

    async def _queued(self, rec: StepRecord) -> str:
        tasks = await self.cluster.tasks()
        found = await self._poll_listed(rec, tasks, definite=False)
        return found

    async def _replace(self, rec: StepRecord) -> str:
        before = await self.cluster.tasks()
        if not before:
            raise DrillAbortedError(f"{self.cluster.name}: no running task to replace")
        victim = sorted(before)[0]
        reason = f"selfcheckd queue-persistence drill {self.id} - validating handoff"
        rec.evidence.update(tasks_before=before, stopped=victim, reason=reason)
        await self.cluster.stop_task(victim, reason)
        steady = await self.cluster.wait_steady(self.cfg.settle_timeout, gone=victim)
        self.replacements = [t for t in steady.tasks if t not in before]
        rec.evidence.update(tasks_after=steady.tasks, replacement=self.replacements,
                            desired=steady.desired, running=steady.running)
        if not self.replacements:
            raise DrillAbortedError(
                f"{self.cluster.name} settled without a replacement for {victim}: the "
                "handoff cannot be checked")
        return f"stopped {victim}, replaced by {', '.join(self.replacements)}; " \
               f"{steady.running}/{steady.desired} running"

    async def _survived(self, rec: StepRecord) -> str:
        tasks = await self.cluster.tasks()
        missing_replacements = [t for t in self.replacements if t not in tasks]
        rec.evidence["replacement"] = self.replacements
        if missing_replacements:
            rec.evidence["note"] = f"replacement(s) {', '.join(missing_replacements)} no " \
                                   "longer running; checking the tasks that are"
        return await self._poll_listed(rec, tasks, definite=True)

    async def _flip(self, rec: StepRecord) -> str:
        await self._set_mode("accept", rec)
        return f"mode accept {self._cache_note()}"

    async def _retry(self, rec: StepRecord) -> str:
        tasks = await self.cluster.tasks()
        runner = next((t for t in [*self.replacements, *sorted(tasks)]
                       if t in tasks and self.cluster.can_exec(t)), None)
        if self.cfg.trigger == "exec" and runner is not None:
            rec.evidence.update(trigger="exec", task=runner)
            output = await self.cluster.run_queue(runner)
            rec.evidence["output"] = output.splitlines()[-MAX_EVIDENCE_LINES:]
            # `sendmail -q -v` says `Running .../<qid>` for each message it tries.
            self.run_skipped = self.qid is not None and self.qid not in output
            rec.evidence["tried"] = not self.run_skipped
            if self.run_skipped:
                return f"queue run on {runner} ended without trying {self.qid} (another " \
                       "runner may hold it; else MinQueueAge skipped it)"
            return f"queue run on {runner} ended"
        why = "trigger = wait" if self.cfg.trigger == "wait" else "no task can run a command"
        rec.evidence.update(trigger="wait", why=why, retry_timeout=self.cfg.retry_timeout)
        await self._poll_gone(rec, tasks, self.cfg.retry_timeout)
        return f"sendmail's own retry delivered it ({why})"

    async def _drained(self, rec: StepRecord) -> str:
        tasks = await self.cluster.tasks()
        summary = await self._poll_gone(rec, tasks, self.cfg.queue_timeout)
        self.delivered = True
        return summary

    # -- evidence ------------------------------------------------------------------------

    async def _observe(self, task: str,
                       log_lines: list[LogLine] | DrillAbortedError | None = None
                       ) -> Observation:
        if self.cluster.can_exec(task):
            obs = Observation(task=task, source="mailq")
            try:
                text = await self.cluster.mailq(task)
            except ExecUnavailableError:
                obs.source = "log"
            except DrillAbortedError as exc:
                obs.error = str(exc)
                return obs
            else:
                problem = unanswered(text)
                if problem is not None:  # an error that exited 0: no reading at all
                    obs.error = f"mailq on {task} gave no queue listing: {problem}"
                    obs.said = _said(text)
                    return obs
                obs.answered = True
                obs.entries = entries_for(text, self.recipient)
                if not obs.entries:
                    obs.said = _said(text)
                return obs
        obs = Observation(task=task, source="log")
        if self.logs is None:
            obs.error = "no mailq (no ECS Exec) and no log source"
            return obs
        if log_lines is None:
            log_lines = await self._log_lines()
        if isinstance(log_lines, DrillAbortedError):
            obs.error = str(log_lines)
            return obs
        obs.answered = True
        obs.log_lines = _unique([ln.text for ln in log_lines if ln.task == task])
        return obs

    async def _log_lines(self) -> list[LogLine] | DrillAbortedError:
        """The log source's lines of our recipient and queue id (one search each, for
        every task at once: FilterLogEvents has a small per-account rate)."""
        assert self.logs is not None
        try:
            lines = await self.logs.search(self.recipient, self.since)
            if self.qid:
                lines += await self.logs.search(self.qid, self.since)
        except DrillAbortedError as exc:
            return exc
        return lines

    async def _observe_all(self, tasks: list[str]) -> dict[str, Observation]:
        shared: list[LogLine] | DrillAbortedError | None = None
        if self.logs is not None and any(not self.cluster.can_exec(t) for t in tasks):
            shared = await self._log_lines()
        return {t: await self._observe(t, shared) for t in tasks}

    async def _poll_listed(self, rec: StepRecord, tasks: list[str], definite: bool) -> str:
        """Steps 3 and 5: every task lists one queue id for our recipient, deferred 4xx."""
        uses_logs = any(not self.cluster.can_exec(t) for t in tasks)
        timeout = self.cfg.retry_timeout if uses_logs else self.cfg.queue_timeout
        deadline = self.clock() + timeout
        rec.evidence["timeout"] = timeout
        while True:
            seen = await self._observe_all(tasks)
            rec.evidence["tasks"] = {t: o.evidence() for t, o in seen.items()}
            verdict = self._judge_listed(seen)
            rec.evidence["queue_id"] = self.qid
            if verdict is None:
                return f"{self.qid} on {len(tasks)}/{len(tasks)} task(s), " \
                       f"{seen[tasks[0]].status(self.qid or '') or 'deferred'}"[:200]
            final = definite and all(o.answered and o.source == "mailq"
                                     for o in seen.values())
            if final or self.clock() >= deadline:
                errors = [o.error for o in seen.values() if o.error]
                if errors and all(o.error for o in seen.values()):
                    raise DrillAbortedError(errors[0])
                raise DrillFailedError(verdict)
            await self.sleep(self.cfg.poll_interval)

    def _judge_listed(self, seen: dict[str, Observation]) -> str | None:
        """None when every task lists our message deferred, else what is wrong."""
        qids = set().union(*(o.qids for o in seen.values())) if seen else set()
        if self.qid is None and len(qids) == 1:
            self.qid = next(iter(qids))
            self.journal.queue_id = self.qid
        if len(qids) > 1 and not (self.qid and qids == {self.qid}):
            return f"more than one queued copy of the message to {self.recipient}: " \
                   f"{', '.join(sorted(qids))}"
        if self.qid is None:
            return f"the message to {self.recipient} is not queued on any task " \
                   "(delivered, refused or not yet relayed?)"
        missing = [t for t, o in seen.items() if self.qid not in o.qids]
        if missing:
            unread = [f"{t} ({seen[t].error})" for t in missing if seen[t].error]
            return f"queue id {self.qid} is not listed by task(s) {', '.join(missing)}" + (
                f"; unreadable: {', '.join(unread)}" if unread else "") + (
                f" (listed by {', '.join(t for t in seen if t not in missing)})"
                if len(missing) < len(seen) else "")
        wrong = {t: o.status(self.qid) for t, o in seen.items()
                 if self.cfg.deferral not in (o.status(self.qid) or "")}
        if wrong:
            return f"queue id {self.qid} is not deferred with {self.cfg.deferral} on " + \
                   ", ".join(f"{t} ({s or 'no status yet'})" for t, s in wrong.items())
        return None

    async def _poll_gone(self, rec: StepRecord, tasks: list[str], timeout: float) -> str:
        """Steps 7 (wait) and 8: gone from every task; with a log source, stat=Sent once."""
        deadline = self.clock() + timeout
        while True:
            seen = await self._observe_all(tasks)
            rec.evidence["tasks"] = {t: o.evidence() for t, o in seen.items()}
            sent = await self._sent_lines(rec)
            verdict = self._judge_gone(seen, sent)
            if verdict is None:
                how = f"; {len(sent)} stat=Sent line" if sent is not None else ""
                return f"{self.qid} gone from {len(tasks)} task(s){how}"
            if self.clock() >= deadline:
                if not _still_queued(seen, self.qid) and _unread(seen):
                    raise DrillAbortedError(verdict)  # no reading, no verdict on the queue
                raise DrillFailedError(verdict)
            await self.sleep(self.cfg.poll_interval)

    async def _sent_lines(self, rec: StepRecord) -> list[str] | None:
        if self.logs is None or self.qid is None:
            return None
        try:
            lines = await self.logs.search(self.recipient, self.since)
        except DrillAbortedError as exc:
            rec.evidence["log_error"] = str(exc)
            return None
        sent = _unique([ln.text for ln in lines if "stat=Sent" in ln.text and " to=" in ln.text])
        rec.evidence["log"] = {"source": self.logs.describe(),
                               "sent": [_shorten(s) for s in sent][-MAX_EVIDENCE_LINES:]}
        return sent

    def _judge_gone(self, seen: dict[str, Observation], sent: list[str] | None) -> str | None:
        qid = self.qid or "?"
        still = _still_queued(seen, qid)
        if still:
            return f"queue id {qid} still queued after the flip on " + ", ".join(
                f"{t} ({seen[t].status(qid) or 'no status'})" for t in still) + (
                f"; the queue run of step 7 did not try it: {MIN_QUEUE_AGE_HINT}"
                if self.run_skipped else "")
        unread = _unread(seen)
        if unread:
            return f"mailq unreadable on {', '.join(unread)}: " \
                   f"{seen[unread[0]].error or 'no answer'}"
        if sent is not None or any(o.source == "log" for o in seen.values()):
            lines = sent or []
            if sent is None:  # log evidence only: the per-task lines carry stat=
                lines = [ln for o in seen.values() for ln in o.log_lines if "stat=Sent" in ln]
            if not lines:
                return f"no to=<{self.recipient}> line with stat=Sent for {qid} in the log " \
                       "source (not delivered after the flip?)"
            qids = {m.group(1) for ln in lines if (m := re.search(rf"\b({_QID}): to=", ln))}
            if len(lines) > 1 or len(qids) > 1:
                return f"the message was delivered more than once: {len(lines)} stat=Sent " \
                       f"lines ({', '.join(sorted(qids))})"
        return None

    # -- cleanup -------------------------------------------------------------------------

    def _cleanup_deadline(self) -> float:
        if self._interrupted_at is not None:
            return self._interrupted_at + self.cfg.interrupt_budget - CLOSE_RESERVE
        return self.clock() + self.cfg.cleanup_timeout

    async def _cleanup(self) -> None:
        self._phase = "cleanup"
        rec = StepRecord(number=None, name="cleanup", started=self.wall(),
                         mono_started=self.clock())
        self.current = rec
        c = self.journal.cleanup
        actions: list[str] = c["actions"]
        deadline = self._cleanup_deadline()
        parked = await self._park(actions, deadline)
        if parked and self._may_remain() and self._interrupted_at is None:
            self._drain_task = asyncio.create_task(self._drain(actions), name="drill:drain")
            try:
                async with asyncio.timeout_at(_loop_time_for(deadline, self.clock)):
                    await asyncio.wait({self._drain_task})
            except TimeoutError:
                self._drain_task.cancel()
                await asyncio.wait({self._drain_task})
                actions.append("drain stopped: out of cleanup time")
            if self._drain_task.cancelled():
                if "drain stopped: out of cleanup time" not in actions:
                    actions.append("drain skipped: interrupted")
            elif (exc := self._drain_task.exception()) is not None:
                actions.append(f"drain failed: {exc}")
            final = self._cleanup_deadline() if self._interrupted_at is not None \
                else max(deadline, self.clock() + 10)
            parked = await self._park(actions, final)
        c["ok"] = parked
        c["mode"] = "defer" if parked else "unknown"
        c["listener_defers_within"] = self.cfg.mode_cache
        left = await self._left()
        c["left"] = left
        rec.ended, rec.duration, rec.ok = self.wall(), self.clock() - rec.mono_started, parked
        rec.summary = "; ".join(actions + left)[:300]
        c["calls"] = rec.evidence.get("calls", [])
        if not parked:
            rec.error = (f"the sinkhole may be left in accept: set it back by hand ("
                         f"{_park_hint(self.modes.describe())})")
            self._say("DRILL CLEANUP FAILED: " + rec.error)
        self._say(rec.line())

    def _may_remain(self) -> bool:
        return self.sent and not self.delivered and not self.gone

    async def _park(self, actions: list[str], deadline: float) -> bool:
        """Write `defer` until it reads back `defer`, or the deadline passes. Each attempt
        and each wait ends by the deadline, and a signal brings it forward to the
        interrupt budget's (`interrupt` reschedules the one under way)."""
        attempt = 0
        while True:
            attempt += 1
            deadline = self._within_budget(deadline)
            # An attempt gets at least PARK_MIN_ATTEMPT even when the steps ate the time.
            ends = max(deadline, self.clock() + PARK_MIN_ATTEMPT)
            try:
                async with asyncio.timeout_at(_loop_time_for(ends, self.clock)) as limit:
                    self._park_limit = limit
                    await self._write_mode("defer")
                    back = await self._read_mode()
                if back == "defer":
                    actions.append(f"parked in defer ({self.modes.describe()}, "
                                   f"attempt {attempt})")
                    return True
                problem = f"reads back {back!r}"
            except DrillAbortedError as exc:
                problem = str(exc)
            except TimeoutError:
                problem = "no answer before the cleanup's deadline"
            finally:
                self._park_limit = None
            deadline = self._within_budget(deadline)
            wait = min(PARK_RETRY[0] * 2 ** (attempt - 1), PARK_RETRY[1])
            if self.clock() + wait > deadline:
                actions.append(f"could not park in defer after {attempt} attempt(s): {problem}")
                return False
            self._say(f"drill cleanup: parking in defer failed ({problem}); retrying in "
                      f"{wait:g} s")
            try:
                async with asyncio.timeout_at(_loop_time_for(deadline, self.clock)) as limit:
                    self._park_limit = limit
                    await self.sleep(wait)
            except TimeoutError:
                pass  # a signal brought the deadline forward: one last attempt
            finally:
                self._park_limit = None

    def _within_budget(self, deadline: float) -> float:
        """`deadline`, or the interrupt budget's when a signal came (whichever is first)."""
        if self._interrupted_at is None:
            return deadline
        return min(deadline, self._cleanup_deadline())

    async def _drain(self, actions: list[str]) -> None:
        """The message may still be queued: accept, queue run, check (defer comes after)."""
        tasks = await self.cluster.tasks()
        seen = await self._observe_all([t for t in tasks if self.cluster.can_exec(t)])
        holding = [t for t, o in seen.items() if o.entries]
        if not holding:
            unread = [t for t, o in seen.items() if not o.answered]
            if unread or not seen:
                actions.append("cannot tell whether it is still queued: no mailq reading "
                               f"from {', '.join(unread) or 'any task'}")
                return
            actions.append("message not queued on any task: nothing to drain")
            self.gone = True
            return
        runner = holding[0]
        actions.append(f"draining {', '.join(sorted({e.qid for e in seen[runner].entries}))}:"
                       f" accept, queue run on {runner}")
        await self._write_mode("accept")
        if self.cfg.mode_cache > 0:
            await self.sleep(self.cfg.mode_cache + 1)
        output = await self.cluster.run_queue(runner)
        after = await self._observe_all(holding)
        if any(o.entries for o in after.values()):
            qids = {e.qid for o in after.values() for e in o.entries}
            actions.append("still queued after the drain's queue run" + (
                f", which did not try it: {MIN_QUEUE_AGE_HINT}"
                if not any(q in output for q in qids) else ""))
        else:
            self.delivered = True
            actions.append("drained: gone from every task")

    async def _left(self) -> list[str]:
        if not self._may_remain():
            return []
        where = f"queue id {self.qid}" if self.qid else f"the message to {self.recipient}"
        return [f"{where} may still be queued (it stays deferred while the sinkhole defers, "
                "and returns to its sender after sendmail's queue lifetime); drain it with "
                "step 6 + 7 of the runbook, or `selfcheckd drill` again"]


def _still_queued(seen: dict[str, Observation], qid: str | None) -> list[str]:
    return [t for t, o in seen.items() if o.source == "mailq" and (qid or "?") in o.qids]


def _unread(seen: dict[str, Observation]) -> list[str]:
    return [t for t, o in seen.items() if o.source == "mailq" and not o.answered]


def _said(text: str) -> list[str]:
    """What a mailq that lists nothing of ours printed (its last lines), for the evidence."""
    lines = [line.rstrip() for line in text.splitlines() if line.strip()]
    return lines[-MAX_SAID_LINES:]


def _unique(lines: list[str]) -> list[str]:
    """Lines in order, each once (a restarted `tail -F` re-sends its last 10 lines)."""
    return list(dict.fromkeys(lines))


def _shorten(line: str) -> str:
    return line if len(line) <= 500 else line[:499] + "…"


def _park_hint(store: str) -> str:
    kind, _, name = store.partition(":")
    if kind == "ssm":
        return f"aws ssm put-parameter --name {name} --value defer --overwrite"
    return f"echo defer > {name}"


def _loop_time_for(deadline: float, clock: Clock) -> float:
    """`deadline` on our (maybe injected) clock as a time on the event loop's clock."""
    return asyncio.get_running_loop().time() + max(0.0, deadline - clock())


def _hard_exit() -> None:
    sys.stderr.flush()
    os._exit(4)

