"""The round trip as a check: prepare, IMAP connect, sweep, send, wait, verify; then delete.

IMAP is connected before the probe is sent: a mailbox we cannot read is found
out without leaving a probe behind, and IDLE is already listening when the
probe lands, so `reception_time` is measured from SMTP acceptance to the
server's push rather than to our next poll.

The runner (`daemon.checks.runner`) owns the deadline, the verdict on crashes
and cancellation, the `selfcheck_completed` line and the metrics; `run()` only
records its steps and the first failure. `cleanup()` deletes this run's probe
on a fresh connection if the first one is gone or wedged.

Only provable probes are ever deleted (`daemon.roundtrip.probe.is_own_probe`):
the route header equals this route exactly and a token verifies with the
secret for that route and run id. IMAP `SEARCH HEADER` is a substring match,
so a search only yields candidates.

Every IMAP wait of the reception phase is bounded by the reception deadline
(SMTP acceptance + `selfcheck.timeout`): waiting for the push ends there, and
the commands that close the phase (DONE, the last SEARCH) get `RECEIVE_GRACE`
more. A server that stops answering mid-IDLE fails the run within
`timeout + RECEIVE_GRACE`, not `timeout + command_timeout`.

Delivery quality (docs/delivery-quality.md) is recorded on the way, as facts
in the result; the runner turns them into metrics:

- TLS: the negotiated version and the peer certificate's notAfter of the SMTP
  and the IMAP connection, read right after each handshake (also when a later
  step such as AUTH or LOGIN fails).
- Junk: while the watched mailbox is waited on, `daemon.roundtrip.junk`
  looks in the junk mailboxes on a second connection (first after a short
  wait, last at the deadline). A probe found there fails the run with reason
  `junk`, naming the mailbox, and the cleanup deletes it there. After a run
  whose probe was never found, the next run's late sweep also covers the junk
  mailboxes (a probe may be misfiled after its timeout).
- Authentication-Results and Received hops are read from the received probe
  (in the watched mailbox or a junk one). Verdicts are judged against the
  route's `[expect]` only after the integrity check passed; a mismatch, or no
  header from the trusted authserv-id, fails the run with reason `auth`.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from email import message_from_bytes, policy

import structlog

from daemon.checks.result import CheckResult, FailureReason, Step
from daemon.config import RouteConfig, SelfcheckConfig
from daemon.roundtrip.authresults import judge, read_verdicts
from daemon.roundtrip.hops import parse_hops
from daemon.roundtrip.imap_client import ImapError, ImapSession
from daemon.roundtrip.junk import JUNK_FINAL_GRACE, JUNK_FIRST_LOOK, JunkHit, JunkWatch
from daemon.roundtrip.probe import (
    IntegrityError,
    Probe,
    build_probe,
    is_own_probe,
    verify_probe,
)
from daemon.roundtrip.smtp_send import SendError, send_probe
from daemon.roundtrip.sweep import NotOurs, sweep_late_probes
from daemon.roundtrip.tls import peer_tls

log = structlog.get_logger("daemon.roundtrip")

Clock = Callable[[], float]

# Seconds after the reception deadline for the commands that end the wait
# (DONE and its tagged answer, the last SEARCH).
RECEIVE_GRACE = 1.0
# IDLE is started only with at least this much of the wait left: the server must
# acknowledge it before the deadline. With less, a NOOP poll ends the wait.
MIN_IDLE = 1.0


class ReceiveTimeoutError(Exception):
    pass


class RoundTrip:
    """One route's SMTP -> mailbox round trip, as a check the runner schedules."""

    kind = "roundtrip"

    def __init__(
        self,
        route: RouteConfig,
        selfcheck: SelfcheckConfig,
        secret: bytes,
        *,
        clock: Clock = time.monotonic,
        wall: Clock = time.time,
        junk_first_look: float = JUNK_FIRST_LOOK,
    ) -> None:
        self.route = route
        self.selfcheck = selfcheck
        self.secret = secret
        self.clock = clock
        self.wall = wall
        self.junk_first_look = junk_first_look
        # Unverifiable probe-like messages are reported once per check, then at debug.
        self.reported_unverified = False
        # A probe sent and never found may land in a junk mailbox later: the next run
        # sweeps the junk mailboxes too (only then, so healthy runs open no second
        # connection for it).
        self.junk_sweep_due = False
        # What the late sweep proved is not ours, so later runs skip it (daemon.roundtrip.sweep).
        self.not_ours = NotOurs()

    @property
    def name(self) -> str:
        return self.route.name

    @property
    def deadline(self) -> float:
        """Seconds the verdict may take at most (the cleanup has its own budget).

        A cap, not a sum of every wait: each IMAP command has `command_timeout`,
        and a server slow on many of them fails the run with reason `deadline`.
        """
        imap = self.route.imap
        return (
            imap.connect_timeout * 2  # connect + STARTTLS handshake
            + imap.command_timeout * 4  # room for four slow commands among login..fetch
            + self.sweep_budget  # the late sweep starts no batch after this
            + self.route.smtp.timeout
            + self.selfcheck.timeout
            + RECEIVE_GRACE
            + (JUNK_FINAL_GRACE if imap.junk_mailboxes != [] else 0.0)  # the last junk look
        )

    @property
    def sweep_budget(self) -> float:
        """Seconds a run's late sweep may start batches in (one command timeout)."""
        return self.route.imap.command_timeout

    @property
    def cleanup_timeout(self) -> float:
        return self.selfcheck.cleanup_timeout

    def start(self, result: CheckResult) -> RoundTripRun:
        return RoundTripRun(self, result)


