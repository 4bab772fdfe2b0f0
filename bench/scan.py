"""scan vs grep -F -i -c vs mtail one-shot on one generated log; the live watcher's rate.

Each command runs in a process of its own, alternated (grep, mtail, fast, CLI, grep, ...),
`runs` times; the table shows the median wall time. Peak RSS is the child's ru_maxrss.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import procs
from bench.maillog import DOMAIN, MailLogFacts

MTAIL_PROGRAM = """\
# The tool a Prometheus shop would reach for: count to= lines naming the sinkhole domain.
counter sinkhole_to_lines

/ to=/ {
  /(?i)sinkhole\\.test/ {
    sinkhole_to_lines++
  }
}
"""


@dataclass
class Timing:
    name: str
    runs: list[procs.Run] = field(default_factory=list)

    @property
    def wall(self) -> float:
        return procs.median([r.wall for r in self.runs])

    @property
    def cpu(self) -> float:
        return procs.median([r.cpu for r in self.runs])

    @property
    def max_rss(self) -> float:
        return max(r.max_rss_mib for r in self.runs)


@dataclass
class ScanBench:
    facts: MailLogFacts
    timings: dict[str, Timing]
    grep_count: int
    mtail_count: int | None
    fast_leaks: list[dict[str, object]]
    cli_leaks: list[dict[str, object]]
    expected_leaks: list[dict[str, object]]
    fast_summary: dict[str, object]


def _mtail_count(out: bytes) -> int:
    data = json.loads(out)
    return int(data["sinkhole_to_lines"][0]["LabelValues"][0]["Value"]["Value"])


def _leaks(out: bytes) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def run_scan_bench(facts: MailLogFacts, workdir: Path, runs: int,
                   only: tuple[str, ...] | None = None) -> ScanBench:
    """`only`: the commands to run (grep, fast and cli at least); default all."""
    log = str(facts.path)
    progs = workdir / "mtail"
    progs.mkdir(exist_ok=True)
    (progs / "sinkhole.mtail").write_text(MTAIL_PROGRAM)
    selfcheckd = str(Path(sys.executable).parent / "selfcheckd")
    commands: dict[str, list[str]] = {
        "grep": ["grep", "-F", "-i", "-c", DOMAIN, log],
        "fast": [sys.executable, "-m", "bench.scan_child", log],
        "cli": [selfcheckd, "scan", "--file", log, "--json"],
        "startup": [selfcheckd, "scan", "--file", str(workdir / "empty.log"), "--json"],
    }
    (workdir / "empty.log").write_text("")
    if shutil.which("mtail"):
        commands["mtail"] = ["mtail", "--one_shot", "--progs", str(progs), "--logs", log]
    if only is not None:
        commands = {name: cmd for name, cmd in commands.items() if name in only}
    timings = {name: Timing(name) for name in commands}
    for _ in range(runs):
        for name, cmd in commands.items():
            timings[name].runs.append(procs.run(cmd))
    grep_runs = timings["grep"].runs
    mtail_count = _mtail_count(timings["mtail"].runs[-1].stdout) if "mtail" in timings else None
    fast_run = timings["fast"].runs[-1]
    return ScanBench(
        facts=facts, timings=timings,
        grep_count=int(grep_runs[-1].stdout.strip() or 0),
        mtail_count=mtail_count,
        fast_leaks=_leaks(fast_run.stdout),
        cli_leaks=_leaks(timings["cli"].runs[-1].stdout),
        expected_leaks=[{"type": "leak", "queue_id": x.queue_id, "recipient": x.recipient,
                         "sender": x.sender, "stat": x.stat, "timestamp": x.timestamp}
                        for x in facts.leaks],
        fast_summary=json.loads(fast_run.stderr.splitlines()[-1]),
    )


@dataclass
class LiveRate:
    lines: int
    seconds: float
    cpu: float
    read_cpu: float  # of which reading and splitting (FileTail alone)

    @property
    def lines_per_second(self) -> float:
        return self.lines / self.seconds

    @property
    def cpu_per_million(self) -> float:
        return self.cpu / self.lines * 1e6


async def _drain(path: Path, feed: bool, queue: bool = False) -> tuple[int, float, float]:
    from daemon.logwatch.detector import LeakDetector
    from daemon.logwatch.pipeline import LineProcessor
    from daemon.logwatch.queue import QueueTracker
    from daemon.logwatch.sources.file import FileTail

    tracker = QueueTracker(clock=time.time) if queue else None
    processor = LineProcessor(LeakDetector([DOMAIN], ["qp-test-*@*"]), queue=tracker)
    tail = FileTail(path, from_beginning=True)
    lines = 0
    started, cpu = time.perf_counter(), time.process_time()
    try:
        while True:
            batch = await tail.read()
            if not batch:
                break
            lines += len(batch)
            if feed:
                processor.feed_batch(batch)
    finally:
        tail.close()
    return lines, time.perf_counter() - started, time.process_time() - cpu


def live_rate(path: Path, queue: bool = False) -> LiveRate:
    """The running watcher's path today: FileTail batches fed to LineProcessor.feed_batch;
    `queue`: with queue health (a QueueTracker fed too, as `selfcheckd run` does)."""
    _, _, read_cpu = asyncio.run(_drain(path, feed=False))
    lines, seconds, cpu = asyncio.run(_drain(path, feed=True, queue=queue))
    return LiveRate(lines, seconds, cpu, read_cpu)
