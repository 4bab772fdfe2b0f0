"""The outcome of one check run: the seed's result dict plus a machine-readable reason."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


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


@dataclass
class Step:
    name: str
    duration: float
    ok: bool
    detail: str = ""


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

    def fail(self, reason: FailureReason, error: str) -> None:
        """Record the first failure; later ones (during cleanup) do not overwrite it."""
        if self.reason is None:
            self.success = False
            self.reason = reason
            self.error = error

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
        }
        if verbose:
            out["steps"] = [
                {"step": s.name, "duration": _round(s.duration), "ok": s.ok, "detail": s.detail}
                for s in self.steps
            ]
        return out


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
