"""Dated log fixtures moved to "now": a captured log replays as if written minutes ago.

A capture's timestamps are frozen on the day it was taken; fed to a watcher that ages its
queue on the real clock, it grows a day older every day until its messages fall out of the
retention (the suite went red six days after the capture). `TimeShift.to_now(text)` moves
every line's RFC 3339 timestamp by one whole number of seconds, so the newest line lands
`ago` seconds before the wall clock read at that moment, with the spacing between lines, each
stamp's precision and its UTC offset kept. Only the syslog header at the start of a line
moves: a date inside a message (a Message-ID, a queue id) is the message's own text. BSD
timestamps (`Nov 23 19:30:26`, no year) are left as written: the daemon places those by the
clock itself, and a test that needs them at a date gives it an injected clock.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

_HEADER = re.compile(
    r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)", re.M)


def _whole_seconds(m: re.Match[str]) -> datetime:
    """The stamp without its fraction (a shift by whole seconds leaves that as written)."""
    zone = "+00:00" if m.group(3) == "Z" else m.group(3)
    return datetime.fromisoformat(m.group(1) + zone)


def _exact(m: re.Match[str]) -> float:
    return _whole_seconds(m).timestamp() + float(m.group(2) or 0)


@dataclass(frozen=True)
class TimeShift:
    """Moves RFC 3339 line timestamps by `seconds` (a whole number: fractions stay as written)."""

    seconds: int

    @classmethod
    def to_now(cls, text: str, *, ago: float = 60.0, now: float | None = None) -> TimeShift:
        """The shift that puts the newest line timestamp of `text` `ago` seconds before `now`
        (the wall clock, read now, never cached at import)."""
        stamps = [_exact(m) for m in _HEADER.finditer(text)]
        if not stamps:
            raise ValueError("no RFC 3339 line timestamp to shift")
        target = (time.time() if now is None else now) - ago
        return cls(round(target - max(stamps)))

    def apply(self, text: str) -> str:
        """`text` with every line's leading timestamp moved, written as it was written."""
        return _HEADER.sub(self._moved, text)

    def stamp(self, stamp: str) -> str:
        """One RFC 3339 timestamp moved, with its precision and its offset (or `Z`) kept."""
        m = _HEADER.fullmatch(stamp)
        if m is None:
            raise ValueError(f"not an RFC 3339 timestamp: {stamp!r}")
        return self._moved(m)

    def epoch(self, stamp: str) -> float:
        """Unix time of an original timestamp after the shift."""
        m = _HEADER.fullmatch(stamp)
        if m is None:
            raise ValueError(f"not an RFC 3339 timestamp: {stamp!r}")
        return _exact(m) + self.seconds

    def _moved(self, m: re.Match[str]) -> str:
        moved = _whole_seconds(m) + timedelta(seconds=self.seconds)
        return f"{moved:%Y-%m-%dT%H:%M:%S}{m.group(2) or ''}{m.group(3)}"
