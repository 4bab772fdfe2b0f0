"""Read sendmail's `mailq` output: per message the queue id, status and recipients.

    /var/spool/mqueue (1 request)
    -----Q-ID----- --Size-- -----Q-Time----- ------------Sender/Recipient-----------
    6ANJUQna010773      237 Mon Nov 23 19:30 <qp-test@sub.example.com>
                     (Deferred: 421 4.3.2 Service temporarily unavailable)
                                             <nobody-1@sinkhole.test>
                    Total requests: 1

Long addresses are cut to the column (`<nobody-20261207171328-75e96c@sinkhole`).
A queue id may carry a mark (`*` being delivered now, `X` load too high, `-`
too young to run). Debian's `mailq` prints the MSP queue and the MTA queue one
after the other; both are read. An empty queue says `... is empty`.

An exit status proves nothing: Debian's `mailq` is a shell wrapper that exits 0
even when sendmail could not read its configuration or its queue directory
(`sendmail -bp` itself exits 78), and ECS Exec never returns the command's exit
status (aws/amazon-ecs-agent#2846). So `unanswered` recognises an answer by its
shape: every queue section ends in `Total requests: N`, says `... is empty`, or
heads its listing with `QUEUE (N requests)`. Anything else (`cannot open`,
`can not chdir(...)`, `mailq: not found`) is no reading at all, never an empty
queue.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_ENTRY = re.compile(
    r"^(?P<qid>[0-9A-Za-z]{8}\d{3,})(?P<mark>[*X-]?)\s+(?P<size>\d+)\s+(?P<rest>.*)$")
# The last status, after the body type when sendmail knows it (`      7BIT   (Deferred: ...)`).
_STATUS = re.compile(r"^\s+(?:[0-9A-Z]+\s+)?\((?P<status>.*)\)\s*$")
_SMTP_4XX = re.compile(r"\b4\d\d\b")
# What only a queue listing says (see the module docstring); Debian's section headers.
_ANSWER = re.compile(r"^\s*(?:Total requests: \d+|\S.* is empty|\S+ \(\d+ requests?\b.*\))\s*$")
_SECTION = re.compile(r"^\s*(?:MSP|MTA) Queue status\.\.\.\s*$")


@dataclass
class QueueEntry:
    qid: str
    sender: str
    status: str | None = None
    recipients: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)

    @property
    def deferred_4xx(self) -> bool:
        """Its last attempt got a temporary (4xx) answer."""
        return self.status is not None and bool(_SMTP_4XX.search(self.status))

    def has_recipient(self, address: str) -> bool:
        """`address` is listed; mailq cuts long addresses to its column (`<a@sinkhole`), so a
        listed prefix that holds the whole local part and the `@` counts too."""
        want = "<" + address.strip("<>").lower() + ">"
        for listed in self.recipients:
            shown = listed.lower()
            shown = shown if shown.startswith("<") else "<" + shown
            if shown == want or (want.startswith(shown) and "@" in shown):
                return True
        return False


def parse_mailq(text: str) -> list[QueueEntry]:
    """Every message listed in `text` (MSP and MTA queues alike)."""
    entries: list[QueueEntry] = []
    current: QueueEntry | None = None
    for raw in text.splitlines():
        line = raw.rstrip()
        match = _ENTRY.match(line)
        if match is not None:
            rest = match.group("rest").split()
            # Q-Time is 4 words ("Mon Nov 23 19:30"); the sender follows.
            sender = rest[4] if len(rest) > 4 else (rest[-1] if rest else "")
            current = QueueEntry(qid=match.group("qid"), sender=sender, lines=[line])
            entries.append(current)
            continue
        if current is None or not line.strip():
            current = None if not line.strip() else current
            continue
        stripped = line.strip()
        if stripped.startswith(("Total requests", "-----Q-ID")) or (
                "request" in stripped and stripped.startswith("/")):
            current = None
            continue
        status = _STATUS.match(line)
        if status is not None:
            # The message's status, or (mailq -v) a recipient's own after its address.
            if current.status is None:
                current.status = status.group("status")
        else:
            current.recipients.append(stripped)
        current.lines.append(line)
    return entries


def unanswered(text: str) -> str | None:
    """None when `text` is mailq's answer (each queue section it prints lists its queue or
    says it is empty); else what it said instead (its first line), for the evidence."""
    sections: list[tuple[str, list[str]]] = [("", [])]
    for raw in text.splitlines():
        line = raw.rstrip()
        if _SECTION.match(line):
            sections.append((line.strip(), []))
        elif line.strip():
            sections[-1][1].append(line)
    if len(sections) > 1 and not sections[0][1]:
        sections = sections[1:]  # Debian's wrapper: only its sections count
    for header, lines in sections:
        if not any(_ANSWER.match(line) for line in lines):
            said = lines[0].strip() if lines else "no output"
            return f"{header} {said}".strip()[:300]
    return None


def entries_for(text: str, recipient: str) -> list[QueueEntry]:
    """The listed messages addressed to `recipient` (case-insensitive)."""
    return [e for e in parse_mailq(text) if e.has_recipient(recipient)]
