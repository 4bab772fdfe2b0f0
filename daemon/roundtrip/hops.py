"""The Received headers a probe gathered, read as hops with their times and delays.

Every MTA (and the delivery agent) prepends `Received: from X (...) by Y with W
id Q for <R>; <date>` (RFC 5321 4.4), so read bottom-up the headers are the
path, first hop first. A hop's delay is its timestamp minus the one before
(the first hop's: minus the message's Date). Timestamps have one-second
resolution and come from each server's clock, so a delay is whole seconds and
a negative one means a clock is off; it is shown as it is.

Received headers are free text in practice (comments anywhere, clauses left
out, dates in odd shapes), so every field is optional and nothing here raises:
what cannot be read is None. The hops go to the result JSON and /status, never
to metric labels (host names are unbounded).
"""

from __future__ import annotations

import re
from datetime import UTC
from email.message import Message
from email.utils import parsedate_to_datetime

from daemon.checks.result import Hop

# A message that looped through more hops than this is shown cut (the oldest kept).
MAX_HOPS = 50
_FOLD = re.compile(r"\r?\n(?=[ \t])")
_IP_LITERAL = re.compile(r"\[(?:IPv6:)?([0-9A-Fa-f.:]+)\]")
_CLAUSES = ("from", "by", "via", "with", "id", "for")


def parse_hops(msg: Message) -> list[Hop]:
    """The hops of `msg`, first hop first (its Received headers read bottom-up)."""
    received = [str(v) for v in msg.get_all("Received", [])]
    received.reverse()
    previous = _date(str(msg.get("Date", "")))
    hops = []
    for value in received[:MAX_HOPS]:
        hop = _hop(_FOLD.sub("", value), previous)
        if hop.timestamp is not None:
            previous = hop.timestamp
        hops.append(hop)
    return hops


def _hop(value: str, previous: float | None) -> Hop:
    clauses, sep, date_text = value.rpartition(";")
    if not sep:
        clauses, date_text = value, ""
    stamp = _date(date_text)
    fields, from_comment = _clauses(clauses)
    ip = _IP_LITERAL.search(from_comment or "") or _IP_LITERAL.search(fields.get("from") or "")
    delay = None if stamp is None or previous is None else round(stamp - previous, 3)
    return Hop(
        from_host=_bare(fields.get("from")),
        from_ip=ip.group(1) if ip else None,
        by=_bare(fields.get("by")),
        with_=_bare(fields.get("with")),
        timestamp=stamp,
        delay=delay,
    )


def _clauses(text: str) -> tuple[dict[str, str], str | None]:
    """The first word after each clause keyword, comments skipped; and the `from` comment."""
    words: list[str] = []
    comments: list[tuple[int, str]] = []  # (index of the word it follows, its text)
    depth, current, comment = 0, "", ""
    for char in text:
        if depth:
            if char == "(":
                depth += 1
            elif char == ")":
                depth -= 1
                if depth == 0:
                    comments.append((len(words), comment))
                    comment = ""
                    continue
            comment += char
        elif char == "(":
            if current:
                words.append(current)
                current = ""
            depth = 1
        elif char.isspace():
            if current:
                words.append(current)
                current = ""
        else:
            current += char
    if current:
        words.append(current)
    fields: dict[str, str] = {}
    from_comment = None
    for i, word in enumerate(words[:-1]):
        key = word.lower()
        if key in _CLAUSES and key not in fields:
            fields[key] = words[i + 1]
            if key == "from":
                from_comment = next((c for at, c in comments if at == i + 2), None)
    return fields, from_comment


def _bare(word: str | None) -> str | None:
    if word is None:
        return None
    return word.strip("<>") or None


def _date(text: str) -> float | None:
    text = " ".join(text.split())
    if not text:
        return None
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000": UTC with no claim about the local zone (RFC 5322)
        when = when.replace(tzinfo=UTC)
    try:
        # "31 Dec 9999 23:59:59 -0100" parses but is year 10000 in UTC: not a time we
        # can print, so no time at all.
        when.astimezone(UTC)
    except OverflowError:
        return None
    return when.timestamp()
