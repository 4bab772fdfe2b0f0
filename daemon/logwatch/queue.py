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
* A BSD syslog timestamp has no year. The first line's is placed by the clock (the
  latest year that does not put it more than a day ahead); each later one in the
  year nearest the previous line's, so a capture stays in one year whenever it is
  read, and crosses New Year as the log did.
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict
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


class Result(StrEnum):
    """The result of one delivery line, as counted in mta_deliveries_total{result}."""

    SENT = "sent"
    DEFERRED = "deferred"
    QUEUED = "queued"
    BOUNCED = "bounced"
    OTHER = "other"


DEFAULT_RETENTION = 6 * 86400.0
DEFAULT_MAX_MESSAGES = 20_000
# Per message: recipients remembered (the rest are counted, not remembered) and
# hosts / log streams listed.
MAX_RECIPIENTS = 1000
MAX_ORIGINS = 16
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
            "recipients": [
                {"address": address, "result": r.result.value, "stat": r.stat,
                 "attempts": r.attempts, "seen": r.seen}
                for address, r in self.recipients.items()],
        }

    @classmethod
    def from_state(cls, data: dict[str, Any]) -> Message:
        """The message `state()` saved (already validated by daemon.state)."""
        msg = cls(queue_id=data["queue_id"], first_seen=float(data["first_seen"]),
                  last_seen=float(data["last_seen"]), sender=data.get("sender"),
                  hosts=list(data.get("hosts", []))[:MAX_ORIGINS],
                  log_streams=list(data.get("log_streams", []))[:MAX_ORIGINS])
        for r in data.get("recipients", [])[:MAX_RECIPIENTS]:
            result = Result(r["result"])
            msg.recipients[r["address"]] = Recipient(result, r["stat"][:MAX_STAT],
                                                     int(r["attempts"]), float(r["seen"]))
            if result is Result.DEFERRED:
                msg.deferred += 1
        return msg


class QueueTracker:
    """Per-queue-id state and delivery counts, fed parsed records line by line."""

    def __init__(
        self,
        retention: float = DEFAULT_RETENTION,
        max_messages: int = DEFAULT_MAX_MESSAGES,
        clock: Callable[[], float] | None = None,
        keep_delays: bool = True,
        wall: Callable[[], float] = time.time,
    ) -> None:
        """`clock` is wall time (the daemon); None: the newest line's timestamp (a scan).
        `wall` places BSD timestamps, which have no year (see the module docstring)."""
        self.retention = retention
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

    # -- feeding -----------------------------------------------------------------------------
    def see_queue_add(self, record: QueueAdd, line: str, stream: str | None = None) -> None:
        when = self._epoch(record.timestamp)
        msg = self._message(record.queue_id, when)
        msg.sender = record.sender
        self._touch(msg, when, line, record.timestamp, stream)
        if line.endswith(_POSTFIX_EXPIRED):
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
        self._touch(msg, when, line, timestamp, stream)
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
        self._touch(msg, when, line, record.timestamp, stream)
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
               stream: str | None) -> None:
        if when < msg.first_seen:
            msg.first_seen = when
        if when > msg.last_seen:
            msg.last_seen = when
        if self.newest is None or when > self.newest:
            self.newest = when
        host = header_host(line, timestamp)
        if host and host not in msg.hosts and len(msg.hosts) < MAX_ORIGINS:
            msg.hosts.append(host)
        if stream and stream not in msg.log_streams and len(msg.log_streams) < MAX_ORIGINS:
            msg.log_streams.append(stream)

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
        return gone

    def state(self) -> list[dict[str, Any]]:
        return [m.state() for m in chain(self._others.values(), self._deferred.values())]

    def restore(self, messages: Iterable[Message]) -> None:
        """Replace what is tracked with saved messages (the newest kept within the bound)."""
        self._deferred.clear()
        self._others.clear()
        kept = list(messages)[-self.max_messages:]
        for msg in kept:
            (self._deferred if msg.deferred else self._others)[msg.queue_id] = msg
            if self.newest is None or msg.last_seen > self.newest:
                self.newest = msg.last_seen
