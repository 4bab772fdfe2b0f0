"""The late sweep after a mail outage: thousands of late probes and of probe-like messages
that do not verify, against the real pymap server in-process."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from typing import Any

from structlog.testing import capture_logs

from daemon.checks.result import CheckResult
from daemon.checks.runner import Runner
from daemon.embedded.stack import EmbeddedMailStack
from daemon.roundtrip.check import RoundTrip
from daemon.roundtrip.imap_client import ImapSession
from daemon.roundtrip.sweep import SWEEP_BATCH, SWEEP_MAX_PER_RUN, NotOurs, sweep_late_probes
from tests.conftest import make_config
from tests.faulty_servers import wedging_proxy
from tests.probe_backlog import backlog, probes

SECRET = b"test-secret-value"
BACKLOG = 2000


async def load_backlog(stack: EmbeddedMailStack) -> list[bytes]:
    """2,000 late probes and 2,000 decoys, interleaved as an outage leaves them; the decoys."""
    _, decoys, mixed = backlog(BACKLOG, secret=SECRET)
    await stack.imap.deliver_many(stack.options.imap_user, mixed)
    return decoys


async def seen_count(stack: EmbeddedMailStack) -> int:
    session = ImapSession(make_config(stack.route_table()).selfcheck.routes[0].imap)
    await session.connect()
    try:
        response = await session.client.uid_search("SEEN", charset=None)
        return sum(1 for line in response.lines[:-1] for t in line.split() if t.isdigit())
    finally:
        await session.close()


async def test_a_backlog_is_swept_over_runs_that_each_find_their_own_probe(
    mail_stack: EmbeddedMailStack,
) -> None:
    """2,000 late probes among 2,000 that do not verify: each run succeeds with its own
    probe, examines at most its share, and the next goes on; every late probe goes, every
    decoy stays byte-identical and unseen, and later runs download none of them again.
    (aioimaplib's reader died of RecursionError on the first 500-message FETCH.)"""
    decoys = await load_backlog(mail_stack)
    async with wedging_proxy(mail_stack.imap.port) as proxy:
        route: dict[str, Any] = mail_stack.route_table()
        route["imap"]["port"] = proxy.port
        cfg = make_config(route)
        check = RoundTrip(cfg.selfcheck.routes[0], cfg.selfcheck, SECRET)
        runner = Runner()
        results: list[CheckResult] = []
        header_fetches: list[int] = []
        with capture_logs() as logs:
            for _ in range(3):
                before = proxy.sent.count(b"HEADER.FIELDS")
                results.append(await runner.execute(check))
                header_fetches.append(proxy.sent.count(b"HEADER.FIELDS") - before)

    assert [r.error for r in results] == [None, None, None]
    assert all(r.success for r in results)
    assert sum(r.late_arrivals for r in results) == BACKLOG
    assert results[0].late_arrivals == results[1].late_arrivals == BACKLOG // 2
    continued = [e for e in logs if e["event"] == "selfcheck_sweep_continues"]
    assert [(e["examined"], e["left"]) for e in continued] == [
        (SWEEP_MAX_PER_RUN, 2 * BACKLOG - SWEEP_MAX_PER_RUN)]
    # Run 2 reads only what run 1 did not; run 3 has nothing left to read.
    assert header_fetches == [SWEEP_MAX_PER_RUN // SWEEP_BATCH,
                              (2 * BACKLOG - SWEEP_MAX_PER_RUN) // SWEEP_BATCH, 0]
    assert len(check.not_ours) == len(decoys)
    assert sorted(await mail_stack.inbox()) == sorted(decoys)
    assert await seen_count(mail_stack) == 0


async def test_a_sweep_whose_time_is_up_starts_no_batch_and_leaves_the_rest(
    mail_stack: EmbeddedMailStack,
) -> None:
    """The sweep starts batches only until its time is up (a clock that says so after two),
    deletes what those batches proved, and counts the rest as left for the next run."""
    late = probes(3 * SWEEP_BATCH, secret=SECRET)
    await mail_stack.imap.deliver_many(mail_stack.options.imap_user, late)
    ticks = itertools.count()
    session = ImapSession(make_config(mail_stack.route_table()).selfcheck.routes[0].imap)
    await session.connect()
    try:
        outcome = await sweep_late_probes(
            session, route="default", secret=SECRET, timeout=60.0, not_ours=NotOurs(),
            wall=lambda: datetime.now(UTC).timestamp(), clock=lambda: float(next(ticks)),
            until=2.0)
    finally:
        await session.close()
    assert (outcome.examined, outcome.deleted, outcome.left) == (
        2 * SWEEP_BATCH, 2 * SWEEP_BATCH, SWEEP_BATCH)
    assert len(await mail_stack.inbox()) == SWEEP_BATCH
