"""A leak flood while the alert webhook is down, then healed: `selfcheckd run`'s memory, and how
many of the leaks reach the operator.

    .venv/bin/python -m bench.flood [--leaks 200000] [--limit-mib 512] [--down 120]
                                    [--heal-timeout 900] [--kill-after S] [--code DIR]
                                    [--workdir DIR]

`selfcheckd run` (the real CLI, a child process) follows a mail log with its leak watcher and
alerts a real aiohttp receiver in this process. The receiver answers 503 (alert_sink down
with the same incident) while the bench appends `--leaks` leaked messages (a `from=` and a
`to=` line each, unique queue ids) at `--rate` leaks/s, and for `--down` seconds after the
last one; then it answers 200 until every leak is accounted for or `--heal-timeout` passes.

The task's memory limit is enforced the way ECS does it, without a cgroup: the child's
resident set (VmRSS) is sampled every 50 ms, and past `--limit-mib` it is killed (SIGKILL)
and started again on the same config and state file, like an OOM-killed task replaced by
the service. Its peak (VmHWM, the kernel's own high-water mark) is read before every kill
and at the end, so no spike between samples is missed.

Accounted leaks: each accepted alert whose summary is one leak counts 1 (by id, so a repeat
counts once), each accepted digest counts the number its summary starts with. `--code DIR`
runs the daemon from another checkout (`python -m daemon.cli` with DIR first on the path),
which is how the "before" row in docs/benchmarks.md was measured.

Exit status 0 when the run completed (whatever the numbers), 1 when it could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import ClientError, ClientSession, web

from bench.roundtrips import free_port, toml_value

ROOT = Path(__file__).resolve().parents[1]
# "12,345 further alerts ..." (this release) or "12345 further alerts ..." (earlier ones).
_DIGEST = re.compile(r"^([\d,]+) further alerts")
SAMPLE = 0.05


@dataclass
class Receiver:
    """A stand-in for alert_sink: 503 while down, then 200; remembers what it accepted."""

    up: bool = False
    requests: int = 0
    refused: int = 0
    leaks: set[str] = field(default_factory=set)  # ids of accepted single-leak alerts
    digests: dict[str, int] = field(default_factory=dict)  # id -> leaks it counts
    others: set[str] = field(default_factory=set)  # warnings and anything else
    first_accept: float | None = None
    last_accept: float | None = None

    @property
    def accounted(self) -> int:
        return len(self.leaks) + sum(self.digests.values())

    async def handle(self, request: web.Request) -> web.Response:
        body: dict[str, Any] = await request.json()
        self.requests += 1
        if not self.up:
            self.refused += 1
            return web.json_response({"ok": False}, status=503)
        now = time.monotonic()
        self.first_accept = self.first_accept or now
        self.last_accept = now
        summary, alert_id = str(body.get("summary", "")), str(body.get("id"))
        if (m := _DIGEST.match(summary)) is not None:
            self.digests[alert_id] = int(m.group(1).replace(",", ""))
        elif summary.startswith("sinkhole leak:"):
            self.leaks.add(alert_id)
        else:
            self.others.add(alert_id)
        return web.json_response({"ok": True})


def leak_lines(start: int, count: int) -> str:
    """`count` leaked messages: a from= and a to= line each, unique queue ids."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
    out = []
    for i in range(start, start + count):
        qid = f"6BF{i:011d}"
        out.append(f"{stamp} ip-10-0-1-5 sendmail[10773]: {qid}: from=<app@example.com>, "
                   "size=237, class=0, nrcpts=1, msgid=<m@x>, proto=ESMTP, daemon=MTA, "
                   "relay=localhost\n")
        out.append(f"{stamp} ip-10-0-1-5 sendmail[10775]: {qid}: to=<nobody-{i}@sinkhole.test>"
                   ", delay=00:00:00, xdelay=00:00:00, mailer=smtp, pri=30237, relay=sinkhole."
                   "cabal.internal. [10.0.0.2], dsn=4.0.0, stat=Deferred: 421 4.3.2 Service "
                   "temporarily unavailable\n")
    return "".join(out)


def config(workdir: Path, url: str, port: int, max_backoff: float) -> str:
    log, state = workdir / "maillog", workdir / "leakwatch-state.json"
    lines = [
        "shutdown_grace = 20",
        "[server]", f"listen = {toml_value(f'127.0.0.1:{port}')}",
        "[logging]", 'level = "info"',
        "[leakwatch]", 'source = "file"', f"state_file = {toml_value(str(state))}",
        "[leakwatch.file]", f"path = {toml_value(str(log))}", "poll_interval = 0.5",
        "[leakwatch.alert]", f"url = {toml_value(url)}", f"max_backoff = {max_backoff!r}",
    ]
    return "\n".join(lines) + "\n"


