"""Round-trip benchmarks: `run`'s memory over many round trips, `check` with 50 routes, and
how long IDLE (and polling) takes to notice a delivered probe.

`run` and `check` are the real CLI in a child process; the embedded stack they talk to runs in
another process (bench.stack), so their RSS and CPU are selfcheckd's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import random
import shutil
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import procs

SECRET = "bench-probe-secret-0123456789abcdef"  # noqa: S105 - signs probes to a local stack


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string for anything we write


def config_toml(routes: list[dict[str, Any]], *, interval: float, timeout: float,
                listen: str | None = None) -> str:
    """A selfcheckd config with these routes (TOML written by hand: tomllib only reads)."""
    out = ["[selfcheck]", f"interval = {interval!r}", f"timeout = {timeout!r}",
           f"secret = {toml_value(SECRET)}", ""]
    for route in routes:
        out.append("[[selfcheck.routes]]")
        tables = {k: v for k, v in route.items() if isinstance(v, dict)}
        out += [f"{k} = {toml_value(v)}" for k, v in route.items() if k not in tables]
        for name, table in tables.items():
            out.append(f"[selfcheck.routes.{name}]")
            out += [f"{k} = {toml_value(v)}" for k, v in table.items()]
        out.append("")
    if listen is not None:
        out += ["[server]", f"listen = {toml_value(listen)}", ""]
    out += ["[logging]", 'level = "warning"', ""]
    return "\n".join(out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def stacks(count: int) -> Iterator[list[dict[str, Any]]]:
    """`count` embedded stacks in a child process; yields their route tables."""
    proc = subprocess.Popen([sys.executable, "-m", "bench.stack", str(count)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        routes: list[dict[str, Any]] = json.loads(proc.stdout.readline())["routes"]
        yield routes
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _selfcheckd() -> str:
    return str(Path(sys.executable).parent / "selfcheckd")


# -- run: RSS after start and after N round trips --------------------------------------------
@dataclass
class Soak:
    runs: int
    failures: int
    samples: list[tuple[int, float]]  # (round trips after start-up, RSS MiB), first at 0
    seconds: float
    cpu: float  # selfcheckd's CPU over the measured round trips

    @property
    def rss_start(self) -> float:
        return self.samples[0][1]

    @property
    def rss_end(self) -> float:
        return self.samples[-1][1]

    @property
    def growth(self) -> float:
        return self.rss_end - self.rss_start

    @property
    def second_half_growth(self) -> float:
        """Growth over the second half only: a leak keeps growing, a warm-up does not."""
        middle = min(self.samples, key=lambda s: abs(s[0] - self.runs / 2))
        return self.rss_end - middle[1]


def _runs_total(port: int) -> tuple[float, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    ok = bad = 0.0
    for line in text.splitlines():
        if line.startswith("selfcheck_runs_total{"):
            value = float(line.rsplit(" ", 1)[1])
            if 'result="success"' in line:
                ok += value
            else:
                bad += value
    return ok, bad


def _reached(count: Callable[[], int], target: int) -> bool:
    return count() >= target


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout:g}s")
        time.sleep(0.2)


def soak(workdir: Path, runs: int, warmup: int = 20, points: int = 4) -> Soak:
    """`selfcheckd run` against one stack; RSS after `warmup` round trips ("after start-up"),
    then `points` times over the next `runs`."""
    with stacks(1) as routes:
        port = free_port()
        config = workdir / "soak.toml"
        config.write_text(config_toml(routes, interval=0.01, timeout=5,
                                      listen=f"127.0.0.1:{port}"))
        proc = subprocess.Popen([_selfcheckd(), "run", "--config", str(config)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            def total() -> int:
                try:
                    ok, bad = _runs_total(port)
                except OSError:
                    return -1
                return int(ok + bad)

            _wait(lambda: total() >= warmup, 60, f"{warmup} round trips")
            samples = [(0, procs.rss_mib(proc.pid))]
            cpu_start = procs.cpu_seconds(proc.pid)
            started = time.monotonic()
            for i in range(1, points + 1):
                target = warmup + runs * i // points
                _wait(functools.partial(_reached, total, target), 30 + runs * 0.5 / points,
                      f"{target} round trips")
                samples.append((total() - warmup, procs.rss_mib(proc.pid)))
            seconds = time.monotonic() - started
            cpu = procs.cpu_seconds(proc.pid) - cpu_start
            ok, bad = _runs_total(port)
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return Soak(int(ok + bad) - warmup, int(bad), samples, seconds, cpu)


# -- check: 50 routes in one invocation ------------------------------------------------------
@dataclass
class ManyRoutes:
    routes: int
    cpu_one: float  # `check` with one route: start-up plus one round trip
    cpu_many: float
    rss_many: float
    wall_many: float
    ok: int

    @property
    def cpu_per_round_trip(self) -> float:
        """Marginal CPU of one more route (start-up cancels out)."""
        return (self.cpu_many - self.cpu_one) / (self.routes - 1)


def many_routes(workdir: Path, count: int, repeat: int) -> ManyRoutes:
    with stacks(count) as routes:
        one, many = workdir / "check1.toml", workdir / f"check{count}.toml"
        one.write_text(config_toml(routes[:1], interval=600, timeout=20))
        many.write_text(config_toml(routes, interval=600, timeout=20))
        runs_one = [procs.run([_selfcheckd(), "check", "--config", str(one), "--json"])
                    for _ in range(repeat)]
        runs_many = [procs.run([_selfcheckd(), "check", "--config", str(many), "--json"])
                     for _ in range(repeat)]
    last = runs_many[-1]
    ok = sum(1 for line in last.stdout.splitlines() if json.loads(line).get("success"))
    return ManyRoutes(count, procs.median([r.cpu for r in runs_one]),
                      procs.median([r.cpu for r in runs_many]),
                      max(r.max_rss_mib for r in runs_many),
                      procs.median([r.wall for r in runs_many]), ok)


# -- IDLE vs polling: detected minus delivered -----------------------------------------------
@dataclass
class Detection:
    label: str
    samples: list[float]  # seconds from delivery into the mailbox to detection
    failures: int

    @property
    def p50(self) -> float:
        return procs.percentile(self.samples, 50)

    @property
    def p95(self) -> float:
        return procs.percentile(self.samples, 95)


class RecordingClock:
    """time.monotonic, remembering every reading: the check's detection moment is the reading
    `w` with `w - accepted_at == reception_time` (both are readings of this clock)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.readings: list[float] = []

    def __call__(self) -> float:
        now = self.clock()
        self.readings.append(now)
        return now

    def detected_at(self, reception_time: float) -> float | None:
        for i, accepted in enumerate(self.readings):
            for later in self.readings[i + 1:]:
                if later - accepted == reception_time:
                    return later
        return None


