"""How long the late sweep takes on a backlog: N late probes and N probe-like messages that
do not verify (half another secret's probes, half forged), interleaved in the INBOX.

    flock /tmp/selfcheckd-integration.lock \
        .venv/bin/python -m bench.late_sweep [--count 2000] [--runs 3] [--skip-dovecot]

(the lock because the Dovecot lab's sendmail logs to /dev/log, which the integration
tier's rsyslogd owns while it runs)

The round trip runs in this process (`RoundTrip` under the `Runner`, one check object as
`run` keeps it, so what a run proved not ours is remembered by the next), `--runs` times in
a row, against pymap embedded in this process (its CPU counts in the wall time) and, when
Dovecot and sendmail are installed and this runs as root, against the Dovecot lab of the
integration tier (tests/integration/dovecot_lab.py; the backlog written into its maildir).
Each row is one run: the sweep step's wall time, what it deleted, and the run's verdict.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from structlog.testing import capture_logs

from bench.roundtrips import dovecot_available
from daemon.checks.runner import Runner
from daemon.embedded.stack import EmbeddedMailStack
from daemon.roundtrip.check import RoundTrip
from tests.conftest import make_config
from tests.probe_backlog import backlog

SECRET = b"bench-sweep-secret"


@dataclass(frozen=True)
class SweepRun:
    server: str
    run: int
    sweep_seconds: float
    run_seconds: float
    deleted: int
    left: int  # candidates left for the next run
    verdict: str


async def sweep_runs(server: str, route: dict[str, Any], runs: int) -> list[SweepRun]:
    cfg = make_config(route, timeout=30.0)
    check = RoundTrip(cfg.selfcheck.routes[0], cfg.selfcheck, SECRET)
    runner = Runner()
    out = []
    for i in range(runs):
        with capture_logs() as logs:
            started = time.perf_counter()
            result = await runner.execute(check)
            elapsed = time.perf_counter() - started
        sweep = next((s.duration for s in result.steps if s.name == "sweep_late"), float("nan"))
        left = sum(e["left"] for e in logs if e["event"] == "selfcheck_sweep_continues")
        verdict = "success" if result.success else f"{result.reason}: {result.error}"
        out.append(SweepRun(server, i + 1, sweep, elapsed, result.late_arrivals, left, verdict))
    return out


async def pymap(count: int, runs: int) -> list[SweepRun]:
    async with EmbeddedMailStack() as stack:
        _, _, mixed = backlog(count, secret=SECRET)
        await stack.imap.deliver_many(stack.options.imap_user, mixed)
        return await sweep_runs("pymap (embedded)", stack.route_table(), runs)


async def dovecot(count: int, runs: int) -> list[SweepRun]:
    from tests.integration.dovecot_lab import DovecotLab

    workdir = Path(tempfile.mkdtemp(prefix="selfcheckd-bench-sweep-"))
    base = Path(tempfile.mkdtemp(prefix="selfcheckd-bench-dovecot-"))
    try:
        lab = DovecotLab.start(workdir, base)
        try:
            _, _, mixed = backlog(count, secret=SECRET, route="dovecot", sender=lab.sender,
                                  recipient=lab.recipient)
            lab.deliver_files(mixed)
            route = {
                "name": "dovecot", "from": lab.sender, "to": lab.recipient,
                "smtp": {"host": lab.smtp_host, "port": lab.smtp_port, "security": "none"},
                "imap": {"host": lab.imap_host, "port": lab.imap_port, "security": "starttls",
                         "ca_file": str(lab.ca_file), "username": lab.username,
                         "password": lab.password},
            }
            return await sweep_runs("Dovecot 2.3 (STARTTLS)", route, runs)
        finally:
            lab.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=2000,
                        help="late probes, and as many decoys (default 2000)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--skip-dovecot", action="store_true")
    args = parser.parse_args()
    rows = asyncio.run(pymap(args.count, args.runs))
    why_not = "skipped" if args.skip_dovecot else dovecot_available()
    if why_not is None:
        rows += asyncio.run(dovecot(args.count, args.runs))
    print(f"{args.count} late probes + {args.count} that do not verify, {args.runs} runs")
    print("| server | run | sweep | whole run | deleted | left for the next run | verdict |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.server} | {r.run} | {r.sweep_seconds:.2f} s | {r.run_seconds:.2f} s | "
              f"{r.deleted:,} | {r.left:,} | {r.verdict} |")
    if why_not is not None:
        print(f"Dovecot: {why_not}")


if __name__ == "__main__":
    main()
