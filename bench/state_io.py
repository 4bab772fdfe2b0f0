"""State saves: the worker process (daemon/state_io.py) against the thread it replaced,
and what a frozen state volume does to a stop.

- latency: `StateFile.save` (encode in a thread, write in a worker process) against
  the previous save (encode and write in a daemon thread), alternated, the same
  documents (a quiet watcher's, 1 MB, and the biggest the bounded sections make), on the
  work directory's file system. CPU is this process's plus its children's.
- frozen (root, loop devices, fsfreeze): a loop-mounted ext4 frozen with `fsfreeze`, where
  a write waits in the kernel (D state) until the thaw. How long after its last line a
  process whose thread is stuck there takes to exit (the old save: held until the thaw);
  how long `selfcheckd run` takes to exit after SIGTERM with its save stuck there; and the
  same daemon as PID 1 of a PID namespace, as in a container (the namespace ends only
  when its stuck worker does).
"""

from __future__ import annotations

import asyncio
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.metrics import Metrics
from daemon.state import VERSION, StateFile
from daemon.threads import in_daemon_thread

LEAK = ("2026-11-23T19:31:53.567357+00:00 vm sendmail[11287]: 6ANJVrcF011285: "
        "to=<nobody@sinkhole.test>, delay=00:00:00, mailer=smtp, pri=30237, relay=25, "
        "dsn=4.0.0, stat=Deferred\n")


def document(messages: int) -> dict[str, Any]:
    """A state document with `messages` queue messages (about 370 bytes each)."""
    return {
        "cloudwatch": {"cursor_ms": 1795462313000,
                       "seen": [[f"3{i:055d}", 1795462313000] for i in range(50)]},
        "detector": {"senders": [[f"6ANJUQna{i:06d}", f"app{i}@example.com"]
                                 for i in range(min(messages, 20_000))],
                     "reported": [f"6ANJUQna{i:06d} nobody@sinkhole.test"
                                  for i in range(min(messages, 200))]},
        "outbox": [],
        "queue": {"messages": [
            {"queue_id": f"6ANJUQna{i:06d}", "sender": f"app{i}@example.com",
             "first_seen": 1795462313.0, "last_seen": 1795462313.0,
             "hosts": ["ip-10-0-1-5"], "log_streams": ["smtp-out/smtp-out/abc123"],
             "recipients": [{"address": f"rcpt{i}@example.net", "result": "deferred",
                             "stat": "Deferred: 421 4.3.2 Service temporarily unavailable",
                             "attempts": 3, "seen": 1795462313.0}]}
            for i in range(messages)]},
    }


def _old_write(path: Path, document: dict[str, Any]) -> None:
    """The save as it was before the worker process (the same steps, in the caller's thread)."""
    import json

    payload = json.dumps(document, separators=(",", ":"))
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


@dataclass
class Latency:
    label: str
    size: int  # bytes of the saved document
    thread: list[float] = field(default_factory=list)
    worker: list[float] = field(default_factory=list)
    thread_cpu: float = 0.0  # per save
    worker_cpu: float = 0.0


def _cpu() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else float("nan")


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))] if ordered else float("nan")


async def _latency(workdir: Path, label: str, messages: int, runs: int) -> Latency:
    doc = document(messages)
    state = StateFile(workdir / f"state-{label}.json", Metrics())
    old = workdir / f"old-{label}.json"
    result = Latency(label, 0)
    for _ in range(runs):  # alternated, so drift in the machine hits both
        started, cpu = time.perf_counter(), _cpu()
        await in_daemon_thread(_old_write, old, {"version": VERSION, **doc})
        result.thread.append(time.perf_counter() - started)
        result.thread_cpu += _cpu() - cpu
        started, cpu = time.perf_counter(), _cpu()
        if not await state.save(doc, timeout=60):
            raise RuntimeError(f"save failed: {state.last_error}")
        result.worker.append(time.perf_counter() - started)
        result.worker_cpu += _cpu() - cpu
    result.size = (workdir / f"state-{label}.json").stat().st_size
    result.thread_cpu /= runs
    result.worker_cpu /= runs
    return result


def save_latency(workdir: Path, small: bool) -> list[Latency]:
    sizes = [("quiet", 0, 10 if small else 50), ("1 MB", 2_700, 5 if small else 30),
             ("20,000 messages", 20_000, 3 if small else 10)]
    return [asyncio.run(_latency(workdir, label, n, runs)) for label, n, runs in sizes]


