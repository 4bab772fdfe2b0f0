"""What every kind of check gives the runner: a name, two budgets, and a run with a cleanup.

A check only does its protocol work and reports its own details into the
`CheckResult`; the runner (`daemon.checks.runner`) owns the deadline, the
verdict on cancellation and crashes, the `selfcheck_completed` line and the
metrics. The round trip (`daemon.roundtrip.check.RoundTrip`) is the first kind.
"""

from __future__ import annotations

from typing import Protocol

from daemon.checks.result import CheckResult


class CheckRun(Protocol):
    """One execution of a check, created by `Check.start` for one `CheckResult`."""

    async def run(self) -> None:
        """Do the work up to a verdict, recorded in the result (`fail()` or `success`).

        May be cancelled at any await (deadline, shutdown); must not swallow that.
        """

    async def cleanup(self) -> None:
        """Undo what `run` left behind (delete the probe); record problems in
        `result.cleanup_error`. The runner shields it from cancellation and bounds
        it by `cleanup_timeout` and the shutdown budget."""


class Check(Protocol):
    """A configured check, run again and again by the scheduler."""

    @property
    def name(self) -> str:
        """Unique among checks; the `route` label of its metrics."""

    @property
    def kind(self) -> str:
        """What sort of check this is (`roundtrip`), for logs and /status."""

    @property
    def deadline(self) -> float:
        """Seconds `CheckRun.run` may take at most before the runner cancels it."""

    @property
    def cleanup_timeout(self) -> float:
        """Seconds `CheckRun.cleanup` may take at most."""

    def start(self, result: CheckResult) -> CheckRun:
        """A fresh run that reports into `result`."""
