"""Queue health from the mail log: deliveries by result, and what each queue id is waiting for.

`QueueTracker` is fed the records `parse_line` already made (LineProcessor passes
them on, with the raw line for the HOST field and, from CloudWatch, the log
stream): no line is parsed twice.

* Every recipient of a delivery line counts once in `counts[result]`; sendmail
  logs a deferred recipient again on every queue run, and each of those lines
  is counted (that is what happened). An exact repeat of one of the last
  `DUPLICATE_WINDOW` delivery lines (a restarted `tail -F` re-sends its last 10
  lines) is not: it is the same line, not another attempt.
* Per queue id it remembers the sender (`from=`), each recipient's latest
  result (by line timestamp, so a late-ingested older line does not overwrite a
  newer one), stat and attempts, the hosts and log streams that logged it, and
  the first and last line's timestamps. A message is *deferred* while at least
  one recipient's latest result is `deferred`.
* Bounded: at most `max_messages` queue ids (the least recently active finished
  message goes first, a deferred one only when nothing else is left), at most
  `MAX_RECIPIENTS` recipients and `MAX_ORIGINS` hosts/streams each; a message
  with no line for `retention` seconds is forgotten (`expire`). sendmail returns
  a message after 5 days in the queue, so the default of 6 days outlives it.
* A message returned to its sender after its queue lifetime is logged once for the
  whole message, with no `to=` line: sendmail's `QID: NEWQID: DSN: Cannot send
  message for 5 days`, Postfix's `QID: from=<...>, status=expired, returned to
  sender`. Each recipient still deferred (or queued) then counts once as `bounced`
  and the message is no longer deferred.
* A `to=` line without `stat=`/`status=` (cut short in transit) is not a delivery:
  it is counted in `truncated`, not by result.
* Each line's *task* is the CloudWatch log stream it came in (one per ECS task) or,
  from a file or standard input, its syslog HOST field (one per container). Per
  message the tracker keeps every task that logged it, in order, and the last one;
  a deferred message's next attempt (`to=` or return line) logged by another task
  than its previous line is a *hand-off* (`handoffs`).
* A deferred message with no line (from=, to= or return) for longer than
  `silent_after` is *silent*: no queue runner retries it. Judged from the lines'
  own timestamps against the clock, but never past what the source has read: the
  newest line read while a backlog is still being read (`reading_backlog`), and the
  time of the last read that reached the end of the log (`read_up_to`) otherwise.
  So a watcher that restarts and reads its backlog decides as one that never
  stopped, and one whose source fails (CloudWatch unreachable, the file gone) does
  not take the lines it cannot read for silence.
* Per task, the time of its latest MTA line (at most `MAX_TASKS` tasks, the one
  heard longest ago forgotten first); and the queue's own errors by kind
  (queue_errors.py), with the latest few lines of each kind.
* A BSD syslog timestamp has no year. The first line's is placed by the clock (the
  latest year that does not put it more than a day ahead); each later one in the
  year nearest the previous line's, so a capture stays in one year whenever it is
  read, and crosses New Year as the log did.
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from itertools import chain
from typing import Any

from daemon.logwatch.parser import (
    Delivery,
    QueueAdd,
    header_host,
    line_queue_header,
    timestamp_near,
    timestamp_to_epoch,
)
from daemon.logwatch.queue_errors import ErrorKind
from daemon.logwatch.queue_errors import classify as classify_error


class Result(StrEnum):
    """The result of one delivery line, as counted in mta_deliveries_total{result}."""

    SENT = "sent"
    DEFERRED = "deferred"
    QUEUED = "queued"
    BOUNCED = "bounced"
    OTHER = "other"


DEFAULT_RETENTION = 6 * 86400.0
DEFAULT_MAX_MESSAGES = 20_000
# Three of sendmail's 15-minute queue runs without a line: nobody retries it.
DEFAULT_SILENT_AFTER = 2700.0
# Per message: recipients remembered (the rest are counted, not remembered) and
# hosts / log streams / tasks listed (tasks: the first and the most recent ones).
MAX_RECIPIENTS = 1000
MAX_ORIGINS = 16
# Tasks whose latest line is remembered (an autoscaled service replaced daily for a
# week has far fewer); the one heard longest ago goes first.
MAX_TASKS = 64
# Error lines kept per kind for /status, each cut at MAX_EXAMPLE characters.
RECENT_ERRORS = 5
MAX_EXAMPLE = 500
# A stat (reply text) is kept up to this many characters.
MAX_STAT = 256
# Exact repeats among this many recent delivery lines are the same line again.
DUPLICATE_WINDOW = 1000

_WORD = re.compile(r"[A-Za-z]+")
# Message-level return lines (see the module docstring).
SENDMAIL_RETURN = ": DSN: Cannot send message for "
# Postfix qmgr: "QID: from=<sender>, status=expired, returned to sender" (the end of the
# line, so a quoted sender holding these words on an ordinary from= line does not match).
_POSTFIX_EXPIRED = ", status=expired, returned to sender"


def classify(stat: str, dsn: str | None) -> Result:
    """sendmail `stat=` / Postfix `status=` (and `dsn=`) -> the delivery's result.

    `Sent...`/`sent` is sent, `Deferred...`/`deferred` deferred (whatever the dsn),
    `queued` queued, Postfix `bounced`/`expired` bounced, any other stat with a
    5.x.x dsn (sendmail's `User unknown`, ...) bounced, the rest other.
    """
    m = _WORD.match(stat)
    word = m.group(0).lower() if m else ""
    if word == "sent":
        return Result.SENT
    if word == "deferred":
        return Result.DEFERRED
    if word == "queued":
        return Result.QUEUED
    if word in ("bounced", "expired") or (dsn is not None and dsn.startswith("5.")):
        return Result.BOUNCED
    return Result.OTHER


def parse_delay(text: str | None) -> float | None:
    """`delay=` in seconds: sendmail's `[D+]HH:MM:SS` or Postfix's decimal seconds."""
    if not text:
        return None
    value = text.strip()
    try:
        days = 0
        if "+" in value:
            head, _, value = value.partition("+")
            days = int(head)
        if ":" in value:
            parts = [float(p) for p in value.split(":")]
            if len(parts) != 3:
                return None
            seconds = parts[0] * 3600 + parts[1] * 60 + parts[2]
        else:
            seconds = float(value)
    except ValueError:
        return None
    total = days * 86400 + seconds
    return total if 0 <= total < float("inf") else None


def iso(epoch: float) -> str:
    """A Unix time as RFC 3339 UTC, the way rsyslog writes it."""
    return datetime.fromtimestamp(epoch, UTC).isoformat()


@dataclass(slots=True)
class Recipient:
    result: Result
    stat: str
    attempts: int  # delivery lines for it, `queued` (not an attempt) aside
    seen: float  # timestamp of the line that set `result`


@dataclass(slots=True)
class Message:
    """What the log told about one queue id."""

    queue_id: str
    first_seen: float
    last_seen: float
    sender: str | None = None  # None: no from= line seen; "" is the null sender <>
    recipients: dict[str, Recipient] = field(default_factory=dict)
    hosts: list[str] = field(default_factory=list)
    log_streams: list[str] = field(default_factory=list)
    # Tasks (log stream, else host) in the order they first logged it; the task of its
    # newest line.
    tasks: list[str] = field(default_factory=list)
    last_task: str | None = None
    deferred: int = 0  # recipients whose latest result is deferred

    @property
    def attempts(self) -> int:
        """Delivery attempts of the message: its most tried recipient's."""
        return max((r.attempts for r in self.recipients.values()), default=0)

    def as_dict(self) -> dict[str, Any]:
        """The message as `scan --queue --json` prints it."""
        return {
            "queue_id": self.queue_id,
            "sender": self.sender,
            "recipients": [
                {"address": address, "result": r.result.value, "stat": r.stat,
                 "attempts": r.attempts, "last_seen": iso(r.seen)}
                for address, r in self.recipients.items()],
            "attempts": self.attempts,
            "first_seen": iso(self.first_seen),
            "last_seen": iso(self.last_seen),
            "hosts": list(self.hosts),
            "log_streams": list(self.log_streams),
            "tasks": list(self.tasks),
            "first_task": self.tasks[0] if self.tasks else None,
            "last_task": self.last_task,
        }

    def state(self) -> dict[str, Any]:
        """The message as the state file keeps it."""
        return {
            "queue_id": self.queue_id,
            "sender": self.sender,
            "first_seen": self.first_seen,
            "last_seen": self.last_seen,
            "hosts": list(self.hosts),
            "log_streams": list(self.log_streams),
            "tasks": list(self.tasks),
            "last_task": self.last_task,
            "recipients": [
                {"address": address, "result": r.result.value, "stat": r.stat,
                 "attempts": r.attempts, "seen": r.seen}
                for address, r in self.recipients.items()],
        }

    @classmethod
    def from_state(cls, data: dict[str, Any]) -> Message:
        """The message `state()` saved (already validated by daemon.state)."""
        hosts = list(data.get("hosts", []))[:MAX_ORIGINS]
        streams = list(data.get("log_streams", []))[:MAX_ORIGINS]
        # Saved before tasks were: a message's tasks are its streams, else its hosts.
        tasks = list(data.get("tasks") or streams or hosts)[-MAX_ORIGINS:]
        msg = cls(queue_id=data["queue_id"], first_seen=float(data["first_seen"]),
                  last_seen=float(data["last_seen"]), sender=data.get("sender"),
                  hosts=hosts, log_streams=streams, tasks=tasks,
                  last_task=data.get("last_task") or (tasks[-1] if tasks else None))
        for r in data.get("recipients", [])[:MAX_RECIPIENTS]:
            result = Result(r["result"])
            msg.recipients[r["address"]] = Recipient(result, r["stat"][:MAX_STAT],
                                                     int(r["attempts"]), float(r["seen"]))
            if result is Result.DEFERRED:
                msg.deferred += 1
        return msg


@dataclass(slots=True, frozen=True)
class ErrorExample:
    """One queue error line, as /status shows the latest of each kind."""

    kind: ErrorKind
    timestamp: str
    task: str | None
    queue_id: str | None
    line: str

    def as_dict(self) -> dict[str, Any]:
        return {"timestamp": self.timestamp, "task": self.task, "queue_id": self.queue_id,
                "line": self.line}


class QueueTracker:
    """Per-queue-id state and delivery counts, fed parsed records line by line."""

    def __init__(
        self,
        retention: float = DEFAULT_RETENTION,
        max_messages: int = DEFAULT_MAX_MESSAGES,
        clock: Callable[[], float] | None = None,
        keep_delays: bool = True,
        wall: Callable[[], float] = time.time,
        silent_after: float = DEFAULT_SILENT_AFTER,
    ) -> None:
        """`clock` is wall time (the daemon); None: the newest line's timestamp (a scan).
        `wall` places BSD timestamps, which have no year (see the module docstring)."""
        self.retention = retention
        self.silent_after = silent_after
        self._wall = wall
        self.max_messages = max_messages
        self._clock = clock
        self._keep_delays = keep_delays
        # Two tables in least-recently-active order; a message is in exactly one.
        self._deferred: OrderedDict[str, Message] = OrderedDict()
        self._others: OrderedDict[str, Message] = OrderedDict()
        self.counts: dict[Result, int] = dict.fromkeys(Result, 0)
        self.delays: list[float] = []  # delays of sent recipients, until take_delays()
        self.newest: float | None = None  # the newest line timestamp seen
        self.evicted = 0  # messages dropped for the count bound
        self.duplicates = 0  # delivery lines dropped as exact repeats
        self.truncated = 0  # to= lines without a stat=/status=: no result to count
        # The previous line's time, which places the next BSD timestamp (no year). Not
        # restored from the state file: after a long stop the clock places the first line.
        self._anchor: float | None = None
        self._recent: OrderedDict[str, None] = OrderedDict()
        self.handoffs = 0  # deferred messages' attempts by another task than the line before
        self.errors: dict[ErrorKind, int] = dict.fromkeys(ErrorKind, 0)
        self.recent_errors: dict[ErrorKind, deque[ErrorExample]] = {
            kind: deque(maxlen=RECENT_ERRORS) for kind in ErrorKind}
        # Task -> its latest MTA line's time; and the second (timestamp text) of the latest
        # other MTA line of each, so those lines parse a timestamp once a second per task.
        self._tasks: dict[str, float] = {}
        self._task_seconds: dict[str, str] = {}
        # True while the source is still reading a backlog (it stopped short of the end):
        # silence is judged against the newest line read, not yet against the clock.
        self.reading_backlog = False
        # When the source last read to the end of the log (the daemon sets it; None: not
        # known, e.g. a scan, which judges at its own clock): silence is judged up to it.
        self.read_up_to: float | None = None

    # -- feeding -----------------------------------------------------------------------------
    def see_queue_add(self, record: QueueAdd, line: str, stream: str | None = None) -> None:
        when = self._epoch(record.timestamp)
        msg = self._message(record.queue_id, when)
        msg.sender = record.sender
        expired = line.endswith(_POSTFIX_EXPIRED)
        self._touch(msg, when, line, record.timestamp, stream, attempt=expired)
        if expired:
            self._returned(msg, when, "expired, returned to sender")

    def see_return(self, line: str, stream: str | None = None) -> None:
        """sendmail's `QID: NEWQID: DSN: Cannot send message for ...` (a `SENDMAIL_RETURN`
        line): the message went back to its sender."""
        header = line_queue_header(line)
        if header is None:
            return
        timestamp, _, queue_id = header
        msg = self.get(queue_id)
        if msg is None:
            return  # its deferrals were never read: nothing is waiting
        when = self._epoch(timestamp)
        self._message(queue_id, when)  # most recently active
        self._touch(msg, when, line, timestamp, stream, attempt=True)
        reason = line[line.index(SENDMAIL_RETURN) + len(": DSN: "):]
        self._returned(msg, when, reason[:MAX_STAT])

    def _returned(self, msg: Message, when: float, stat: str) -> None:
        was_deferred = msg.deferred > 0
        for rcpt in msg.recipients.values():
            if rcpt.result in (Result.DEFERRED, Result.QUEUED) and when >= rcpt.seen:
                msg.deferred -= rcpt.result is Result.DEFERRED
                rcpt.result, rcpt.stat, rcpt.seen = Result.BOUNCED, stat, when
                self.counts[Result.BOUNCED] += 1
        self._refile(msg, was_deferred)

    def _refile(self, msg: Message, was_deferred: bool) -> None:
        if (msg.deferred > 0) != was_deferred:
            source, target = ((self._others, self._deferred) if msg.deferred
                              else (self._deferred, self._others))
            del source[msg.queue_id]
            target[msg.queue_id] = msg

    def see_delivery(self, record: Delivery, line: str, stream: str | None = None) -> None:
        if not record.stat:
            self.truncated += 1
            return
        recent = self._recent
        if line in recent:
            self.duplicates += 1
            return
        recent[line] = None
        if len(recent) > DUPLICATE_WINDOW:
            recent.popitem(last=False)
        result = classify(record.stat, record.dsn)
        recipients = record.recipients
        self.counts[result] += len(recipients)
        if result is Result.SENT and self._keep_delays:
            delay = parse_delay(record.delay)
            if delay is not None:
                self.delays.extend([delay] * len(recipients))
        when = self._epoch(record.timestamp)
        msg = self._message(record.queue_id, when)
        self._touch(msg, when, line, record.timestamp, stream,
                    attempt=result is not Result.QUEUED)
        was_deferred = msg.deferred > 0
        stat = record.stat[:MAX_STAT]
        attempt = 0 if result is Result.QUEUED else 1
        deferred = result is Result.DEFERRED
        for address in recipients:
            rcpt = msg.recipients.get(address)
            if rcpt is None:
                if len(msg.recipients) < MAX_RECIPIENTS:
                    msg.recipients[address] = Recipient(result, stat, attempt, when)
                    msg.deferred += deferred
                continue
            rcpt.attempts += attempt
            if when >= rcpt.seen:  # a late-ingested older line does not undo a newer one
                msg.deferred += deferred - (rcpt.result is Result.DEFERRED)
                rcpt.result, rcpt.stat, rcpt.seen = result, stat, when
        self._refile(msg, was_deferred)

    def _epoch(self, timestamp: str) -> float:
        if self._anchor is None:
            epoch = timestamp_to_epoch(timestamp, self._wall())
        else:
            epoch = timestamp_near(timestamp, self._anchor)
        if epoch is None:
            return self.now()
        self._anchor = epoch
        return epoch

    def _message(self, queue_id: str, when: float) -> Message:
        msg = self._others.get(queue_id)
        if msg is not None:
            self._others.move_to_end(queue_id)
            return msg
        msg = self._deferred.get(queue_id)
        if msg is not None:
            self._deferred.move_to_end(queue_id)
            return msg
        if len(self._deferred) + len(self._others) >= self.max_messages:
            victims = self._others or self._deferred
            victims.popitem(last=False)
            self.evicted += 1
        msg = Message(queue_id, when, when)
        self._others[queue_id] = msg
        return msg

    def _touch(self, msg: Message, when: float, line: str, timestamp: str,
               stream: str | None, attempt: bool = False) -> None:
        """One more line of `msg` at `when`; `attempt`: a delivery attempt or a return (a
        queue runner at work), which is a hand-off if the message was deferred and the
        line before it came from another task."""
        host = header_host(line, timestamp)
        task = stream or host
        newest = when >= msg.last_seen
        if task:
            if (attempt and newest and msg.deferred > 0 and msg.last_task is not None
                    and task != msg.last_task):
                self.handoffs += 1
            if newest or msg.last_task is None:
                msg.last_task = task
            tasks = msg.tasks  # in the order they first logged it
            if task not in tasks:
                if len(tasks) >= MAX_ORIGINS:
                    del tasks[1]  # the first task stays; the most recent ones are kept
                tasks.append(task)
            if when > self._tasks.get(task, 0.0):
                self._heard(task, when)
        if when < msg.first_seen:
            msg.first_seen = when
        if when > msg.last_seen:
            msg.last_seen = when
        if self.newest is None or when > self.newest:
            self.newest = when
        if host and host not in msg.hosts and len(msg.hosts) < MAX_ORIGINS:
            msg.hosts.append(host)
        if stream and stream not in msg.log_streams and len(msg.log_streams) < MAX_ORIGINS:
            msg.log_streams.append(stream)

    def _heard(self, task: str, when: float) -> None:
        """`task` logged a line at `when`."""
        tasks = self._tasks
        known = tasks.get(task)
        if known is None:
            tasks[task] = when
            if len(tasks) > MAX_TASKS:  # rare: a new task past the bound
                oldest = min(tasks, key=tasks.__getitem__)
                del tasks[oldest]
                self._task_seconds.pop(oldest, None)
        elif when > known:
            tasks[task] = when

    def see_other(self, line: str, stream: str | None = None) -> None:
        """An MTA line that is neither from= nor to=: the return of a message to its sender,
        a queue error, or just a sign of life of its task."""
        if SENDMAIL_RETURN in line:
            self.see_return(line, stream)
            return
        kind = classify_error(line)
        timestamp, task = _header_fields(line)
        if timestamp is None:
            return
        task = stream or task
        if task is not None:
            second = timestamp[:19]
            # Its time is read once per second of log per task: most lines change nothing.
            if self._task_seconds.get(task) != second:
                self._task_seconds[task] = second
                self._heard(task, self._epoch(timestamp))
        if kind is not None:
            self.errors[kind] += 1
            header = line_queue_header(line)
            self.recent_errors[kind].append(ErrorExample(
                kind, timestamp, task, header[2] if header else None, line[:MAX_EXAMPLE]))

    # -- reading -----------------------------------------------------------------------------
    def now(self) -> float:
        if self._clock is not None:
            return self._clock()
        return self.newest if self.newest is not None else self._wall()

    def get(self, queue_id: str) -> Message | None:
        return self._deferred.get(queue_id) or self._others.get(queue_id)

    def deferred_count(self) -> int:
        """Queue ids with at least one recipient whose latest result is deferred."""
        return len(self._deferred)

    def tracked_count(self) -> int:
        return len(self._deferred) + len(self._others)

    def deferred_messages(self) -> list[Message]:
        """The deferred messages, oldest (first seen) first."""
        return sorted(self._deferred.values(), key=lambda m: (m.first_seen, m.queue_id))

    def oldest_deferred_age(self, now: float | None = None) -> float:
        """Seconds since the first line of the oldest deferred message (0 when none)."""
        if not self._deferred:
            return 0.0
        first = min(m.first_seen for m in self._deferred.values())
        return max(0.0, (self.now() if now is None else now) - first)

    # -- silence and tasks --------------------------------------------------------------------
    def reference(self, now: float | None = None) -> float:
        """The time silence is judged at: the clock (or `now`), but never past what was
        read: while a backlog is still being read, the newest line read so far; else the
        last read that reached the end of the log (`read_up_to`, when known)."""
        now = self.now() if now is None else now
        read = self.read_up_to
        if self.reading_backlog and self.newest is not None:
            read = self.newest if read is None else max(read, self.newest)
        return now if read is None else min(now, read)

    def silent_for(self, msg: Message, now: float | None = None) -> float | None:
        """Seconds since a deferred message's last line if it is silent, else None."""
        if msg.deferred <= 0:
            return None
        quiet = self.reference(now) - msg.last_seen
        return quiet if quiet > self.silent_after else None

    def silent_messages(self, now: float | None = None) -> list[Message]:
        """Deferred messages no line has touched for more than `silent_after`, the longest
        silent first."""
        ref = self.reference(now)
        horizon = ref - self.silent_after
        return sorted((m for m in self._deferred.values() if m.last_seen < horizon),
                      key=lambda m: (m.last_seen, m.queue_id))

    def silent_count(self, now: float | None = None) -> int:
        horizon = self.reference(now) - self.silent_after
        return sum(1 for m in self._deferred.values() if m.last_seen < horizon)

    def oldest_silent_age(self, now: float | None = None) -> float:
        """Seconds since the last line of the longest silent message (0 when none)."""
        ref = self.reference(now)
        horizon = ref - self.silent_after
        oldest = min((m.last_seen for m in self._deferred.values() if m.last_seen < horizon),
                     default=None)
        return 0.0 if oldest is None else ref - oldest

    def tasks_logging(self, now: float | None = None) -> int:
        """Tasks whose latest MTA line is within `silent_after`."""
        horizon = self.reference(now) - self.silent_after
        return sum(1 for when in self._tasks.values() if when >= horizon)

    def task_listing(self, now: float | None = None) -> list[dict[str, Any]]:
        """Every remembered task, the most recently heard first: its latest line, whether it
        is logging, and how many deferred messages it was the last to touch."""
        ref = self.reference(now)
        touched: dict[str, int] = {}
        for msg in self._deferred.values():
            if msg.last_task is not None:
                touched[msg.last_task] = touched.get(msg.last_task, 0) + 1
        return [{"task": task, "last_line": iso(when),
                 "seconds_since_last_line": round(max(0.0, ref - when), 3),
                 "logging": ref - when <= self.silent_after,
                 "deferred_last_touched": touched.get(task, 0)}
                for task, when in sorted(self._tasks.items(),
                                         key=lambda item: (-item[1], item[0]))]

    def recent_error_lines(self) -> dict[str, list[dict[str, Any]]]:
        return {kind.value: [e.as_dict() for e in examples]
                for kind, examples in self.recent_errors.items()}

    def take_delays(self) -> list[float]:
        delays, self.delays = self.delays, []
        return delays

    # -- bounds and persistence --------------------------------------------------------------
    def expire(self, now: float | None = None) -> int:
        """Forget messages whose last line is older than `retention`; how many went."""
        horizon = (self.now() if now is None else now) - self.retention
        gone = 0
        for table in (self._others, self._deferred):
            for queue_id in [q for q, m in table.items() if m.last_seen < horizon]:
                del table[queue_id]
                gone += 1
        for task in [t for t, when in self._tasks.items() if when < horizon]:
            del self._tasks[task]
            self._task_seconds.pop(task, None)
        return gone

    def state(self) -> list[dict[str, Any]]:
        return [m.state() for m in chain(self._others.values(), self._deferred.values())]

    def task_state(self) -> list[dict[str, Any]]:
        """The tasks' latest lines, oldest first, as the state file keeps them."""
        return [{"task": task, "last_line": when}
                for task, when in sorted(self._tasks.items(), key=lambda kv: kv[1])]

    def restore(self, messages: Iterable[Message],
                tasks: Iterable[tuple[str, float]] = ()) -> None:
        """Replace what is tracked with saved messages (the newest kept within the bound)
        and tasks."""
        self._tasks = dict(sorted(tasks, key=lambda item: item[1])[-MAX_TASKS:])
        self._task_seconds.clear()
        self._deferred.clear()
        self._others.clear()
        kept = list(messages)[-self.max_messages:]
        for msg in kept:
            (self._deferred if msg.deferred else self._others)[msg.queue_id] = msg
            if self.newest is None or msg.last_seen > self.newest:
                self.newest = msg.last_seen
        # Read at least up to the newest line saved, until the source reads again: a
        # source that fails from the start does not make the saved messages silent.
        latest = max([*self._tasks.values(), *([self.newest] if self.newest else [])],
                     default=None)
        if latest is not None and (self.read_up_to is None or latest > self.read_up_to):
            self.read_up_to = latest


def _header_fields(line: str) -> tuple[str | None, str | None]:
    """(timestamp, host) of a syslog line `parse_line` already matched, by position."""
    if line[:4].isdigit():  # RFC 3339
        end = line.find(" ")
        if end < 0:
            return None, None
        timestamp = line[:end]
        start = end + 1
    else:  # BSD: "Nov 25 10:00:00"
        timestamp = line[:15]
        start = 16
    while line.startswith(" ", start):
        start += 1
    stop = line.find(" ", start)
    return timestamp, (line[start:stop] if stop > start else None)