def status(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of a running process, MiB."""
    out: dict[str, float] = {}
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return out


@dataclass
class Flood:
    leaks: int
    limit_mib: float
    peak_rss_mib: float = 0.0  # the highest VmHWM of any life of the daemon
    phase: str = "start"
    phase_peaks: dict[str, float] = field(default_factory=dict)  # highest VmRSS sampled
    final_rss_mib: float = 0.0
    kills: int = 0  # killed past the limit (an OOM kill on ECS)
    sigkills: int = 0  # killed on purpose (--kill-after)
    crashes: int = 0  # exited on its own
    lives: int = 0
    biggest_state_mib: float = 0.0
    quarantined: list[str] = field(default_factory=list)
    written_at: float = 0.0  # seconds from start until the last leak was written
    healed_at: float = 0.0
    accounted_at: float | None = None  # seconds from the heal until every leak was accounted
    events: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


class Daemon:
    """`selfcheckd run` as a child, restarted like an ECS service restarts a killed task."""

    def __init__(self, cfg: Path, workdir: Path, code: Path | None, result: Flood) -> None:
        self.cfg, self.workdir, self.code, self.result = cfg, workdir, code, result
        self.proc: asyncio.subprocess.Process | None = None
        self._killed = False
        self._log = (workdir / "daemon.log").open("ab")

    async def start(self) -> None:
        if self.code is not None:  # another checkout: its `daemon` package first on the path
            cmd = [sys.executable, "-m", "daemon.cli", "run", "--config", str(self.cfg)]
            cwd = str(self.code)
        else:
            cmd = [str(Path(sys.executable).parent / "selfcheckd"), "run", "--config",
                   str(self.cfg)]
            cwd = str(self.workdir)
        self.proc = await asyncio.create_subprocess_exec(
            *cmd, cwd=cwd, stdin=asyncio.subprocess.DEVNULL, stdout=self._log,
            stderr=self._log)
        self.result.lives += 1

    def sample(self) -> None:
        """Note the peak; kill past the limit (and start again, as ECS would)."""
        assert self.proc is not None
        mem = status(self.proc.pid)
        r = self.result
        r.peak_rss_mib = max(r.peak_rss_mib, mem.get("VmHWM", 0.0))
        r.phase_peaks[r.phase] = max(r.phase_peaks.get(r.phase, 0.0), mem.get("VmRSS", 0.0))
        r.final_rss_mib = mem.get("VmRSS", r.final_rss_mib)
        if mem.get("VmRSS", 0.0) > self.result.limit_mib:
            self.proc.send_signal(signal.SIGKILL)
            self._killed = True
            self.result.kills += 1

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self._killed = True
        self.result.sigkills += 1

    async def supervise(self) -> None:
        while True:
            assert self.proc is not None
            if self.proc.returncode is not None:
                self.result.crashes += 0 if self._killed else 1
                self._killed = False
                await self.start()
            self.sample()
            await asyncio.sleep(SAMPLE)

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.sample()
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 40)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        self._log.close()


async def polling(port: int, timeout: float) -> None:
    """Wait until the daemon's leak watcher has read the log once (its /metrics says so)."""
    deadline = time.monotonic() + timeout
    async with ClientSession() as session:
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ClientError):
                async with session.get(f"http://127.0.0.1:{port}/metrics") as resp:
                    for line in (await resp.text()).splitlines():
                        if line.startswith("leakwatch_last_poll_success_timestamp_seconds ") \
                                and float(line.split()[1]) > 0:
                            return
            await asyncio.sleep(0.2)
    raise TimeoutError(f"the daemon's leak watcher did not read within {timeout:g}s")


def _count_events(path: Path) -> dict[str, int]:
    wanted = ("sinkhole_leak_detected", "alert_expired", "state_file_quarantined",
              "state_file_write_failed", "state_file_shed", "alerts_folded", "alerts_restored",
              "component_crashed", "Traceback")
    counts = dict.fromkeys(wanted, 0)
    with path.open("rb") as fh:
        for raw in fh:
            line = raw.decode("utf-8", "replace")
            for word in wanted:
                if word in line:
                    counts[word] += 1
    return counts


