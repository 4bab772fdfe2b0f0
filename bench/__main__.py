"""`python -m bench` (or `bench/run`): every benchmark of selfcheckd in one run, one table.

    .venv/bin/python -m bench [--small] [--skip SECTION,...] [--workdir DIR]

Inputs are generated from a seed, so two runs measure the same bytes. Every ratio in the
table compares two numbers measured in this run on this machine:

- scan: the fast path (daemon.logwatch.fastscan) and the CLI as built (`selfcheckd scan
  --file F --json`) against `grep -F -i -c sinkhole.test F` and Debian's `mtail` one-shot,
  median of `--runs` alternated runs, each in its own process (peak RSS from wait4); the
  findings are compared with the generator's own list and with the CLI's output.
- scan-hard: grep and the CLI again on a second log of the same size whose leaks' senders are
  costly to find (far-back from= lines, retries with none; bench.maillog's `hard`).
- live: the running watcher's file path (FileTail batches into LineProcessor.feed_batch).
- soak: `selfcheckd run` RSS after start-up and after N round trips (embedded stack in
  another process).
- routes: `selfcheckd check` with 50 routes: CPU per round trip and peak RSS.
- idle / dovecot: how long after delivery IDLE (and polling) notices the probe.
- cloudwatch: FilterLogEvents calls per idle poll and put-to-alert latency against moto.
- flood: `selfcheckd run` under a leak flood with the alert webhook down, then healed
  (bench/flood.py): peak RSS against the 256 MB goal, kills past 512 MiB, the state file's
  size, and how many leaks the accepted alerts account for.
- state: a state save's latency and CPU, worker process against the thread it replaced.
- frozen: with the state volume frozen (root: loop mount + fsfreeze), how long a stop takes.

Exit status 0 when every section ran (whatever its numbers: there are no thresholds), 1 when a
section failed (its row says why).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from bench.maillog import MailLogFacts, write_maillog

SECTIONS = ("scan", "scan-hard", "live", "soak", "routes", "idle", "dovecot", "cloudwatch",
            "flood", "state", "frozen")
Row = tuple[str, str, str, str]


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs ({model}), Python {platform.python_version()}"


def tool_version(cmd: list[str]) -> str:
    if shutil.which(cmd[0]) is None:
        return "not installed"
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    return (out.stdout or out.stderr).splitlines()[0].strip() if (out.stdout or out.stderr) \
        else "?"


def ratio(value: float, base: float) -> str:
    if base == 0 or value != value or base != base:  # zero or NaN
        return "-"
    r = value / base
    if r < 0.1:
        return f"{r:.2g}x"
    return f"{r:.2f}x" if r < 10 else f"{r:.0f}x"


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


# -- sections -------------------------------------------------------------------------------
def scan_rows(facts: MailLogFacts, workdir: Path, runs: int) -> list[Row]:
    from bench.scan import run_scan_bench

    b = run_scan_bench(facts, workdir, runs)
    grep = b.timings["grep"]
    fast = b.timings["fast"]
    cli = b.timings["cli"]
    startup = b.timings["startup"]
    rows: list[Row] = [
        ("scan: `grep -F -i -c sinkhole.test F`",
         f"{grep.wall:.3f} s ({b.grep_count} lines; expected {facts.domain_lines})",
         "1.00x", "grep"),
    ]
    if "mtail" in b.timings:
        mt = b.timings["mtail"]
        rows.append(("scan: `mtail --one_shot` (2 regexes: sinkhole.test to= lines)",
                     f"{mt.wall:.3f} s ({b.mtail_count} lines; expected "
                     f"{facts.domain_to_lines}), peak RSS {mt.max_rss:.0f} MiB",
                     ratio(mt.wall, grep.wall), "grep"))
    else:
        rows.append(("scan: `mtail --one_shot`", "not installed (apt-get install mtail)",
                     "-", "grep"))
    same_expected = b.fast_leaks == b.expected_leaks
    same_cli = b.fast_leaks == b.cli_leaks
    rows += [
        ("scan: fast path (`fastscan.scan_file`, own process)",
         f"{fast.wall:.3f} s wall, {fast.cpu:.3f} s CPU", ratio(fast.wall, grep.wall), "grep"),
        ("scan: fast path findings",
         f"{len(b.fast_leaks)} leaks; {'identical to' if same_expected else 'DIFFER FROM'} the "
         f"generator's {len(b.expected_leaks)}, {'identical to' if same_cli else 'DIFFER FROM'}"
         f" the CLI's {len(b.cli_leaks)}; test traffic {b.fast_summary.get('test_recipients')}"
         f" (expected {facts.test_recipients})",
         "1.00" if same_expected and same_cli else "MISMATCH", "pair by pair"),
        ("scan: fast path peak RSS", f"{fast.max_rss:.1f} MiB", ratio(fast.max_rss, 256),
         "256 MiB budget"),
        ("scan: CLI (`selfcheckd scan --file F --json`)",
         f"{cli.wall:.3f} s wall, peak RSS {cli.max_rss:.1f} MiB", ratio(cli.wall, grep.wall),
         "grep"),
        ("scan: CLI start-up alone (an empty file)", f"{startup.wall:.3f} s",
         ratio(startup.wall, grep.wall), "grep"),
    ]
    return rows


def hard_scan_rows(workdir: Path, lines: int, leaks: int, seed: int, runs: int) -> list[Row]:
    """The same scan on a log whose senders are costly to find (write_maillog's `hard`)."""
    from bench.scan import run_scan_bench

    facts = write_maillog(workdir / "maillog-hard", lines, leaks, seed, hard=True)
    b = run_scan_bench(facts, workdir, runs, only=("grep", "fast", "cli"))
    grep, cli = b.timings["grep"], b.timings["cli"]
    same_expected = b.cli_leaks == b.expected_leaks
    same_fast = b.fast_leaks == b.cli_leaks
    far = sum(1 for x in facts.leaks if x.sender is None)
    return [
        (f"scan, hard shapes ({facts.size / 1e6:.0f} MB; every other leak message's from= line "
         f"{facts.lines // 40:,}-{facts.lines // 10:,} lines back, {far} leaks with none): "
         "`grep -F -i -c`",
         f"{grep.wall:.3f} s ({b.grep_count} lines; expected {facts.domain_lines})",
         "1.00x", "grep"),
        ("scan, hard shapes: CLI (`selfcheckd scan --file F --json`)",
         f"{cli.wall:.3f} s wall, peak RSS {cli.max_rss:.1f} MiB", ratio(cli.wall, grep.wall),
         "grep"),
        ("scan, hard shapes: findings",
         f"{len(b.cli_leaks)} leaks; {'identical to' if same_expected else 'DIFFER FROM'} the "
         f"generator's {len(b.expected_leaks)}, "
         f"{'identical to' if same_fast else 'DIFFER FROM'} the fast path's",
         "1.00" if same_expected and same_fast else "MISMATCH", "pair by pair"),
    ]


def live_rows(facts: MailLogFacts) -> list[Row]:
    from bench.scan import live_rate

    rows = []
    for label, queue in (("", False), (" with queue health (QueueTracker)", True)):
        r = live_rate(facts.path, queue=queue)
        rows.append((f"live watcher: FileTail batches -> `LineProcessor.feed_batch`{label}",
                     f"{r.lines_per_second:,.0f} lines/s, {r.cpu_per_million:.2f} s CPU per "
                     f"million lines (reading alone {r.read_cpu / r.lines * 1e6:.2f} s)",
                     ratio(r.cpu_per_million, r.read_cpu / r.lines * 1e6), "reading alone"))
    return rows


def soak_rows(workdir: Path, runs: int) -> list[Row]:
    from bench.roundtrips import soak

    s = soak(workdir, runs)
    path = " -> ".join(f"{rss:.1f}" + (f" ({n:,})" if n else "") for n, rss in s.samples)
    return [(f"run: RSS after start-up, then over {s.runs:,} round trips",
             f"{path} MiB: {s.growth:+.2f} MiB, of which {s.second_half_growth:+.2f} in the "
             f"second half ({s.failures} failed; {s.runs / s.seconds:.0f} round trips/s, "
             f"{s.cpu / s.runs * 1000:.1f} ms CPU each, embedded stack in another process)",
             ratio(s.growth, 1.0), "1 MiB growth goal")]


def routes_rows(workdir: Path, count: int) -> list[Row]:
    from bench.roundtrips import many_routes

    m = many_routes(workdir, count, repeat=3)
    return [
        (f"check, {m.routes} routes: selfcheckd CPU per round trip",
         f"{ms(m.cpu_per_round_trip)} ({m.ok}/{m.routes} ok; whole command {m.cpu_many:.2f} s "
         f"CPU, {m.wall_many:.2f} s wall)", ratio(m.cpu_per_round_trip, m.cpu_one),
         "CPU of `check` with 1 route (start-up + 1 round trip)"),
        (f"check, {m.routes} routes: peak RSS", f"{m.rss_many:.1f} MiB", "-", ""),
    ]


def detection_rows(workdir: Path, count: int, dovecot: bool) -> list[Row]:
    import asyncio

    from bench import roundtrips

    pairs = [(asyncio.run(roundtrips.embedded_detection(count, idle=True)),
              asyncio.run(roundtrips.embedded_detection(count, idle=False)))]
    rows: list[Row] = []
    if dovecot:
        why = roundtrips.dovecot_available()
        if why is None:
            pairs.append((asyncio.run(roundtrips.dovecot_detection(workdir, count, True)),
                          asyncio.run(roundtrips.dovecot_detection(workdir, count, False))))
        else:
            rows.append(("detection overhead, Dovecot", f"not measured: {why}", "-", ""))
    for idle, poll in pairs:
        for d in (idle, poll):
            rows.append((f"detection overhead (detected - delivered), {d.label}",
                         f"p50 {ms(d.p50)}, p95 {ms(d.p95)} ({len(d.samples)} runs, "
                         f"{d.failures} failed)",
                         ratio(d.p50, poll.p50) if d is idle else "1.00x",
                         f"polling p50, {poll.label.split(',')[0]}"))
    return rows


def cloudwatch_rows(small: bool) -> list[Row]:
    from bench.cloudwatch import cloudwatch_bench, p50, p95

    interval = 1.0
    c = cloudwatch_bench(interval, idle_seconds=3 if small else 10, leaks=3 if small else 20)
    return [
        ("CloudWatch (moto): FilterLogEvents calls per idle poll",
         f"{c.calls_per_idle_poll:.2f} ({c.idle_calls} calls in {c.idle_polls} polls)",
         "-", "one log group"),
        (f"CloudWatch (moto): put-to-alert latency, poll_interval {interval:g} s",
         f"p50 {p50(c.latencies):.3f} s, p95 {p95(c.latencies):.3f} s "
         f"({len(c.latencies)} leaks, {c.failures} missed)",
         ratio(p50(c.latencies), interval), "poll_interval"),
    ]


def flood_rows(workdir: Path, small: bool) -> list[Row]:
    from bench.flood import run_flood

    leaks, down = (20_000, 10.0) if small else (200_000, 120.0)
    (workdir / "flood").mkdir(exist_ok=True)
    r = run_flood(workdir / "flood", leaks=leaks, down=down, heal_timeout=600.0)
    accounted = r.events["accounted_leaks"]
    healed = ("not all within 600 s of the heal" if r.accounted_at is None
              else f"all {r.accounted_at:.0f} s after the heal")
    return [
        (f"flood: `run` RSS, {leaks:,} leaks, webhook down {down:g} s after the last, then "
         "healed", f"peak {r.peak_rss_mib:.1f} MiB (VmHWM); killed past {r.limit_mib:.0f} MiB "
         f"{r.kills} times; biggest state file {r.biggest_state_mib:.1f} MiB, "
         f"{len(r.quarantined)} quarantined", ratio(r.peak_rss_mib, 256), "256 MB goal"),
        ("flood: leaks accounted for by accepted alerts",
         f"{accounted:,} of {leaks:,} ({r.events['accepted_leak_alerts']} single alerts, "
         f"{r.events['accepted_digests']} digests), {healed}",
         ratio(accounted, leaks), "leaks written"),
    ]


def state_rows(workdir: Path, small: bool) -> list[Row]:
    from bench.state_io import median, p95, save_latency

    rows: list[Row] = []
    for r in save_latency(workdir, small):
        size = f"{r.size / 1e6:.2f} MB" if r.size >= 100_000 else f"{r.size / 1e3:.1f} kB"
        what = f"state save, {r.label} ({size}, {len(r.worker)} saves)"
        rows += [
            (f"{what}: thread (before)",
             f"p50 {ms(median(r.thread))}, p95 {ms(p95(r.thread))}, {ms(r.thread_cpu)} CPU",
             "1.00x", "thread"),
            (f"{what}: worker process",
             f"p50 {ms(median(r.worker))}, p95 {ms(p95(r.worker))}, {ms(r.worker_cpu)} CPU "
             "(this process and the worker)",
             ratio(median(r.worker), median(r.thread)), "thread p50"),
        ]
    return rows


def frozen_rows(workdir: Path, small: bool) -> list[Row]:
    from bench.state_io import frozen_available, frozen_stop

    why = frozen_available()
    if why is not None:
        return [("frozen state volume", f"not measured: {why}", "-", "")]
    f = frozen_stop(workdir, hold=4.0 if small else 10.0)
    return [
        (f"frozen state volume: a process whose thread writes there, its end after its last "
         f"line (thawed after {f.hold:g} s)",
         f"{f.thread_exit:.2f} s", ratio(f.thread_exit, f.hold), "time frozen"),
        ("frozen state volume: `selfcheckd run` (grace 5 s) exit after SIGTERM, save stuck",
         f"{f.daemon_exit:.2f} s (exit 0; leakwatch_state_not_saved logged: "
         f"{'yes' if f.daemon_stopped_line else 'NO'})",
         ratio(f.daemon_exit, 5 + 5), "shutdown_grace + 5 s"),
        ("frozen state volume: the same as PID 1 of a PID namespace (a container)",
         f"selfcheckd_stopped {f.pid1_stopped:.2f} s after SIGTERM; the namespace ended "
         f"{f.pid1_namespace_end:.2f} s after (thawed after {f.hold:g} s)",
         ratio(f.pid1_namespace_end, f.hold), "time frozen"),
    ]


# -- main -----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true",
                        help="CI size: 20,000 log lines, 100 round trips, 10 routes")
    parser.add_argument("--lines", type=int, help="log lines (default 2,000,000)")
    parser.add_argument("--leaks", type=int, default=160, help="leaked pairs in the log")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--runs", type=int, default=3, help="alternated runs per scan command")
    parser.add_argument("--soak-runs", type=int, help="round trips of `run` (default 2,000)")
    parser.add_argument("--routes", type=int, help="routes of `check` (default 50)")
    parser.add_argument("--samples", type=int, help="round trips per detection row (30)")
    parser.add_argument("--skip", default="", help=f"comma list of {', '.join(SECTIONS)}")
    parser.add_argument("--workdir", type=Path,
                        help="keep the generated log and configs here (default: a temp dir)")
    opts = parser.parse_args(argv)
    skip = {s.strip() for s in opts.skip.split(",") if s.strip()}
    unknown = skip - set(SECTIONS)
    if unknown:
        parser.error(f"--skip: unknown section(s) {', '.join(sorted(unknown))}")
    small = opts.small
    lines = opts.lines or (20_000 if small else 2_000_000)
    soak_runs = opts.soak_runs or (100 if small else 2_000)
    routes = opts.routes or (10 if small else 50)
    samples = opts.samples or (3 if small else 30)

    from daemon.logs import configure_logging

    configure_logging("kv", "error")
    workdir = opts.workdir or Path(tempfile.mkdtemp(prefix="selfcheckd-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    rows: list[Row] = []
    failed = False
    try:
        facts = write_maillog(workdir / "maillog", lines, opts.leaks, opts.seed)
        sections: list[tuple[str, Callable[[], list[Row]]]] = [
            ("scan", lambda: scan_rows(facts, workdir, opts.runs)),
            ("scan-hard", lambda: hard_scan_rows(workdir, lines, opts.leaks, opts.seed,
                                                 opts.runs)),
            ("live", lambda: live_rows(facts)),
            ("soak", lambda: soak_rows(workdir, soak_runs)),
            ("routes", lambda: routes_rows(workdir, routes)),
            ("idle", lambda: detection_rows(workdir, samples, "dovecot" not in skip)),
            ("cloudwatch", lambda: cloudwatch_rows(small)),
            ("flood", lambda: flood_rows(workdir, small)),
            ("state", lambda: state_rows(workdir, small)),
            ("frozen", lambda: frozen_rows(workdir, small)),
        ]
        for name, section in sections:
            if name in skip:
                continue
            print(f"bench: {name} ...", file=sys.stderr, flush=True)
            try:
                rows += section()
            except Exception as exc:  # one broken section must not hide the others
                failed = True
                traceback.print_exc()
                rows.append((name, f"FAILED: {type(exc).__name__}: {exc}", "-", ""))
    finally:
        if opts.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"selfcheckd benchmark: `python -m bench{' --small' if small else ''}` "
          f"(seed {opts.seed}), {time.monotonic() - started:.0f} s")
    print(f"machine: {machine()}; {tool_version(['grep', '--version'])}; "
          f"{tool_version(['mtail', '--version'])}")
    print(f"log: {facts.lines:,} lines, {facts.size / 1e6:.1f} MB, {len(facts.leaks)} leaked "
          f"pairs, {facts.test_recipients} test recipients")
    print()
    print("| measure | result | ratio | against |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