async def _detections(route: dict[str, Any], delivered: list[float], delays: list[float],
                      set_delay: Callable[[float], None]) -> tuple[list[float], int]:
    """One round trip per delay (the MTA holds the probe that long before delivering it)."""
    from daemon.checks.runner import Runner
    from daemon.config import Config
    from daemon.roundtrip.check import RoundTrip
    from daemon.roundtrip.probe import probe_secret

    cfg = Config.model_validate({"selfcheck": {"timeout": 10, "secret": SECRET,
                                               "routes": [route]}})
    secret = probe_secret(cfg.selfcheck)
    samples: list[float] = []
    failures = 0
    runner = Runner()
    for delay in delays:
        set_delay(delay)
        recorder = RecordingClock()
        check = RoundTrip(cfg.selfcheck.routes[0], cfg.selfcheck, secret, clock=recorder)
        delivered.clear()
        result = await runner.execute(check)
        detected = (None if result.reception_time is None
                    else recorder.detected_at(result.reception_time))
        if not result.success or detected is None or not delivered:
            failures += 1
            continue
        samples.append(detected - delivered[0])
    return samples, failures


def delays(count: int, seed: int = 5) -> list[float]:
    """How long the MTA holds each probe: uniform over most of a 2 s poll interval, so that
    polling shows its average wait and IDLE its push."""
    rnd = random.Random(seed)
    return [round(rnd.uniform(0.05, 1.95), 3) for _ in range(count)]


def _label(server: str, idle: bool) -> str:
    return f"{server}, {'IDLE' if idle else 'polling every 2 s'}"


async def embedded_detection(count: int, idle: bool) -> Detection:
    """pymap: the delivery moment is when the embedded SMTP server's append into pymap
    returns (recorded around the stack's deliver call, on the same monotonic clock); the
    embedded SMTP server's delivery_delay holds each probe."""
    from daemon.embedded.stack import EmbeddedMailStack, StackOptions

    delivered: list[float] = []
    async with EmbeddedMailStack(StackOptions()) as stack:
        deliver = stack.imap.deliver

        async def timed(user: str, data: bytes, mailbox: str = "INBOX") -> None:
            await deliver(user, data, mailbox)
            delivered.append(time.monotonic())

        stack.imap.deliver = timed  # type: ignore[method-assign]
        route = stack.route_table()
        route["imap"]["idle"] = idle  # type: ignore[index]

        def set_delay(seconds: float) -> None:
            stack.smtp.delivery_delay = seconds

        samples, failures = await _detections(route, delivered, delays(count), set_delay)
    return Detection(_label("pymap (embedded)", idle), samples, failures)


