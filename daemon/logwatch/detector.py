"""Decide leaks: sinkhole-domain recipients of senders outside the allowlist.

The sender is only on the queue-add (`from=`) line and the recipients only on
delivery (`to=`) lines, so senders are remembered by queue id. Both that map
and the set of already-reported (queue id, recipient) pairs are bounded LRUs:
a retry of a message days later is still recognised as long as fewer than
`max_tracked` newer messages came in between.
"""

from __future__ import annotations

import fnmatch
import re
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from daemon.logwatch.parser import Delivery, QueueAdd


@dataclass(slots=True, frozen=True)
class Finding:
    """A sinkhole-domain recipient on a delivery line, reported once per (queue id, recipient)."""

    queue_id: str
    recipient: str
    sender: str | None  # None: no from= line seen for this queue id
    stat: str
    timestamp: str
    expected: bool  # sender is on the allowlist (test traffic), so not a leak

    @property
    def key(self) -> str:
        """The detector's (queue id, recipient) key: what `reported` remembers."""
        return reported_key(self.queue_id, self.recipient)

    def as_dict(self) -> dict[str, Any]:
        return {
            "queue_id": self.queue_id,
            "recipient": self.recipient,
            "sender": self.sender,
            "stat": self.stat,
            "timestamp": self.timestamp,
        }


def reported_key(queue_id: str, recipient: str) -> str:
    return f"{queue_id} {recipient.lower()}"


class _BoundedMap(OrderedDict[str, str]):
    """An insertion/refresh-ordered dict that forgets its oldest keys past `limit`."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def put(self, key: str, value: str) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.limit:
            self.popitem(last=False)


# The running watcher forgets a sender after `max_tracked_queue_ids` other queue ids: it
# runs for months. A scan reads one input to its end, so it remembers this many: a leak's
# sender is found however far back its from= line is in any log a scan meets in practice
# (about 150 bytes each: at most ~300 MB, for an input of over 2,000,000 messages).
SCAN_SENDERS = 2_000_000


def scan_senders(max_tracked: int) -> int:
    """How many senders a scan remembers (see SCAN_SENDERS)."""
    return max(max_tracked, SCAN_SENDERS)


def normalize_domain(domain: str) -> str:
    return domain.strip().rstrip(".").lower()


class LeakDetector:
    """Feed it parsed lines; it returns findings for new sinkhole recipients."""

    def __init__(
        self,
        domains: Iterable[str],
        allowed_senders: Iterable[str],
        max_tracked: int = 100_000,
        max_senders: int | None = None,
    ) -> None:
        """`max_tracked` bounds the reported pairs, and the senders unless `max_senders`
        gives them their own bound (a one-shot scan remembers many more)."""
        self._domains = tuple(normalize_domain(d) for d in domains)
        self._suffixes = tuple("." + d for d in self._domains)
        patterns = [fnmatch.translate(p.lower()) for p in allowed_senders]
        self._allow = re.compile("|".join(patterns)) if patterns else None
        self.senders = _BoundedMap(max_tracked if max_senders is None else max_senders)
        self.reported = _BoundedMap(max_tracked)

    def is_sinkhole(self, address: str) -> bool:
        """True if the address's domain is (a subdomain of) a watched domain."""
        _, at, domain = address.rpartition("@")
        if not at:
            return False
        d = domain.rstrip(".").lower()
        return d in self._domains or d.endswith(self._suffixes)

    def is_allowed(self, sender: str | None) -> bool:
        return (
            sender is not None
            and self._allow is not None
            and self._allow.match(sender.lower()) is not None
        )

    def see_queue_add(self, record: QueueAdd) -> None:
        self.senders.put(record.queue_id, record.sender)

    def see_delivery(self, record: Delivery) -> list[Finding]:
        findings: list[Finding] = []
        for rcpt in record.recipients:
            if not self.is_sinkhole(rcpt):
                continue
            key = reported_key(record.queue_id, rcpt)
            if key in self.reported:
                continue
            self.reported.put(key, "")
            sender = self.senders.get(record.queue_id)
            findings.append(
                Finding(
                    queue_id=record.queue_id,
                    recipient=rcpt,
                    sender=sender,
                    stat=record.stat,
                    timestamp=record.timestamp,
                    expected=self.is_allowed(sender),
                )
            )
        return findings

    def needs_sender(self, queue_id: str) -> bool:
        return queue_id not in self.senders

    # -- persistence (the state file carries this across restarts) -----------------------
    def state(self) -> dict[str, Any]:
        return {"senders": list(self.senders.items()), "reported": list(self.reported)}

    def restore(self, senders: Iterable[tuple[str, str]], reported: Iterable[str]) -> None:
        for qid, sender in senders:
            self.senders.put(qid, sender)
        for key in reported:
            self.reported.put(key, "")

    def forget_reported(self, key: str) -> None:
        """Alert about `key` again if it shows up again (its alert was never delivered)."""
        self.reported.pop(key, None)


LOGLEVEL_HINT = (
    "sendmail logs to= delivery lines only at LogLevel 9 (8 for stat=Sent): set "
    "define(`confLOG_LEVEL', `9') in sendmail.mc; until then the leak watcher is blind"
)


def format_sender(sender: str | None) -> str:
    if sender is None:
        return "unknown"
    return sender or "<>"
