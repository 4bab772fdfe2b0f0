"""The late sweep after a mail outage, against Dovecot: 2,000 late probes and 2,000
probe-like messages that do not verify in its INBOX."""

from __future__ import annotations

import time
from typing import Any

from structlog.testing import capture_logs

from daemon.checks.result import CheckResult
from daemon.checks.runner import Runner
from daemon.roundtrip.check import RoundTrip
from daemon.roundtrip.sweep import SWEEP_MAX_PER_RUN
from tests.conftest import make_config
from tests.integration.dovecot_lab import DovecotLab
from tests.integration.test_roundtrip_dovecot import SECRET, route_for
from tests.probe_backlog import backlog

BACKLOG = 2000


async def test_dovecot_backlog_is_swept_over_runs_and_decoys_stay(
    dovecot_lab: DovecotLab, record_property: Any,
) -> None:
    """Each run finds its own probe within its deadline and sweeps its share of the
    backlog; all 2,000 late probes go, the 2,000 that do not verify stay."""
    dovecot_lab.delete_all()
    _, decoys, mixed = backlog(BACKLOG, secret=SECRET, route="dovecot",
                               sender=dovecot_lab.sender, recipient=dovecot_lab.recipient)
    dovecot_lab.deliver_files(mixed)
    assert dovecot_lab.message_count() == 2 * BACKLOG
    cfg = make_config(route_for(dovecot_lab), timeout=30.0)
    check = RoundTrip(cfg.selfcheck.routes[0], cfg.selfcheck, SECRET)
    runner = Runner()
    results: list[CheckResult] = []
    with capture_logs() as logs:
        for _ in range(3):
            started = time.monotonic()
            results.append(await runner.execute(check))
            record_property(f"run_{len(results)}_seconds", round(time.monotonic() - started, 2))
    sweeps = [next(s.duration for s in r.steps if s.name == "sweep_late") for r in results]
    print(f"dovecot sweep of {BACKLOG}+{BACKLOG}: "
          + ", ".join(f"run {i + 1} {d:.2f} s ({r.late_arrivals} deleted)"
                      for i, (d, r) in enumerate(zip(sweeps, results, strict=True))))
    assert [r.error for r in results] == [None, None, None]
    assert [r.late_arrivals for r in results] == [BACKLOG // 2, BACKLOG // 2, 0]
    continued = [(e["examined"], e["left"]) for e in logs
                 if e["event"] == "selfcheck_sweep_continues"]
    assert continued == [(SWEEP_MAX_PER_RUN, 2 * BACKLOG - SWEEP_MAX_PER_RUN)]
    assert len(check.not_ours) == len(decoys)
    remaining = dovecot_lab.header_values("X-Selfcheck-Id")
    assert len(remaining) == len(decoys)
    decoy_ids = sorted(line.split(b"X-Selfcheck-Id: ")[1].split(b"\r\n")[0].decode()
                       for line in decoys)
    assert sorted(remaining) == decoy_ids
    dovecot_lab.delete_all()