async def flood(args: argparse.Namespace, workdir: Path, code: Path | None) -> Flood:
    result = Flood(args.leaks, args.limit_mib)
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/alert", receiver.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/alert"
    log = workdir / "maillog"
    log.write_text("")
    state = workdir / "leakwatch-state.json"
    cfg = workdir / "selfcheckd.toml"
    port = free_port()
    cfg.write_text(config(workdir, url, port, args.max_backoff))
    daemon = Daemon(cfg, workdir, code, result)
    started = time.monotonic()
    await daemon.start()
    supervising = asyncio.create_task(daemon.supervise())

    async def watch_state() -> None:
        while True:
            with contextlib.suppress(OSError):
                result.biggest_state_mib = max(result.biggest_state_mib,
                                               state.stat().st_size / 2**20)
            await asyncio.sleep(0.5)

    watching = asyncio.create_task(watch_state())
    try:
        # The watcher starts at the end of the log (like tail -F): flood only once it reads.
        await polling(port, timeout=60)
        result.phase = "flood"
        chunk = max(1, int(args.rate * 0.25))
        written = 0
        while written < args.leaks:
            n = min(chunk, args.leaks - written)
            with log.open("a") as fh:
                fh.write(leak_lines(written, n))
            written += n
            await asyncio.sleep(0.25)
        result.written_at = time.monotonic() - started
        print(f"flood: {written:,} leaks written in {result.written_at:.0f} s; webhook down "
              f"{args.down:g} s more", file=sys.stderr)
        result.phase = "down"
        if args.kill_after is not None and args.kill_after < args.down:
            await asyncio.sleep(args.kill_after)
            daemon.kill()  # a host lost or a kill past stopTimeout: no final save
            await asyncio.sleep(args.down - args.kill_after)
        else:
            await asyncio.sleep(args.down)
        result.phase = "healed"
        receiver.up = True
        healed = time.monotonic()
        result.healed_at = healed - started
        print("flood: webhook healed", file=sys.stderr)
        while time.monotonic() - healed < args.heal_timeout:
            if receiver.accounted >= args.leaks:
                result.accounted_at = time.monotonic() - healed
                break
            await asyncio.sleep(1)
        await asyncio.sleep(2)  # what is still in flight
    finally:
        supervising.cancel()
        watching.cancel()
        for task in (supervising, watching):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await daemon.stop()
        await runner.cleanup()
    result.seconds = time.monotonic() - started
    result.events["receiver_requests"] = receiver.requests
    result.events["receiver_refused"] = receiver.refused
    result.events["accepted_leak_alerts"] = len(receiver.leaks)
    result.events["accepted_digests"] = len(receiver.digests)
    result.events["accepted_other"] = len(receiver.others)
    result.events["accounted_leaks"] = receiver.accounted
    return result


def run_flood(workdir: Path, **settings: Any) -> Flood:
    """One flood in `workdir` (the command-line defaults, `settings` overriding them)."""
    args = _parser().parse_args([])
    for name, value in settings.items():
        setattr(args, name, value)
    code = Path(args.code).resolve() if args.code else None
    r = asyncio.run(flood(args, workdir, code))
    r.quarantined = sorted(p.name for p in workdir.glob("leakwatch-state.json.corrupt-*"))
    r.events = {**_count_events(workdir / "daemon.log"), **r.events}
    return r


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--leaks", type=int, default=200_000)
    parser.add_argument("--rate", type=float, default=10_000.0, help="leaks written per second")
    parser.add_argument("--limit-mib", type=float, default=512.0)
    parser.add_argument("--down", type=float, default=120.0,
                        help="seconds the webhook stays down after the last leak")
    parser.add_argument("--heal-timeout", type=float, default=900.0)
    parser.add_argument("--max-backoff", type=float, default=60.0,
                        help="[leakwatch.alert] max_backoff (the default 300 only lengthens "
                             "the heal)")
    parser.add_argument("--kill-after", type=float,
                        help="SIGKILL the daemon this many seconds into the down phase (it "
                             "is started again at once): at-least-once across a kill")
    parser.add_argument("--code", help="run the daemon from this checkout instead")
    parser.add_argument("--workdir", help="keep the log, state and daemon log here")
    return parser


def main() -> int:
    args = _parser().parse_args()
    with contextlib.ExitStack() as stack:
        if args.workdir:
            workdir = Path(args.workdir)
            workdir.mkdir(parents=True, exist_ok=True)
            for old in ("maillog", "daemon.log", "leakwatch-state.json"):
                (workdir / old).unlink(missing_ok=True)
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="flood-")))
        try:
            r = run_flood(workdir, **{k: v for k, v in vars(args).items() if k != "workdir"})
        except Exception as exc:  # the bench's own failure: say so, exit 1
            print(f"flood: could not run: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
    print(json.dumps({"leaks": r.leaks, "limit_mib": r.limit_mib,
                      "peak_rss_mib": round(r.peak_rss_mib, 1),
                      "rss_peaks_by_phase_mib": {k: round(v, 1) for k, v in r.phase_peaks.items()},
                      "rss_at_end_mib": round(r.final_rss_mib, 1), "kills": r.kills,
                      "sigkills": r.sigkills,
                      "crashes": r.crashes, "lives": r.lives,
                      "biggest_state_mib": round(r.biggest_state_mib, 2),
                      "quarantined": r.quarantined, "written_at_s": round(r.written_at, 1),
                      "healed_at_s": round(r.healed_at, 1),
                      "accounted_after_heal_s": None if r.accounted_at is None
                      else round(r.accounted_at, 1),
                      "seconds": round(r.seconds, 1), **r.events}, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