# -- a frozen volume ---------------------------------------------------------------------------
def frozen_available() -> str | None:
    """Why the frozen-volume measures cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (a loop mount and fsfreeze)"
    for tool in ("mkfs.ext4", "fsfreeze", "mount", "umount", "unshare"):
        if shutil.which(tool) is None and shutil.which(tool, path="/usr/sbin:/sbin") is None:
            return f"{tool} not installed"
    return None


def _tool(name: str) -> str:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin") or name


class _Volume:
    def __init__(self, base: Path) -> None:
        self.image, self.mount = base / "volume.img", base / "mnt"
        with self.image.open("wb") as fh:
            fh.truncate(16 << 20)
        subprocess.run([_tool("mkfs.ext4"), "-q", "-F", str(self.image)], check=True,
                       capture_output=True)
        self.mount.mkdir(exist_ok=True)
        subprocess.run([_tool("mount"), "-o", "loop", str(self.image), str(self.mount)],
                       check=True, capture_output=True)
        self.frozen = False

    def freeze(self) -> None:
        subprocess.run([_tool("fsfreeze"), "-f", str(self.mount)], check=True)
        self.frozen = True

    def thaw(self) -> None:
        if self.frozen:
            subprocess.run([_tool("fsfreeze"), "-u", str(self.mount)], check=True)
            self.frozen = False

    def close(self) -> None:
        self.thaw()
        subprocess.run([_tool("umount"), "--lazy", str(self.mount)], check=False,
                       capture_output=True)


def _stuck(pid: int) -> bool:
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except FileNotFoundError:
        return False
    for task in tasks:
        try:
            if (task / "stat").read_text().rsplit(")", 1)[1].split()[0] == "D":
                return True
        except OSError:
            continue
    return False


def _descendants(pid: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int(
                    (entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        kids = [p for p, pp in parents.items() if pp == parent]
        found += kids
        frontier += kids
    return found


def _wait(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.02)


@dataclass
class Frozen:
    hold: float  # seconds the volume stayed frozen after the stop began
    thread_exit: float  # a process whose thread writes there: its end, after its last line
    daemon_exit: float  # `selfcheckd run`: exit after SIGTERM
    daemon_stopped_line: bool
    pid1_stopped: float  # as PID 1 of a namespace: its selfcheckd_stopped line after SIGTERM
    pid1_namespace_end: float  # ... and the end of the namespace (what a container runtime sees)


def _thread_exit(volume: _Volume, hold: float) -> float:
    script = (
        "import os, threading, time\n"
        "def save():\n"
        f"    fd = os.open({str(volume.mount / 'thread.tmp')!r}, os.O_CREAT | os.O_WRONLY, 0o600)\n"
        "    os.write(fd, b'state'); os.fsync(fd)\n"
        "threading.Thread(target=save, daemon=True).start()\n"
        "time.sleep(0.5)\n"
        "print('last line', flush=True)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    proc.stdout.readline()
    said = time.monotonic()
    time.sleep(hold)
    volume.thaw()
    proc.wait()
    took = time.monotonic() - said
    volume.freeze()
    return took


def _daemon(volume: _Volume, workdir: Path, name: str, pid1: bool,
            hold: float) -> tuple[float, float, bool]:
    maillog, state = workdir / f"{name}.maillog", volume.mount / f"{name}.json"
    maillog.write_text("")
    config, log = workdir / f"{name}.toml", workdir / f"{name}.log"
    config.write_text(
        'shutdown_grace = 5\n[server]\nlisten = "127.0.0.1:0"\n'
        f'[leakwatch]\nsource = "file"\nstate_file = "{state}"\n'
        f'file = {{ path = "{maillog}", poll_interval = 0.1 }}\n')
    argv = [sys.executable, "-m", "daemon.cli", "run", "--config", str(config)]
    if pid1:
        argv = [_tool("unshare"), "--pid", "--fork", "--mount-proc", *argv]
    volume.thaw()
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=out)
    try:
        _wait(state.exists, 60)
        volume.freeze()
        with maillog.open("a") as fh:
            fh.write(LEAK)
        _wait(lambda: any(_stuck(p) for p in [proc.pid, *_descendants(proc.pid)]), 60)
        daemon = proc.pid
        if pid1:  # the daemon is unshare's child
            daemon = next(p for p in _descendants(proc.pid)
                          if b"daemon.cli" in Path(f"/proc/{p}/cmdline").read_bytes())
        os.kill(daemon, signal.SIGTERM)
        sent = time.monotonic()
        stopped: float | None = None
        ended: float | None = None
        while time.monotonic() - sent < hold:
            if stopped is None and "selfcheckd_stopped" in log.read_text():
                stopped = time.monotonic() - sent
            if ended is None and proc.poll() is not None:
                ended = time.monotonic() - sent
            time.sleep(0.02)
        volume.thaw()
        proc.wait(timeout=60)
        if ended is None:
            ended = time.monotonic() - sent
        if stopped is None and "selfcheckd_stopped" in log.read_text():
            stopped = ended
        return (stopped if stopped is not None else float("nan"), ended,
                "leakwatch_state_not_saved" in log.read_text())
    finally:
        volume.thaw()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def frozen_stop(workdir: Path, hold: float) -> Frozen:
    base = Path(tempfile.mkdtemp(prefix="frozen-", dir=workdir))
    volume = _Volume(base)
    try:
        volume.freeze()
        thread_exit = _thread_exit(volume, hold)
        _, daemon_exit, said = _daemon(volume, base, "daemon", pid1=False, hold=hold)
        pid1_stopped, pid1_end, _ = _daemon(volume, base, "pid1", pid1=True, hold=hold)
        return Frozen(hold, thread_exit, daemon_exit, said, pid1_stopped, pid1_end)
    finally:
        volume.close()
        shutil.rmtree(base, ignore_errors=True)