def dovecot_available() -> str | None:
    """Why the Dovecot lab cannot run here, or None when it can."""
    missing = [b for b in ("dovecot", "doveadm", "sendmail", "makemap", "m4")
               if shutil.which(b) is None and not Path(f"/usr/sbin/{b}").exists()]
    if missing:
        return f"not installed: {', '.join(missing)}"
    if os.geteuid() != 0:
        return "needs root (runs Dovecot and sendmail)"
    return None


class DelayingRelay:
    """An SMTP relay that answers 250 at once and forwards each message after a delay, as a
    queueing MTA would; sendmail in front of Dovecot delivers before it answers DATA."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        from aiosmtpd.controller import Controller

        self.upstream = upstream
        self.delay = 0.0
        self.timers: list[threading.Timer] = []
        self.port = free_port()
        self.controller = Controller(self, hostname="127.0.0.1", port=self.port)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        timer = threading.Timer(self.delay, self._forward, args=(
            envelope.mail_from, list(envelope.rcpt_tos), bytes(envelope.original_content)))
        timer.start()
        self.timers.append(timer)
        return "250 2.0.0 queued"

    def _forward(self, sender: str, rcpts: list[str], data: bytes) -> None:
        with smtplib.SMTP(*self.upstream, timeout=30) as smtp:
            smtp.sendmail(sender, rcpts, data)

    def __enter__(self) -> tuple[str, int]:
        self.controller.start()
        return "127.0.0.1", self.port

    def __exit__(self, *exc: object) -> None:
        for timer in self.timers:
            timer.join(30)
        self.controller.stop()


async def dovecot_detection(workdir: Path, count: int, idle: bool) -> Detection:
    """Dovecot behind sendmail (tests/integration/dovecot_lab.py), a delaying relay in front:
    the delivery moment is when the message file appears in the maildir (a 1 ms watch)."""
    from tests.integration.dovecot_lab import DovecotLab

    labdir = Path(tempfile.mkdtemp(prefix=f"dovecot-lab-{'idle' if idle else 'poll'}-",
                                   dir=workdir))
    # Dovecot's mail processes (uid 8) must reach the maildir: a directory of its own in /tmp.
    base = Path(tempfile.mkdtemp(prefix="selfcheckd-bench-dovecot-"))
    try:
        lab = DovecotLab.start(labdir, base)
    except BaseException:
        shutil.rmtree(base, ignore_errors=True)
        raise
    delivered: list[float] = []
    stop = threading.Event()
    try:
        def watch() -> None:
            seen = {str(p) for p in lab.message_files()}
            while not stop.is_set():
                now = {str(p) for p in lab.message_files()}
                if now - seen:
                    delivered.append(time.monotonic())
                seen = now
                time.sleep(0.001)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        relay = DelayingRelay((lab.smtp_host, lab.smtp_port))
        with relay as (host, port):
            route = {
                "name": "dovecot", "from": lab.sender, "to": lab.recipient,
                "smtp": {"host": host, "port": port, "security": "none"},
                "imap": {"host": lab.imap_host, "port": lab.imap_port,
                         "security": "starttls", "ca_file": str(lab.ca_file),
                         "username": lab.username, "password": lab.password, "idle": idle},
            }

            def set_delay(seconds: float) -> None:
                relay.delay = seconds

            samples, failures = await _detections(route, delivered, delays(count), set_delay)
    finally:
        stop.set()
        lab.stop()
        shutil.rmtree(base, ignore_errors=True)
    return Detection(_label("Dovecot 2.3 (sendmail + LMTP)", idle), samples, failures)


def detection(workdir: Path, count: int) -> list[Detection]:
    out = [asyncio.run(embedded_detection(count, idle=True)),
           asyncio.run(embedded_detection(count, idle=False))]
    if dovecot_available() is None:
        out.append(asyncio.run(dovecot_detection(workdir, count, idle=True)))
        out.append(asyncio.run(dovecot_detection(workdir, count, idle=False)))
    return out
