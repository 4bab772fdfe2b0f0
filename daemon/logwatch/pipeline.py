"""Line -> parse -> detect, with plain-integer counters (flushed to Prometheus per batch).

Shared by the one-shot `scan` (synchronous, hot loop) and the running watcher.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from daemon.logwatch.detector import Finding, LeakDetector
from daemon.logwatch.parser import Delivery, LineKind, QueueAdd, parse_line
from daemon.logwatch.queue import QueueTracker


@dataclass(slots=True)
class LineCounts:
    from_: int = 0
    to: int = 0
    other: int = 0
    unparsed: int = 0
    mta: int = 0  # lines of sendmail/Postfix programs, whatever their kind

    def as_dict(self) -> dict[str, int]:
        return {"from": self.from_, "to": self.to, "other": self.other, "unparsed": self.unparsed}


@dataclass(slots=True)
class LineProcessor:
    """Parses lines and feeds the detector; returns findings (leaks and test traffic).

    With a `queue` tracker, the same records also feed queue health (`stream`: the
    CloudWatch log stream a line came from).
    """

    detector: LeakDetector
    clock: Callable[[], float] = time.monotonic
    counts: LineCounts = field(default_factory=LineCounts)
    # Header timestamp of the newest delivery line, and when (monotonic) any was seen.
    last_delivery_timestamp: str | None = None
    last_delivery_seen: float | None = None
    last_mta_seen: float | None = None
    last_line_seen: float | None = None
    queue: QueueTracker | None = None

    def feed(self, line: str, stream: str | None = None) -> list[Finding]:
        record = parse_line(line)
        counts = self.counts
        if isinstance(record, Delivery):
            counts.to += 1
            counts.mta += 1
            self.last_delivery_timestamp = record.timestamp
            if self.queue is not None:
                self.queue.see_delivery(record, line, stream)
            return self.detector.see_delivery(record)
        if isinstance(record, QueueAdd):
            counts.from_ += 1
            counts.mta += 1
            self.detector.see_queue_add(record)
            if self.queue is not None:
                self.queue.see_queue_add(record, line, stream)
            return []
        if record.kind is LineKind.OTHER:
            counts.other += 1
        else:
            counts.unparsed += 1
        if record.mta:
            counts.mta += 1
            if self.queue is not None:
                self.queue.see_other(line, stream)
        return []

    def feed_batch(self, lines: list[str], streams: list[str] | None = None) -> list[Finding]:
        """Feed many lines; also note (monotonic) when MTA and delivery lines last arrived.

        `streams`, when given, names each line's log stream (same length as `lines`).
        """
        before_to, before_mta = self.counts.to, self.counts.mta
        findings: list[Finding] = []
        if streams is None:
            for line in lines:
                found = self.feed(line)
                if found:
                    findings.extend(found)
        else:
            for line, stream in zip(lines, streams, strict=True):
                found = self.feed(line, stream)
                if found:
                    findings.extend(found)
        now = self.clock()
        if lines:
            self.last_line_seen = now
        if self.counts.to != before_to:
            self.last_delivery_seen = now
        if self.counts.mta != before_mta:
            self.last_mta_seen = now
        return findings