class RoundTripRun:
    """One execution of a `RoundTrip`, reporting into one `CheckResult`."""

    def __init__(self, check: RoundTrip, result: CheckResult) -> None:
        self.check = check
        self.result = result
        self._clock = check.clock
        self._session: ImapSession | None = None
        self._sent = False  # from the SMTP attempt on, a probe may be in flight
        self._junk = JunkWatch(
            check.route.imap, secret=check.secret, route=check.name, run_id=result.run_id,
            clock=self._clock, record=self._step, first_look=check.junk_first_look,
        )
        self._junk_hit: JunkHit | None = None
        self._found = False  # the probe was seen, in the watched mailbox or a junk one
        self._junk_deleted = False
        self._sweep_until: float | None = None  # one budget for every sweep of the run

    def _record_tls(self, protocol: str, ssl_object: object) -> None:
        facts = peer_tls(ssl_object, self.check.wall())
        if facts is not None:
            self.result.tls[protocol] = facts

    def _step(self, name: str, started: float, ok: bool, detail: str = "") -> None:
        step = Step(name, self._clock() - started, ok, detail)
        self.result.steps.append(step)
        log.debug("selfcheck_step", route=self.result.route, run_id=self.result.run_id,
                  step=name, duration=step.duration, ok=ok, detail=detail)

    def _new_session(self) -> ImapSession:
        self._session = ImapSession(self.check.route.imap, clock=self._clock)
        return self._session

    async def run(self) -> None:
        """Up to the verdict, recorded in the result; never deletes this run's probe."""
        check, result, clock = self.check, self.result, self._clock
        route, selfcheck = check.route, check.selfcheck

        t = clock()
        try:
            probe = build_probe(route=route.name, sender=route.from_, recipient=route.to,
                                secret=check.secret, run_id=result.run_id)
        except (ValueError, TypeError) as exc:
            self._step("prepare", t, False, str(exc))
            result.fail(FailureReason.PREPARE, f"probe could not be built: {exc}")
            return
        self._step("prepare", t, True)

        t = clock()
        session = self._new_session()
        try:
            await session.connect()
        except ImapError as exc:
            self._record_tls("imap", session.ssl_object())
            self._step("imap_connect", t, False, str(exc))
            result.fail(FailureReason.IMAP, str(exc))
            return
        self._record_tls("imap", session.ssl_object())
        self._step("imap_connect", t, True)

        t = clock()
        try:
            result.late_arrivals = await self._sweep_late_probes(session)
            self._step("sweep_late", t, True, f"{result.late_arrivals} deleted")
        except ImapError as exc:
            # Not the probe's fault: note it as a cleanup problem and go on.
            self._step("sweep_late", t, False, str(exc))
            result.cleanup_error = f"sweeping late probes: {exc}"
            if not session.usable:
                result.fail(FailureReason.IMAP, str(exc))
                return
        if check.junk_sweep_due and self._junk.enabled:
            await self._sweep_junk()

        t = clock()
        self._sent = True
        try:
            result.send_time = await send_probe(
                route.smtp, probe, route.smtp.timeout,
                on_tls=lambda ssl_object: self._record_tls("smtp", ssl_object))
        except SendError as exc:
            self._step("smtp_send", t, False, str(exc))
            result.fail(FailureReason.SEND, str(exc))
            return
        accepted_at = clock()
        self._step("smtp_send", t, True)

        try:
            found = await self._receive(session, probe, accepted_at,
                                        accepted_at + selfcheck.timeout)
        except ReceiveTimeoutError:
            self._step("receive", accepted_at, False, "timeout")
            result.fail(FailureReason.RECEIVE_TIMEOUT,
                        f"probe not received within {selfcheck.timeout:g}s")
            return
        except ImapError as exc:
            self._step("receive", accepted_at, False, str(exc))
            result.fail(FailureReason.IMAP, str(exc))
            return
        self._found = True
        if isinstance(found, JunkHit):
            self._junk_hit = found
            result.found_in = found.display_name
            self._step("receive", accepted_at, False, f"in junk mailbox {found.display_name}")
            self._read_delivery_facts(found.raw)
            result.fail(FailureReason.JUNK, f"probe landed in junk mailbox {found.display_name}"
                        f" instead of {route.imap.mailbox}")
            return
        result.reception_time = clock() - accepted_at
        result.found_in = route.imap.mailbox
        self._step("receive", accepted_at, True)

        t = clock()
        try:
            raw = await session.fetch_raw(found)
        except ImapError as exc:
            self._step("verify", t, False, str(exc))
            result.fail(FailureReason.IMAP, str(exc))
            return
        auth_problem = self._read_delivery_facts(raw)
        try:
            verify_probe(raw, probe)
        except IntegrityError as exc:
            self._step("verify", t, False, str(exc))
            result.fail(FailureReason.INTEGRITY, f"probe integrity check failed: {exc}")
            return
        self._step("verify", t, True)
        if auth_problem is not None:
            result.fail(FailureReason.AUTH, auth_problem)
            return
        result.success = True

    async def _sweep_junk(self) -> None:
        """The late sweep, in the junk mailboxes (after a run whose probe was never found)."""
        t = self._clock()
        try:
            swept = await self._junk.sweep(self._sweep_late_probes)
        except ImapError as exc:
            self._step("sweep_junk", t, False, str(exc))
            return  # due again next run
        self.check.junk_sweep_due = False
        self.result.late_arrivals += swept
        self._step("sweep_junk", t, True, f"{swept} deleted")

    def _read_delivery_facts(self, raw: bytes) -> str | None:
        """Record the probe's Authentication-Results verdicts and hops; the auth problem."""
        result, route = self.result, self.check.route
        expect = route.expect
        msg = message_from_bytes(raw, policy=policy.compat32)
        verdicts = read_verdicts(msg, expect.authserv_id if expect is not None else None)
        result.auth = dict(verdicts.results)
        result.authserv_id = verdicts.authserv_id
        result.auth_unparsed = list(verdicts.unparsed)
        result.hops = parse_hops(msg)
        return judge(verdicts, expect)

    async def _receive(
        self, session: ImapSession, probe: Probe, accepted_at: float, deadline: float,
    ) -> int | JunkHit:
        """The probe's UID in the watched mailbox, or where it landed in a junk one.

        The junk watch runs beside the wait on its own connection and is
        cancelled as soon as the watched mailbox shows the probe; when the wait
        times out, the watch's last look (at the deadline) decides.
        """
        if not self._junk.enabled:
            return await self._wait_for_probe(session, probe, deadline)
        watched = asyncio.ensure_future(self._wait_for_probe(session, probe, deadline))
        junk = asyncio.ensure_future(self._junk.watch(accepted_at, deadline))
        try:
            done, _ = await asyncio.wait({watched, junk}, return_when=asyncio.FIRST_COMPLETED)
            if watched in done:
                try:
                    return watched.result()
                except ReceiveTimeoutError:
                    hit = await junk
                    if hit is not None:
                        return hit
                    raise
            hit = junk.result()
            if hit is not None:
                return hit
            return await watched
        finally:
            for task in (watched, junk):
                task.cancel()
            # Both have ended once this returns; an error either raised above is already
            # on its way, and the junk watch's own, when the probe won the race, is said.
            _, junk_outcome = await asyncio.gather(watched, junk, return_exceptions=True)
            if isinstance(junk_outcome, Exception) and sys.exc_info()[1] is not junk_outcome:
                log.warning("selfcheck_junk_watch_failed", route=self.check.route.name,
                            error=f"{type(junk_outcome).__name__}: {junk_outcome}")

    async def cleanup(self) -> None:
        """Delete this run's probe (only it), then close the session.

        A session that is lost or was left with an unanswered command (a
        wedged server) is dropped at once and a fresh one connects. If the
        runner cancels the deletion (its time or the shutdown budget ran out),
        that is recorded as a cleanup error: the next run's sweep removes the probe.
        """
        session, self._session = self._session, None
        t = self._clock()
        try:
            if not self._sent:
                return
            if self._junk_hit is not None:
                # Deleted where it landed; the watched mailbox never had it.
                deleted = await self._junk.delete(self._junk_hit)
                self._junk_deleted = True
                self._step("cleanup", t, True,
                           f"{deleted} deleted from {self._junk_hit.display_name}")
                return
            if session is None or not session.usable:
                if session is not None:
                    await session.drop()
                session = self._new_session()
                await session.connect()
            else:
                # Some servers (pymap) show a selected session new mail only after
                # a NOOP; without it a probe that just landed would be missed.
                await session.noop()
            deleted = await self._delete_own_probe(session)
            self._step("cleanup", t, True, f"{deleted} deleted")
        except ImapError as exc:
            self._step("cleanup", t, False, str(exc))
            self.result.cleanup_error = f"probe not deleted: {exc}"
        except asyncio.CancelledError:
            self._step("cleanup", t, False, "interrupted")
            self.result.cleanup_error = (
                "probe deletion interrupted (out of time); the next run sweeps the probe"
            )
            raise
        finally:
            self._session = None
            if self._sent and (not self._found or (self._junk_hit and not self._junk_deleted)):
                self.check.junk_sweep_due = True  # it may be (or still be) in a junk mailbox
            polite = not _cancelling()
            await self._junk.close(polite)
            if session is not None:
                if session.usable and polite:
                    await session.close()
                else:
                    await session.drop()

    async def _wait_for_probe(self, session: ImapSession, probe: Probe, deadline: float) -> int:
        """Search for the probe until `deadline`; IDLE (or poll) between searches."""
        clock = self._clock
        answer_until = deadline + RECEIVE_GRACE
        use_idle = session.settings.idle and session.has_capability("IDLE")
        while True:
            exists_before = session.exists_seen
            uids = await session.search_probe(probe.run_id, until=answer_until)
            if uids:
                return uids[0]
            remaining = deadline - clock()
            if remaining <= 0:
                raise ReceiveTimeoutError
            if session.exists_seen != exists_before:
                continue  # mail landed while we searched: look again before idling
            if use_idle and remaining >= MIN_IDLE:
                # Servers push EXISTS on delivery; re-IDLE at most every 25 min as RFC 2177 asks.
                await session.idle_until_change(min(deadline, clock() + 1500.0), answer_until)
            else:
                await asyncio.sleep(min(session.settings.poll_interval, remaining))
                await session.noop(until=answer_until)

    async def _sweep_late_probes(self, session: ImapSession) -> int:
        """Delete this route's provable probes of earlier runs that arrived after their timeout.

        Only probes older than the timeout are touched, so a second instance's
        in-flight probe (two tasks overlap during an ECS deployment) is left alone.
        A backlog is swept in bounded batches, the rest by the next runs
        (daemon.roundtrip.sweep); the watched mailbox and the junk ones share the
        run's sweep budget.
        """
        check = self.check
        if self._sweep_until is None:
            self._sweep_until = self._clock() + check.sweep_budget
        outcome = await sweep_late_probes(
            session, route=check.name, secret=check.secret, timeout=check.selfcheck.timeout,
            not_ours=check.not_ours, wall=check.wall, clock=self._clock,
            until=self._sweep_until)
        if outcome.deleted:
            log.warning("selfcheck_late_arrivals_deleted", route=check.name,
                        count=outcome.deleted)
        if outcome.unverified:
            self._report_unverified(outcome.unverified)
        if outcome.left:
            log.info("selfcheck_sweep_continues", route=check.name, mailbox=session.selected,
                     examined=outcome.examined, left=outcome.left,
                     detail="a backlog of probe-like messages: the next run goes on")
        return outcome.deleted

    def _report_unverified(self, count: int) -> None:
        detail = ("messages with this route's probe headers whose token does not verify with "
                  "the current secret (forged, or sent with another secret); left untouched")
        if self.check.reported_unverified:
            log.debug("selfcheck_unverified_probes_left", route=self.check.name, count=count)
            return
        self.check.reported_unverified = True
        log.warning("selfcheck_unverified_probes_left", route=self.check.name, count=count,
                    detail=detail)

    async def _delete_own_probe(self, session: ImapSession) -> int:
        check, run_id = self.check, self.result.run_id
        candidates = await session.search_probe(run_id)
        if not candidates:
            return 0
        fetched = await session.fetch_many(candidates, "BODY.PEEK[]")
        own = [m.uid for m in fetched
               if is_own_probe(m.data, secret=check.secret, route=check.name, run_id=run_id)]
        await session.delete(own)
        return len(own)


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
