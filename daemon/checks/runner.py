"""Runs one check under its deadline and reports it, the same way for `check` and `run`.

The runner owns the verdict: a check only does its protocol work. Here the
deadline is enforced, a crash becomes reason `internal`, a cancellation
becomes reason `deadline`, the seed's `selfcheck_completed` line is logged the
moment the verdict is known, the metrics are recorded, and `on_result`
listeners (status, heartbeats) are told. Then the check's cleanup runs,
shielded from cancellation and bounded by its own timeout and whatever the
shutdown budget has left; a cleanup that cannot finish is logged and counted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog

from daemon.checks.base import Check, CheckRun
from daemon.checks.result import CheckResult, FailureReason, auth_label, new_run_id
from daemon.metrics import Metrics
from daemon.stopping import StopBudget, finish_shielded

log = structlog.get_logger("daemon.checks")

ResultListener = Callable[[CheckResult], None]


class Runner:
    """Executes checks; one per process (shared by every scheduled route)."""

    def __init__(
        self,
        metrics: Metrics | None = None,
        *,
        budget: StopBudget | None = None,
        final_reserve: float = 0.0,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.metrics = metrics
        self.budget = budget if budget is not None else StopBudget()
        # Seconds of the shutdown budget kept for what follows the cleanups
        # (state save, outbox flush, closing clients).
        self.final_reserve = final_reserve
        self._wall = wall
        self._listeners: list[ResultListener] = []
        # True while runs are cut short for a reason that says nothing about mail: this
        # task stopped being the leader (daemon/ha.py). Such runs record no verdict.
        self.halted: Callable[[], bool] = lambda: False

    def on_result(self, listener: ResultListener) -> None:
        """Call `listener(result)` after each verdict (not for runs cut short by shutdown)."""
        self._listeners.append(listener)

    async def execute(self, check: Check, run_id: str | None = None) -> CheckResult:
        """Run `check` once; a cancellation still runs the cleanup, then propagates."""
        result = CheckResult(route=check.name, run_id=run_id or new_run_id(),
                             started_at=self._wall())
        run = check.start(result)
        log.debug("selfcheck_started", route=check.name, kind=check.kind, run_id=result.run_id)
        cancelled = await self._verdict(check, run, result)
        result.finished_at = self._wall()
        self._report(result)
        await self._cleanup(check, run, result)
        if cancelled:
            raise asyncio.CancelledError
        return result

    async def _verdict(self, check: Check, run: CheckRun, result: CheckResult) -> bool:
        """Run to a verdict; True if the run was cancelled from outside."""
        try:
            async with asyncio.timeout(check.deadline) as scope:
                await run.run()
        except TimeoutError as exc:
            if scope.expired():
                result.fail(FailureReason.DEADLINE,
                            f"run exceeded its hard deadline of {check.deadline:g}s")
            else:  # raised inside the check, not by our deadline: a bug
                self._internal(check, result, exc)
        except asyncio.CancelledError:
            halted = self.halted()
            result.interrupted = self.budget.started or halted
            why = ("daemon shutting down" if self.budget.started
                   else "this task stopped leading" if halted else "cancelled by the scheduler")
            result.fail(FailureReason.DEADLINE, f"run cancelled ({why})")
            return True
        except Exception as exc:
            self._internal(check, result, exc)
        return False

    def _internal(self, check: Check, result: CheckResult, exc: Exception) -> None:
        log.error("selfcheck_internal_error", route=check.name, run_id=result.run_id,
                  exc_info=exc)
        if self.metrics is not None:
            self.metrics.internal_errors.labels(kind="check").inc()
        result.fail(FailureReason.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")

    def _report(self, result: CheckResult) -> None:
        log_result(result)
        if result.interrupted:
            return  # the daemon is stopping: not a verdict on the mail system
        if self.metrics is not None:
            record_metrics(self.metrics, result)
        for listener in self._listeners:
            try:
                listener(result)
            except Exception:  # a listener's bug must not cost the cleanup
                log.exception("selfcheck_listener_failed", route=result.route)
                if self.metrics is not None:
                    self.metrics.internal_errors.labels(kind="result_listener").inc()

    async def _cleanup(self, check: Check, run: CheckRun, result: CheckResult) -> None:
        timeout = min(check.cleanup_timeout, self.budget.remaining(self.final_reserve))
        task = asyncio.create_task(run.cleanup(), name=f"cleanup:{check.name}")
        try:
            finished = await finish_shielded(
                task, timeout, allowed=lambda: self.budget.remaining(self.final_reserve))
        except asyncio.CancelledError:
            # By now the cleanup either ended on its own or was cut short at its bound.
            self._cleanup_outcome(result, task, timeout, task.done() and not task.cancelled())
            raise
        self._cleanup_outcome(result, task, timeout, finished)

    def _cleanup_outcome(
        self, result: CheckResult, task: asyncio.Task[None], timeout: float, finished: bool,
    ) -> None:
        if not finished:
            within = ("before the shutdown budget ran out" if self.budget.started
                      else f"within {timeout:g}s")
            result.cleanup_error = (f"cleanup did not finish {within}; "
                                    "the next run sweeps what it left")
        elif not task.cancelled() and (exc := task.exception()) is not None:
            log.error("selfcheck_cleanup_crashed", route=result.route, run_id=result.run_id,
                      exc_info=exc)
            result.cleanup_error = f"cleanup failed: {type(exc).__name__}: {exc}"
        if result.cleanup_error:
            log.warning("selfcheck_cleanup_failed", route=result.route, run_id=result.run_id,
                        error=result.cleanup_error)
            if self.metrics is not None:
                self.metrics.cleanup_failures.labels(result.route).inc()


def log_result(result: CheckResult) -> None:
    """The seed's exact line (its fields first, byte for byte), the route appended."""
    if result.success:
        log.info("selfcheck_completed", success=True, send_time=result.send_time,
                 reception_time=result.reception_time, route=result.route)
    else:
        log.error("selfcheck_completed", success=False, error=result.error, route=result.route)
    log.info("selfcheck_result", route=result.route, run_id=result.run_id,
             reason=result.reason.value if result.reason else "none",
             late_arrivals=result.late_arrivals, **_quality_fields(result))


