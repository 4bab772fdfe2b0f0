"""One round trip over one route: prepare, IMAP connect, send, wait, verify, clean up.

IMAP is connected before the probe is sent: a mailbox we cannot read is found
out without leaving a probe behind, and IDLE is already listening when the
probe lands, so `reception_time` is measured from SMTP acceptance to the
server's push rather than to our next poll. Cleanup runs on every path,
including cancellation, on a fresh connection if the first one is gone.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from email import message_from_bytes, policy
from email.utils import parsedate_to_datetime

import structlog

from daemon.config import RouteConfig, SelfcheckConfig
from daemon.roundtrip.imap_client import ImapError, ImapSession
from daemon.roundtrip.probe import (
    PROBE_HEADER,
    IntegrityError,
    Probe,
    build_probe,
    verify_probe,
)
from daemon.roundtrip.result import CheckResult, FailureReason, Step
from daemon.roundtrip.smtp_send import SendError, send_probe

log = structlog.get_logger("daemon.roundtrip")

Clock = Callable[[], float]


class ReceiveTimeoutError(Exception):
    pass


class _Steps:
    """Times named steps into `result.steps` (shown by `check --verbose`)."""

    def __init__(self, result: CheckResult, clock: Clock) -> None:
        self._result = result
        self._clock = clock

    def record(self, name: str, started: float, ok: bool, detail: str = "") -> None:
        step = Step(name, self._clock() - started, ok, detail)
        self._result.steps.append(step)
        log.debug("selfcheck_step", route=self._result.route, step=name,
                  duration=step.duration, ok=ok, detail=detail)


async def run_roundtrip(
    route: RouteConfig,
    selfcheck: SelfcheckConfig,
    secret: bytes,
    result: CheckResult,
    clock: Clock = time.monotonic,
) -> None:
    """Fill `result` with the outcome. Never raises except CancelledError."""
    steps = _Steps(result, clock)
    session: ImapSession | None = None
    probe: Probe | None = None
    sent = False
    try:
        t = clock()
        try:
            probe = build_probe(route=route.name, sender=route.from_, recipient=route.to,
                                secret=secret, run_id=result.run_id)
        except (ValueError, TypeError) as exc:
            steps.record("prepare", t, False, str(exc))
            result.fail(FailureReason.PREPARE, f"probe could not be built: {exc}")
            return
        steps.record("prepare", t, True)

        t = clock()
        session = ImapSession(route.imap)
        try:
            await session.connect()
        except ImapError as exc:
            steps.record("imap_connect", t, False, str(exc))
            result.fail(FailureReason.IMAP, str(exc))
            return
        steps.record("imap_connect", t, True)

        t = clock()
        try:
            result.late_arrivals = await _sweep_late_probes(session, route.name, selfcheck.timeout)
            steps.record("sweep_late", t, True, f"{result.late_arrivals} deleted")
        except ImapError as exc:
            # Not the probe's fault: note it as a cleanup problem and go on.
            steps.record("sweep_late", t, False, str(exc))
            result.cleanup_error = f"sweeping late probes: {exc}"
            if session.lost:
                result.fail(FailureReason.IMAP, str(exc))
                return

        t = clock()
        sent = True  # from here a probe may be in flight, even if send fails
        try:
            result.send_time = await send_probe(route.smtp, probe, route.smtp.timeout)
        except SendError as exc:
            steps.record("smtp_send", t, False, str(exc))
            result.fail(FailureReason.SEND, str(exc))
            return
        accepted_at = clock()
        steps.record("smtp_send", t, True)

        try:
            uid = await _wait_for_probe(session, probe.run_id, accepted_at + selfcheck.timeout,
                                        clock)
        except ReceiveTimeoutError:
            steps.record("receive", accepted_at, False, "timeout")
            result.fail(FailureReason.RECEIVE_TIMEOUT,
                        f"probe not received within {selfcheck.timeout:g}s")
            return
        except ImapError as exc:
            steps.record("receive", accepted_at, False, str(exc))
            result.fail(FailureReason.IMAP, str(exc))
            return
        result.reception_time = clock() - accepted_at
        steps.record("receive", accepted_at, True)

        t = clock()
        try:
            raw = await session.fetch_raw(uid)
            verify_probe(raw, probe)
        except ImapError as exc:
            steps.record("verify", t, False, str(exc))
            result.fail(FailureReason.IMAP, str(exc))
            return
        except IntegrityError as exc:
            steps.record("verify", t, False, str(exc))
            result.fail(FailureReason.INTEGRITY, f"probe integrity check failed: {exc}")
            return
        steps.record("verify", t, True)
        result.success = True
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.exception("selfcheck_internal_error", route=route.name)
        result.fail(FailureReason.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
    finally:
        await _cleanup_in_background(session, route, selfcheck, result, sent, steps, clock)


async def _cleanup_in_background(
    session: ImapSession | None, route: RouteConfig, selfcheck: SelfcheckConfig,
    result: CheckResult, sent: bool, steps: _Steps, clock: Clock,
) -> None:
    # A task of its own, so a cancellation of the run (shutdown, hard deadline)
    # does not also cancel the deletion of the probe; bounded by cleanup_timeout.
    task = asyncio.ensure_future(_cleanup(session, route, result, sent, steps, clock))
    try:
        done, _ = await asyncio.wait({task}, timeout=selfcheck.cleanup_timeout)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if not done:
        task.cancel()
        result.cleanup_error = f"cleanup did not finish within {selfcheck.cleanup_timeout:g}s"
    elif task.exception() is not None:
        result.cleanup_error = f"cleanup failed: {task.exception()}"


async def _cleanup(
    session: ImapSession | None, route: RouteConfig, result: CheckResult, sent: bool,
    steps: _Steps, clock: Clock,
) -> None:
    t = clock()
    try:
        if sent:
            if session is None or session.lost:
                if session is not None:
                    await session.close()
                session = ImapSession(route.imap)
                await session.connect()
            else:
                # Some servers (pymap) show a selected session new mail only after
                # a NOOP; without it a probe that just landed would be missed.
                await session.noop()
            uids = await session.search_probe(result.run_id)
            await session.delete(uids)
            steps.record("cleanup", t, True, f"{len(uids)} deleted")
    except ImapError as exc:
        steps.record("cleanup", t, False, str(exc))
        result.cleanup_error = f"probe not deleted: {exc}"
    finally:
        if session is not None:
            await session.close()


async def _wait_for_probe(session: ImapSession, run_id: str, deadline: float, clock: Clock) -> int:
    """Search for the probe until `deadline`; IDLE between searches when offered."""
    use_idle = session.settings.idle and session.has_capability("IDLE")
    while True:
        exists_before = session.exists_seen
        uids = await session.search_probe(run_id)
        if uids:
            return uids[0]
        remaining = deadline - clock()
        if remaining <= 0:
            raise ReceiveTimeoutError
        if session.exists_seen != exists_before:
            continue  # mail landed while we searched: look again before idling
        if use_idle:
            # Servers push EXISTS on delivery; re-IDLE at most every 25 min as RFC 2177 asks.
            await session.idle_until_change(min(remaining, 1500.0))
        else:
            await asyncio.sleep(min(session.settings.poll_interval, remaining))
            await session.noop()


async def _sweep_late_probes(session: ImapSession, route: str, timeout: float) -> int:
    """Delete this route's probes from earlier runs that arrived after their timeout.

    Only probes older than the timeout are touched, so a second instance's
    in-flight probe (two tasks overlap during an ECS deployment) is left alone.
    """
    uids = await session.search_route_probes(route)
    late: list[int] = []
    now = time.time()
    for uid in uids:
        headers = message_from_bytes(
            await session.fetch_headers(uid, "DATE", PROBE_HEADER.upper()), policy=policy.default
        )
        if not headers.get(PROBE_HEADER):
            continue  # the search matched text elsewhere; not a probe
        try:
            sent_at = parsedate_to_datetime(str(headers.get("Date", ""))).timestamp()
        except (TypeError, ValueError):
            sent_at = 0.0  # a probe with a mangled Date is stale by definition
        if now - sent_at > timeout:
            late.append(uid)
    if late:
        await session.delete(late)
        log.warning("selfcheck_late_arrivals_deleted", route=route, count=len(late))
    return len(late)
