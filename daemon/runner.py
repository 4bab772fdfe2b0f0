"""Runs one check of one route under a hard deadline and reports it the seed's way.

The runner owns the verdict: a round trip only does its protocol work; the
deadline, the `selfcheck_completed` line and the metrics are decided here, so
`selfcheckd check` and the scheduler report runs identically.
"""

from __future__ import annotations

import asyncio
import secrets
import time

import structlog

from daemon.config import Config, RouteConfig, SelfcheckConfig
from daemon.metrics import Metrics
from daemon.roundtrip.check import run_roundtrip
from daemon.roundtrip.probe import new_run_id
from daemon.roundtrip.result import CheckResult, FailureReason

log = structlog.get_logger("daemon.runner")


def hard_deadline(route: RouteConfig, selfcheck: SelfcheckConfig) -> float:
    """Seconds a run may take at most: every step's own budget, added up."""
    imap = route.imap
    return (
        imap.connect_timeout * 2  # connect + STARTTLS handshake
        + imap.command_timeout * 4  # login, select, sweep, fetch
        + route.smtp.timeout
        + selfcheck.timeout
        + selfcheck.cleanup_timeout
    )


def probe_secret(config: Config) -> bytes:
    """The configured secret, or a random one for this process (probes still verify)."""
    if config.selfcheck.secret is not None:
        return config.selfcheck.secret.get_secret_value().encode()
    return secrets.token_bytes(32)


async def run_check(
    route: RouteConfig, selfcheck: SelfcheckConfig, secret: bytes, run_id: str | None = None,
) -> CheckResult:
    """One round trip of `route`; cancellation still deletes the probe, then propagates."""
    result = CheckResult(route=route.name, run_id=run_id or new_run_id())
    budget = hard_deadline(route, selfcheck)
    log.debug("selfcheck_started", route=route.name, run_id=result.run_id)
    task = asyncio.ensure_future(run_roundtrip(route, selfcheck, secret, result))
    try:
        done, _ = await asyncio.wait({task}, timeout=budget)
    except asyncio.CancelledError:
        await _cancel_and_clean(task, selfcheck)
        result.fail(FailureReason.DEADLINE, "run cancelled (daemon shutting down)")
        _finish(result)
        raise
    if not done:
        await _cancel_and_clean(task, selfcheck)
        result.fail(FailureReason.DEADLINE, f"run exceeded its hard deadline of {budget:g}s")
    _finish(result)
    return result


async def _cancel_and_clean(task: asyncio.Future[None], selfcheck: SelfcheckConfig) -> None:
    # The round trip's own `finally` deletes the probe; give it its budget.
    task.cancel()
    await asyncio.wait({task}, timeout=selfcheck.cleanup_timeout + 1.0)


def _finish(result: CheckResult) -> None:
    result.finished_at = time.time()
    log_result(result)


def log_result(result: CheckResult) -> None:
    """The seed's exact line, then the details that do not fit it."""
    if result.success:
        log.info("selfcheck_completed", success=True, send_time=result.send_time,
                 reception_time=result.reception_time)
    else:
        log.error("selfcheck_completed", success=False, error=result.error)
    log.info("selfcheck_result", route=result.route, run_id=result.run_id,
             reason=result.reason.value if result.reason else "none",
             late_arrivals=result.late_arrivals)
    if result.cleanup_error:
        log.warning("selfcheck_cleanup_failed", route=result.route, error=result.cleanup_error)


def record_metrics(metrics: Metrics, result: CheckResult) -> None:
    route = result.route
    ended = result.finished_at or time.time()
    metrics.runs.labels(route, "success" if result.success else "failure").inc()
    metrics.success.labels(route).set(1 if result.success else 0)
    metrics.last_run.labels(route).set(ended)
    if result.success:
        metrics.last_success.labels(route).set(ended)
    elif result.reason is not None:
        metrics.failures.labels(route, result.reason.value).inc()
    if result.send_time is not None:
        metrics.send_duration.labels(route).observe(result.send_time)
    if result.reception_time is not None:
        metrics.reception_duration.labels(route).observe(result.reception_time)
    if result.late_arrivals:
        metrics.late_arrivals.labels(route).inc(result.late_arrivals)
    if result.cleanup_error:
        metrics.cleanup_failures.labels(route).inc()
