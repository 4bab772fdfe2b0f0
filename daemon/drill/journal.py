"""The drill's journal: every step as an activity with its evidence, then the verdict.

Shaped after Chaos Toolkit's journal: each activity has `started`, `ended`,
`ok`, its output (`evidence`) and `error`; the run has a `result` and the
rollback (`cleanup`) its own record. It is the artefact an operator attaches
to a change; nothing in it is a secret (the config summary is the [drill]
section's, which holds none).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TextIO

RESULTS = ("passed", "failed", "aborted", "refused")
EXIT_CODES = {"passed": 0, "failed": 1, "refused": 2, "aborted": 3}
EXIT_CLEANUP_FAILED = 4
MAX_CALLS = 100  # distinct calls recorded per step


def iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(
        timespec="milliseconds")


@dataclass
class StepRecord:
    number: int | None  # None for the cleanup
    name: str
    started: float
    ended: float | None = None
    ok: bool | None = None
    evidence: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    summary: str = ""
    mono_started: float = 0.0
    duration: float | None = None

    def call(self, call: dict[str, Any]) -> None:
        """One API call or command the step made; a repeated one (a poll) is counted."""
        calls: list[dict[str, Any]] = self.evidence.setdefault("calls", [])
        for seen in calls:
            if {k: v for k, v in seen.items() if k != "count"} == call:
                seen["count"] = seen.get("count", 1) + 1
                return
        if len(calls) < MAX_CALLS:
            calls.append(dict(call))

    def as_dict(self) -> dict[str, Any]:
        return {"step": self.number, "name": self.name, "started": iso(self.started),
                "ended": iso(self.ended), "duration": None if self.duration is None
                else round(self.duration, 3), "ok": self.ok, "summary": self.summary,
                "evidence": self.evidence, "error": self.error}

    def line(self) -> str:
        """The human line printed on stderr when the step ends."""
        label = "cleanup" if self.number is None else f"step {self.number} {self.name}"
        verdict = "ok" if self.ok else "FAILED"
        what = self.error if not self.ok and self.error else self.summary
        took = "" if self.duration is None else f" ({self.duration:.1f} s)"
        return f"drill {label}: {verdict}" + (f": {what}" if what else "") + took


@dataclass
class Journal:
    drill_id: str
    config: dict[str, Any]
    started: float
    ended: float | None = None
    steps: list[StepRecord] = field(default_factory=list)
    result: str | None = None
    failed_step: str | None = None
    error: str | None = None
    interrupted_by: str | None = None
    queue_id: str | None = None
    message_id: str | None = None
    recipient: str | None = None
    cleanup: dict[str, Any] = field(default_factory=lambda: {"ok": None, "actions": []})

    @property
    def cleanup_failed(self) -> bool:
        return self.cleanup.get("ok") is False

    @property
    def exit_code(self) -> int:
        if self.cleanup_failed:
            return EXIT_CLEANUP_FAILED
        return EXIT_CODES.get(self.result or "aborted", 3)

    @property
    def metric_result(self) -> str:
        """The `result` label of selfcheck_drill_runs_total."""
        return "cleanup_failed" if self.cleanup_failed else (self.result or "aborted")

    def as_dict(self) -> dict[str, Any]:
        return {
            "drill": "queue-persistence",
            "id": self.drill_id,
            "started": iso(self.started),
            "ended": iso(self.ended),
            "config": self.config,
            "recipient": self.recipient,
            "message_id": self.message_id,
            "queue_id": self.queue_id,
            "steps": [s.as_dict() for s in self.steps if s.number is not None],
            "result": self.result,
            "failed_step": self.failed_step,
            "error": self.error,
            "interrupted_by": self.interrupted_by,
            "cleanup": self.cleanup,
            "exit_code": self.exit_code,
        }

    def dump(self, out: TextIO) -> None:
        json.dump(self.as_dict(), out, indent=2, ensure_ascii=False)
        out.write("\n")