def _quality_fields(result: CheckResult) -> dict[str, str]:
    """Delivery-quality facts for the `selfcheck_result` line (only those recorded)."""
    fields: dict[str, str] = {}
    if result.found_in is not None:
        fields["found_in"] = result.found_in
    if result.auth is not None:
        verdicts = " ".join(f"{m}={r}" for m, r in result.auth.items())
        fields["auth"] = verdicts or "none"
        if result.authserv_id is not None:
            fields["authserv_id"] = result.authserv_id
    for protocol, tls in sorted(result.tls.items()):
        fields[f"{protocol}_tls"] = tls.version
        if tls.not_after is not None:
            fields[f"{protocol}_cert_not_after"] = tls.as_dict()["not_after"]
    return fields


def record_metrics(metrics: Metrics, result: CheckResult) -> None:
    route = result.route
    ended = result.finished_at or time.time()
    metrics.runs.labels(route, "success" if result.success else "failure").inc()
    metrics.success.labels(route).set(1 if result.success else 0)
    metrics.last_run.labels(route).set(ended)
    if result.success:
        metrics.last_success.labels(route).set(ended)
        metrics.consecutive_failures.labels(route).set(0)
    else:
        metrics.consecutive_failures.labels(route).inc()
        if result.reason is not None:
            metrics.failures.labels(route, result.reason.value).inc()
    if result.send_time is not None:
        metrics.send_duration.labels(route).observe(result.send_time)
    if result.reception_time is not None:
        metrics.reception_duration.labels(route).observe(result.reception_time)
    if result.late_arrivals:
        metrics.late_arrivals.labels(route).inc(result.late_arrivals)
    _record_quality(metrics, result)


def _record_quality(metrics: Metrics, result: CheckResult) -> None:
    """TLS facts of each handshake and the probe's verdicts; a run that did not get as far
    leaves the last values in place (a certificate does not change because SMTP failed)."""
    route = result.route
    for protocol, tls in result.tls.items():
        if tls.not_after is not None:
            metrics.tls_cert_expiry.labels(route, protocol).set(tls.not_after)
        metrics.tls_version.labels(route, protocol).info({"version": tls.version})
    if result.auth is not None:
        # The probe was read: its verdicts replace the last ones, methods gone included.
        metrics.auth_result.remove_by_labels({"route": route})
        for method, verdict in result.auth.items():
            metrics.auth_result.labels(route, method, auth_label(verdict)).set(1)
    if result.auth_unparsed:
        metrics.auth_unparsed.labels(route).inc(len(result.auth_unparsed))
