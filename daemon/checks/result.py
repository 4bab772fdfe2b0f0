"""The outcome of one check run: the seed's result dict plus a machine-readable reason.

Besides the verdict, a round trip records delivery-quality facts
(docs/delivery-quality.md): the receiving side's Authentication-Results
verdicts, the mailbox the probe was found in, the Received hops it took, and
the TLS version and certificate expiry of each connection.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from daemon.logs import shorten

# The longest error a result carries (the `selfcheck_completed` line, /status, JSON).
MAX_ERROR = 500


def new_run_id() -> str:
    """A short random id naming one run in logs, probes and healthchecks pings."""
    return secrets.token_hex(6)


class FailureReason(StrEnum):
    """Why a run failed. A fixed set: these are Prometheus label values."""

    PREPARE = "prepare"  # the probe could not be built (config, secret)
    SEND = "send"  # SMTP connect, TLS, AUTH or transaction failed
    IMAP = "imap"  # IMAP connect, TLS, login, select, or the connection was lost
    RECEIVE_TIMEOUT = "receive_timeout"  # the probe did not arrive within the timeout
    INTEGRITY = "integrity"  # the probe arrived altered
    DEADLINE = "deadline"  # the run's hard deadline expired (a hung step)
    INTERNAL = "internal"  # a bug: an unexpected exception in selfcheckd itself
    AUTH = "auth"  # SPF/DKIM/DMARC verdicts differ from the route's [expect], or are missing
    JUNK = "junk"  # the probe landed in a junk mailbox instead of the watched one


# Authentication-Results methods recorded, and the results registered for them
# (RFC 8601 2.7, RFC 7489 11.2, RFC 8617); other results read "other" as labels.
AUTH_METHODS = ("spf", "dkim", "dmarc", "arc")
AUTH_RESULTS = frozenset({
    "pass", "fail", "softfail", "neutral", "none", "policy", "temperror", "permerror",
    "hardfail",
})


def auth_label(result: str) -> str:
    """An Authentication-Results result as a bounded metric label value."""
    return result if result in AUTH_RESULTS else "other"


@dataclass
class Step:
    name: str
    duration: float
    ok: bool
    detail: str = ""


@dataclass(frozen=True)
class TlsFacts:
    """What one TLS connection's handshake showed: the version and when the certificate ends."""

    version: str  # as ssl reports it: "TLSv1.3"
    not_after: float | None  # the peer certificate's notAfter (Unix time); None if unreadable
    seen_at: float  # wall clock of the handshake

    def as_dict(self) -> dict[str, Any]:
        days = None if self.not_after is None else round((self.not_after - self.seen_at) / 86400, 1)
        return {"version": self.version, "not_after": _iso(self.not_after), "days_left": days}


@dataclass(frozen=True)
class Hop:
    """One Received header: who handed the message to whom, when, and how long it took."""

    from_host: str | None  # the name the sending side gave (HELO/EHLO)
    from_ip: str | None  # its address as the receiving side saw it
    by: str | None  # the receiving host
    with_: str | None  # the protocol (ESMTP, ESMTPS, ESMTPSA, LMTP, ...)
    timestamp: float | None  # when the receiving host stamped it (Unix time)
    delay: float | None  # seconds since the previous hop (the first: since the Date header)

    def as_dict(self) -> dict[str, Any]:
        return {"from": self.from_host, "from_ip": self.from_ip, "by": self.by,
                "with": self.with_, "timestamp": _iso(self.timestamp), "delay": self.delay}


@dataclass
class CheckResult:
    route: str
    run_id: str
    success: bool = False
    error: str | None = None
    reason: FailureReason | None = None
    send_time: float | None = None
    reception_time: float | None = None
    cleanup_error: str | None = None
    late_arrivals: int = 0
    steps: list[Step] = field(default_factory=list)
    started_at: float | None = None  # wall clock, set by the runner
    finished_at: float | None = None
    # Cancelled because the daemon is stopping: logged, but not a verdict on the
    # mail system (no metrics, no heartbeat).
    interrupted: bool = False
    # Delivery quality, recorded once the probe was read (docs/delivery-quality.md).
    # Authentication-Results verdicts by method (spf, dkim, dmarc, arc) from the
    # trusted authserv-id; None until the probe was read, {} when it carried none.
    auth: dict[str, str] | None = None
    authserv_id: str | None = None  # whose verdicts `auth` holds
    auth_unparsed: list[str] = field(default_factory=list)  # trusted headers we could not read
    found_in: str | None = None  # the mailbox the probe was found in (a junk one: reason junk)
    hops: list[Hop] | None = None  # the probe's Received headers, first hop first
    tls: dict[str, TlsFacts] = field(default_factory=dict)  # by protocol: smtp, imap

    def fail(self, reason: FailureReason, error: str) -> None:
        """Record the first failure; later ones (during cleanup) do not overwrite it."""
        if self.reason is None:
            self.success = False
            self.reason = reason
            # A server's garbage is quoted in the error: kept to what a log line can carry.
            self.error = shorten(error, MAX_ERROR)

    def as_dict(self, verbose: bool = False) -> dict[str, Any]:
        """The seed's keys first, then ours. Never contains secrets."""
        out: dict[str, Any] = {
            "success": self.success,
            "error": self.error,
            "send_time": _round(self.send_time),
            "reception_time": _round(self.reception_time),
            "route": self.route,
            "reason": self.reason.value if self.reason else None,
            "cleanup_error": self.cleanup_error,
            "late_arrivals": self.late_arrivals,
            "run_id": self.run_id,
            "auth": self.auth,
            "authserv_id": self.authserv_id,
            "auth_unparsed": self.auth_unparsed,
            "found_in": self.found_in,
            "hops": None if self.hops is None else [h.as_dict() for h in self.hops],
            "tls": {protocol: facts.as_dict() for protocol, facts in self.tls.items()},
        }
        if verbose:
            out["steps"] = [
                {"step": s.name, "duration": _round(s.duration), "ok": s.ok, "detail": s.detail}
                for s in self.steps
            ]
        return out


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _iso(stamp: float | None) -> str | None:
    """A Unix time as ISO 8601 UTC (`2026-05-01T12:00:00Z`)."""
    if stamp is None:
        return None
    try:
        when = datetime.fromtimestamp(stamp, UTC)
    except (ValueError, OverflowError, OSError):  # outside years 1-9999: no printable time
        return None
    return when.isoformat(timespec="seconds").replace("+00:00", "Z")
