"""Parse sendmail 8.x and Postfix syslog lines into queue-add and delivery records.

Grammar (see docs/leakwatch.md):
    TS HOST PROGRAM[PID]: QID: from=ADDR, size=..., ...
    TS HOST PROGRAM[PID]: QID: to=ADDR(,ADDR)*[, [more]], delay=..., ..., stat=STAT

One regex finds the syslog header, the queue id and `from=`/`to=`; only those
two kinds of line are looked at further. `parse_line` never raises: anything it
cannot make sense of comes back as OTHER / OTHER_MTA / UNPARSED.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum


class LineKind(StrEnum):
    """What a line is, as counted in maillog_lines_total{kind}."""

    FROM = "from"
    TO = "to"
    OTHER = "other"
    UNPARSED = "unparsed"


@dataclass(slots=True, frozen=True)
class QueueAdd:
    """A `from=` line: a message entered the queue (sendmail) or the active queue (Postfix)."""

    timestamp: str
    queue_id: str
    sender: str  # as logged, without angle brackets; "" is the null sender <>


@dataclass(slots=True, frozen=True)
class Delivery:
    """A `to=` line: one delivery attempt for one or more recipients."""

    timestamp: str
    queue_id: str
    recipients: tuple[str, ...]  # as logged (case kept), without angle brackets
    stat: str  # sendmail stat= / Postfix status=, to end of line
    more: bool  # sendmail split a long recipient list; more lines follow
    # The fields between the recipients and stat=; relay/dsn/delay are read
    # from it on demand, which keeps the scan's hot path short.
    fields: str = ""

    @property
    def relay(self) -> str | None:
        m = _RELAY.search(self.fields)
        return m.group(1) if m else None

    @property
    def dsn(self) -> str | None:
        m = _DSN.search(self.fields)
        return m.group(1) if m else None

    @property
    def delay(self) -> str | None:
        m = _DELAY.search(self.fields)
        return m.group(1) if m else None


@dataclass(slots=True, frozen=True)
class OtherLine:
    """Any other line. `mta` is true for sendmail/Postfix lines (used by the blindness check)."""

    kind: LineKind
    mta: bool


OTHER = OtherLine(LineKind.OTHER, mta=False)
OTHER_MTA = OtherLine(LineKind.OTHER, mta=True)
UNPARSED = OtherLine(LineKind.UNPARSED, mta=False)
UNPARSED_MTA = OtherLine(LineKind.UNPARSED, mta=True)

ParsedLine = QueueAdd | Delivery | OtherLine

_HEADER = re.compile(
    r"(?P<ts>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:?\d\d)?"
    r"|[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d)"
    r" +\S+ +(?P<prog>[^\s\[:]+)(?:\[\d+\])?: "
    r"(?:(?P<qid>[0-9A-Za-z]{5,24}): (?P<kind>from|to)=)?"
)
# Program names that are the MTA: sendmail (Debian calls the daemon sm-mta) and
# every Postfix daemon, including multi-instance names like postfix-out/smtp.
_SENDMAIL_PROGRAMS = frozenset({"sendmail", "sm-mta", "sm-msp-queue"})
_RELAY = re.compile(r"(?:^|, )relay=([^,]*)")
_DSN = re.compile(r"(?:^|, )dsn=([^,]*)")
_DELAY = re.compile(r"(?:^|, )delay=([^,]*)")
_MORE = "[more]"


def is_mta_program(prog: str) -> bool:
    return prog in _SENDMAIL_PROGRAMS or prog.startswith("postfix")


def parse_line(line: str) -> ParsedLine:
    """Classify one log line (without its newline); never raises."""
    m = _HEADER.match(line)
    if m is None:
        return UNPARSED
    ts, prog, qid, kind = m.groups()
    if kind is None:
        return OTHER_MTA if prog in _SENDMAIL_PROGRAMS or prog.startswith("postfix") else OTHER
    if not (prog in _SENDMAIL_PROGRAMS or prog.startswith("postfix")):
        return OTHER
    pos = m.end()
    if kind == "from":
        sender = _take_sender(line, pos)
        return UNPARSED_MTA if sender is None else QueueAdd(ts, qid, sender)
    return _parse_delivery(line, pos, ts, qid)


def _take_sender(line: str, pos: int) -> str | None:
    """The from= value: `<addr>` (quotes may hide `>`), or a bare address up to a comma."""
    if line.startswith("<", pos):
        end = line.find(">", pos)
        if end < 0:
            return None
        if '"' in line[pos:end]:
            end = _angle_end(line, pos)
            if end < 0:
                return None
        return line[pos + 1 : end]
    end = line.find(",", pos)
    value = line[pos:] if end < 0 else line[pos:end]
    return value.strip() or None


def _angle_end(line: str, pos: int) -> int:
    """Index of the `>` closing the `<` at pos, skipping quoted strings; -1 if none."""
    quoted = False
    i = pos + 1
    n = len(line)
    while i < n:
        c = line[i]
        if quoted:
            if c == "\\":
                i += 1
            elif c == '"':
                quoted = False
        elif c == '"':
            quoted = True
        elif c == ">":
            return i
        i += 1
    return -1


def _split_recipients(line: str, pos: int) -> tuple[list[str], int]:
    """Split the to= list starting at pos; return the raw items and where the fields begin.

    Items are separated by `,`; the list ends at the first `, ` (comma then
    space) outside quotes and angle brackets.
    """
    end = line.find(", ", pos)
    segment = line[pos:] if end < 0 else line[pos:end]
    if '"' not in segment:
        # Fast path: without quotes a comma separates items unless it sits in
        # angle brackets (a source route `<@a,@b:u@d>`), seen as an unbalanced item.
        items = segment.split(",")
        if all(item.startswith("<") == item.endswith(">") for item in items):
            return items, (len(line) if end < 0 else end + 2)
    items = []
    quoted = angle = False
    start = i = pos
    n = len(line)
    while i < n:
        c = line[i]
        if quoted:
            if c == "\\":
                i += 1
            elif c == '"':
                quoted = False
        elif c == '"':
            quoted = True
        elif c == "<":
            angle = True
        elif c == ">":
            angle = False
        elif c == "," and not angle:
            items.append(line[start:i])
            if i + 1 < n and line[i + 1] == " ":
                return items, i + 2
            start = i + 1
        i += 1
    items.append(line[start:])
    return items, n


def _parse_delivery(line: str, pos: int, ts: str, qid: str) -> ParsedLine:
    items, fields_at = _split_recipients(line, pos)
    more = False
    if line.startswith(_MORE, fields_at):
        more = True
        fields_at += len(_MORE)
        if line.startswith(", ", fields_at):
            fields_at += 2
    recipients: list[str] = []
    for item in items:
        if item == _MORE:
            more = True
            continue
        addr = item.strip()
        if addr.startswith("<") and addr.endswith(">"):
            addr = addr[1:-1]
        if addr:
            recipients.append(addr)
    if not recipients:
        return UNPARSED_MTA
    # stat= (sendmail) / status= (Postfix) come last and run to end of line.
    stat_at = _find_field(line, "stat=", fields_at)
    if stat_at < 0:
        stat_at = _find_field(line, "status=", fields_at)
        stat = "" if stat_at < 0 else line[stat_at + 7 :]
    else:
        stat = line[stat_at + 5 :]
    return Delivery(
        timestamp=ts,
        queue_id=qid,
        recipients=tuple(recipients),
        stat=stat,
        more=more,
        fields=line[fields_at:] if stat_at < 0 else line[fields_at:stat_at],
    )


def _find_field(line: str, key: str, start: int) -> int:
    """Index of `key` at start or after the first `, ` at/after start; -1 if absent."""
    if line.startswith(key, start):
        return start
    i = line.find(", " + key, start)
    return -1 if i < 0 else i + 2


_TIMESTAMP = re.compile(
    r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:?\d\d)?"
    r"|[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d"
)


def line_timestamp(line: str) -> str | None:
    """The header timestamp of a syslog line, if it has one."""
    m = _TIMESTAMP.match(line)
    return m.group(0) if m else None


def timestamp_to_epoch(ts: str, now: float | None = None) -> float | None:
    """Unix time of a header timestamp: RFC 3339, or BSD syslog (local time, year guessed)."""
    try:
        if ts[:4].isdigit():
            value = ts[:-1] + "+00:00" if ts.endswith("Z") else ts
            return datetime.fromisoformat(value).timestamp()
        current = time.time() if now is None else now
        year = time.localtime(current).tm_year
        # The latest year that does not put the line more than a day ahead: a December
        # line read in January is last year's, Feb 29 the last leap year's.
        for candidate in range(year, year - 8, -1):
            try:
                epoch = time.mktime(time.strptime(f"{candidate} {ts}", "%Y %b %d %H:%M:%S"))
            except ValueError:
                continue  # Feb 29 outside a leap year
            if epoch <= current + 86400:
                return epoch
        return None
    except (ValueError, OverflowError):
        return None


def timestamp_near(ts: str, anchor: float) -> float | None:
    """Unix time of a header timestamp; a BSD one (no year) in the year that puts it
    nearest `anchor` (the previous line's time: consecutive lines are close)."""
    if ts[:4].isdigit():
        return timestamp_to_epoch(ts)
    year = time.localtime(anchor).tm_year
    best: float | None = None
    for candidate in (year, year - 1, year + 1):
        try:
            epoch = time.mktime(time.strptime(f"{candidate} {ts}", "%Y %b %d %H:%M:%S"))
        except (ValueError, OverflowError):
            continue  # Feb 29 outside a leap year
        if abs(epoch - anchor) < _HALF_YEAR:
            return epoch  # the usual case: the anchor's own year, one strptime
        if best is None or abs(epoch - anchor) < abs(best - anchor):
            best = epoch
    return best


_HALF_YEAR = 183 * 86400


# -- header fields for queue health (not on parse_line's path) -------------------------------
_QUEUE_HEADER = re.compile(
    r"(?P<ts>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:?\d\d)?"
    r"|[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d)"
    r" +(?P<host>\S+) +[^\s\[:]+(?:\[\d+\])?: (?P<qid>[0-9A-Za-z]{5,24}): "
)


def header_host(line: str, timestamp: str) -> str | None:
    """The syslog HOST field of a line whose header timestamp `timestamp` starts it.

    For the `timestamp` of a record `parse_line` returned: no second match, just the
    word after it.
    """
    if not line.startswith(timestamp):
        return None
    rest = line[len(timestamp):].lstrip(" ")
    end = rest.find(" ")
    return rest[:end] if end > 0 else None


def line_queue_header(line: str) -> tuple[str, str, str] | None:
    """(timestamp, host, queue id) of a `TS HOST PROG[PID]: QID: ...` line of any program."""
    m = _QUEUE_HEADER.match(line)
    return None if m is None else (m.group("ts"), m.group("host"), m.group("qid"))
