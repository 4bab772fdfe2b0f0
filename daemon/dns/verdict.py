"""What a DNS check says about one item: ok, problem, or error (undecided), with why.

An item is one thing an operator fixes on its own: `spf`, `dmarc`, `mx`,
`mta-sts`, `tls-rpt`, `dkim/<selector>`, `ptr/<ip>`, `blocklist/<zone>/<ip>`,
and `route-ip` (where the IP of `ips_from_route` came from). `error` means
the check could not decide (a timeout, a blocklist refusing our resolver):
never a verdict on the domain, so it is neither counted as a problem nor as
clean.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from daemon.logs import shorten

# The longest reason kept (CLI line, /status, JSON); records quoted in it can be long.
MAX_REASON = 600


class Verdict(StrEnum):
    OK = "ok"
    PROBLEM = "problem"
    ERROR = "error"  # could not be decided


@dataclass(frozen=True)
class ItemResult:
    item: str
    verdict: Verdict
    reason: str
    # Facts behind the verdict for /status and --json (records, addresses, codes).
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "reason", shorten(" ".join(self.reason.split()), MAX_REASON))

    def as_dict(self) -> dict[str, Any]:
        return {"item": self.item, "verdict": self.verdict.value, "reason": self.reason,
                **({"details": self.details} if self.details else {})}


def ok(item: str, reason: str, **details: Any) -> ItemResult:
    return ItemResult(item, Verdict.OK, reason, details)


def problem(item: str, reason: str, **details: Any) -> ItemResult:
    return ItemResult(item, Verdict.PROBLEM, reason, details)


def error(item: str, reason: str, **details: Any) -> ItemResult:
    return ItemResult(item, Verdict.ERROR, reason, details)


def worst(verdicts: Iterable[Verdict]) -> Verdict:
    """A decided problem outranks an undecided part; both outrank ok."""
    found = set(verdicts)
    for verdict in (Verdict.PROBLEM, Verdict.ERROR):
        if verdict in found:
            return verdict
    return Verdict.OK


def notes(text: str, extra: Iterable[str]) -> str:
    """`text`, then each note after a semicolon (library warnings, caveats)."""
    more = [n.strip().rstrip(".") for n in extra if n and n.strip()]
    return "; ".join([text, *more]) if more else text


@dataclass
class EntryResult:
    """One run of one `[[dns]]` entry."""

    name: str
    domain: str
    started_at: float  # wall clock
    finished_at: float | None = None
    items: list[ItemResult] = field(default_factory=list)
    interrupted: bool = False  # cut short by shutdown: not a verdict

    @property
    def verdict(self) -> Verdict:
        return worst(i.verdict for i in self.items)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "domain": self.domain, "verdict": self.verdict.value,
                "started_at": self.started_at, "finished_at": self.finished_at,
                "items": [i.as_dict() for i in self.items]}
