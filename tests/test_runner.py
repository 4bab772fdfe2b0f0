"""The runner owns the verdict of any check: deadline, crash, cancellation, cleanup, metrics.

The checks here are a tiny check kind of their own (a scripted coroutine per
phase), which is all the runner sees of any check.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import pytest
from structlog.testing import capture_logs

from daemon.checks.result import MAX_ERROR, CheckResult, FailureReason
from daemon.checks.runner import Runner
from daemon.metrics import Metrics
from daemon.stopping import StopBudget

Phase = Callable[[CheckResult], Awaitable[None]]


async def nothing(_result: CheckResult) -> None:
    return None


@dataclass
class Scripted:
    """A check whose run and cleanup do what the test says."""

    run_phase: Phase = nothing
    cleanup_phase: Phase = nothing
    name: str = "scripted"
    kind: str = "test"
    deadline: float = 5.0
    cleanup_timeout: float = 5.0
    cleaned: bool = False

    def start(self, result: CheckResult) -> Scripted.Run:
        return Scripted.Run(self, result)

    @dataclass
    class Run:
        check: Scripted
        result: CheckResult

        async def run(self) -> None:
            await self.check.run_phase(self.result)

        async def cleanup(self) -> None:
            await self.check.cleanup_phase(self.result)
            self.check.cleaned = True


def cleanup_failures(metrics: Metrics) -> float:
    return metrics.registry.get_sample_value(
        "selfcheck_cleanup_failures_total", {"route": "scripted"}) or 0.0


async def test_the_verdict_is_reported_before_the_cleanup_ends() -> None:
    """The selfcheck_completed line, metrics and listeners come at verdict time."""
    release = asyncio.Event()
    seen: list[CheckResult] = []

    async def succeed(result: CheckResult) -> None:
        result.success = True

    async def slow_cleanup(_result: CheckResult) -> None:
        await release.wait()

    metrics = Metrics()
    runner = Runner(metrics)
    runner.on_result(seen.append)
    check = Scripted(run_phase=succeed, cleanup_phase=slow_cleanup)
    with capture_logs() as logs:
        task = asyncio.create_task(runner.execute(check))
        async with asyncio.timeout(5):
            while not seen:
                await asyncio.sleep(0)
        assert "selfcheck_completed" in [e["event"] for e in logs]
        assert not check.cleaned and not task.done()
        assert metrics.registry.get_sample_value(
            "selfcheck_runs_total", {"route": "scripted", "result": "success"}) == 1
        release.set()
        result = await task
    assert result.success and check.cleaned


async def test_a_timeout_raised_inside_a_check_is_an_internal_error() -> None:
    """A TimeoutError from the check's own code is a bug: reason internal, cleanup still runs."""
    async def buggy(_result: CheckResult) -> None:
        raise TimeoutError("somebody's asyncio.wait_for")

    metrics = Metrics()
    check = Scripted(run_phase=buggy)
    result = await Runner(metrics).execute(check)
    assert result.reason is FailureReason.INTERNAL
    assert result.error == "internal error: TimeoutError: somebody's asyncio.wait_for"
    assert check.cleaned
    assert metrics.registry.get_sample_value(
        "selfcheckd_internal_errors_total", {"kind": "check"}) == 1


async def test_the_deadline_cancels_the_run_and_the_cleanup_still_runs() -> None:
    """A run past its deadline fails with reason deadline; its cleanup runs afterwards."""
    async def hang(_result: CheckResult) -> None:
        await asyncio.Event().wait()

    check = Scripted(run_phase=hang, deadline=0.1)
    result = await Runner().execute(check)
    assert (result.reason, result.error) == (
        FailureReason.DEADLINE, "run exceeded its hard deadline of 0.1s")
    assert check.cleaned


async def test_a_cleanup_past_its_timeout_is_logged_and_counted() -> None:
    """A cleanup that does not end within cleanup_timeout is cut, logged and counted."""
    async def hang(_result: CheckResult) -> None:
        await asyncio.Event().wait()

    metrics = Metrics()
    with capture_logs() as logs:
        result = await Runner(metrics).execute(Scripted(cleanup_phase=hang, cleanup_timeout=0.1))
    assert result.cleanup_error == (
        "cleanup did not finish within 0.1s; the next run sweeps what it left")
    assert [e["event"] for e in logs if e["event"] == "selfcheck_cleanup_failed"] == [
        "selfcheck_cleanup_failed"]
    assert cleanup_failures(metrics) == 1


async def test_a_shutdown_shortens_a_cleanup_that_is_already_running() -> None:
    """Cancelled after SIGTERM, a cleanup started with a long timeout ends by the budget."""
    started = asyncio.Event()

    async def hang(_result: CheckResult) -> None:
        started.set()
        await asyncio.Event().wait()

    metrics = Metrics()
    budget = StopBudget()
    runner = Runner(metrics, budget=budget)
    task = asyncio.create_task(runner.execute(Scripted(cleanup_phase=hang, cleanup_timeout=60)))
    await asyncio.wait_for(started.wait(), 5)
    budget.start(0.3)
    t0 = time.monotonic()
    task.cancel()  # the shutdown cancels runs still going
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - t0 < 2.0  # 0.3 s of budget plus the cancel grace, not 60 s
    assert cleanup_failures(metrics) == 1


async def test_a_listener_that_raises_costs_nothing_but_a_log_line() -> None:
    """A broken on_result listener is logged and counted; the cleanup still runs."""
    def broken(_result: CheckResult) -> None:
        raise RuntimeError("listener bug")

    metrics = Metrics()
    runner = Runner(metrics)
    runner.on_result(broken)
    check = Scripted()
    with capture_logs() as logs:
        await runner.execute(check)
    assert check.cleaned
    assert "selfcheck_listener_failed" in [e["event"] for e in logs]
    assert metrics.registry.get_sample_value(
        "selfcheckd_internal_errors_total", {"kind": "result_listener"}) == 1


def test_a_long_error_is_cut_to_what_a_log_line_carries() -> None:
    """A server's garbage quoted in the error (1.4 KB of control bytes) is cut, marked."""
    result = CheckResult(route="default", run_id="r1")
    result.fail(FailureReason.SEND, "Malformed SMTP response line: " + "\x01" * 1400)
    assert result.error is not None
    assert len(result.error) == MAX_ERROR and result.error.endswith("…")


async def test_the_failure_streak_counts_failed_runs_in_a_row_and_a_success_ends_it() -> None:
    """selfcheck_consecutive_failures (what SelfcheckFailing reads) counts runs, not time."""
    outcomes = iter([False, False, False, True, False])

    async def scripted(result: CheckResult) -> None:
        if next(outcomes):
            result.success = True
        else:
            result.fail(FailureReason.RECEIVE_TIMEOUT, "not found")

    metrics = Metrics()
    runner, check = Runner(metrics), Scripted(run_phase=scripted)
    streak = []
    for _ in range(5):
        await runner.execute(check)
        streak.append(metrics.registry.get_sample_value(
            "selfcheck_consecutive_failures", {"route": "scripted"}))
    assert streak == [1, 2, 3, 0, 1]
