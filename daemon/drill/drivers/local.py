"""The local driver: a cluster of processes on this machine, each task a set of command lines.

`[drill.local] start` runs one task (`{task}` a fresh name, `{task_dir}` its own
directory under `work_dir`); `mailq` and `run_queue` act on one. The driver
starts `replicas` tasks at preflight and stops what it started when the drill
ends. A task is steady when its process is alive and its `mailq` answers: exits 0
with a queue listing (Debian's `mailq` exits 0 whatever happened, so the listing
is what counts: daemon.drill.mailq.unanswered).
Stopping one is SIGTERM to its process group, SIGKILL after `stop_grace`; the
replacement (as ECS starts one) is the same `start` under a new name.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import secrets
import shutil
import signal
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import structlog

from daemon.drill.config import LocalDriver
from daemon.drill.driver import DrillAbortedError, Recorder, Steady
from daemon.drill.mailq import unanswered

log = structlog.get_logger("daemon.drill.local")

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]
MAX_OUTPUT = 256 * 1024  # of one mailq or queue run kept in memory
STEADY_POLL = 0.5


@dataclass
class LocalTask:
    name: str
    directory: Path
    process: asyncio.subprocess.Process
    log_file: IO[bytes]

    def alive(self) -> bool:
        return self.process.returncode is None


class LocalCluster:
    """`replicas` tasks kept running from `[drill.local]`'s command lines."""

    name = "local cluster"

    def __init__(self, cfg: LocalDriver, *, settle_timeout: float = 300.0,
                 clock: Clock = time.monotonic, sleep: Sleep = asyncio.sleep) -> None:
        self.cfg = cfg
        self.settle_timeout = settle_timeout
        self.clock = clock
        self.sleep = sleep
        self.tasks_: dict[str, LocalTask] = {}
        self.stopped: list[str] = []
        self._numbers = itertools.count(1)
        self._run = secrets.token_hex(2)
        self._own_dir = cfg.work_dir is None
        self.work_dir = cfg.work_dir or Path(tempfile.mkdtemp(prefix="selfcheckd-drill-"))
        self._record: Recorder = lambda _call: None

    def _fill(self, argv: list[str], task: str, task_dir: Path) -> list[str]:
        return [a.replace("{task}", task).replace("{task_dir}", str(task_dir)) for a in argv]

    # -- the Cluster protocol ------------------------------------------------------------

    async def open(self, record: Recorder) -> None:
        self._record = record
        self.work_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(self.cfg.replicas):
            await self._start_task()
        await self._wait_ready(self.settle_timeout)

    async def close(self, interrupted: bool = False) -> None:
        # After a signal the whole exit fits in ECS' 30 s: a short grace.
        grace = min(self.cfg.stop_grace, 2.0) if interrupted else self.cfg.stop_grace
        for task in list(self.tasks_.values()):
            await self._stop(task, grace)
        self.tasks_.clear()
        if self._own_dir and os.environ.get("SELFCHECKD_KEEP_DRILL_DIR") != "1":
            await asyncio.to_thread(shutil.rmtree, self.work_dir, True)

    async def tasks(self) -> list[str]:
        return sorted(name for name, task in self.tasks_.items() if task.alive())

    def can_exec(self, task: str) -> bool:
        return True

    async def mailq(self, task: str) -> str:
        return await self._command("mailq", self.cfg.mailq, task)

    async def run_queue(self, task: str) -> str:
        return await self._command("run_queue", self.cfg.run_queue, task)

    async def stop_task(self, task: str, reason: str) -> None:
        found = self.tasks_.get(task)
        if found is None:
            raise DrillAbortedError(f"local cluster: no task {task}")
        self._record({"call": "local:stop_task", "task": task, "reason": reason,
                      "signal": "SIGTERM", "grace": self.cfg.stop_grace})
        code = await self._stop(found, self.cfg.stop_grace)
        self.stopped.append(task)
        del self.tasks_[task]
        self._record({"call": "local:task_exited", "task": task, "exit_code": code})
        await self._start_task()  # as ECS does for a service below its desired count

    async def wait_steady(self, timeout: float, gone: str) -> Steady:
        await self._wait_ready(timeout)
        tasks = await self.tasks()
        return Steady(tasks=tasks, desired=self.cfg.replicas, running=len(tasks))

    # -- processes -----------------------------------------------------------------------

    async def _start_task(self) -> LocalTask:
        name = f"task-{next(self._numbers)}-{self._run}"
        directory = self.work_dir / name
        directory.mkdir(parents=True, exist_ok=True)
        argv = self._fill(self.cfg.start, name, directory)
        log_file = (directory / "task.log").open("ab")
        self._record({"call": "local:start_task", "task": name, "argv": argv})
        try:
            process = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                start_new_session=True, cwd=directory)
        except OSError as exc:
            log_file.close()
            raise DrillAbortedError(f"local cluster: cannot start {argv[0]}: "
                                    f"{exc.strerror or exc}") from None
        task = LocalTask(name, directory, process, log_file)
        self.tasks_[name] = task
        return task

    async def _stop(self, task: LocalTask, grace: float) -> int | None:
        try:
            if task.alive():
                _signal_group(task.process.pid, signal.SIGTERM)
                try:
                    async with asyncio.timeout(grace):
                        await task.process.wait()
                except TimeoutError:
                    _signal_group(task.process.pid, signal.SIGKILL)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(5):
                            await task.process.wait()
            _signal_group(task.process.pid, signal.SIGKILL)  # what the group still holds
        finally:
            task.log_file.close()
        return task.process.returncode

    async def _wait_ready(self, timeout: float) -> None:
        """Every replica alive (dead ones replaced) and answering mailq; else Aborted."""
        deadline = self.clock() + timeout
        problem = "not started"
        while True:
            for name, task in list(self.tasks_.items()):
                if not task.alive():
                    self._record({"call": "local:task_died", "task": name,
                                  "exit_code": task.process.returncode})
                    task.log_file.close()
                    del self.tasks_[name]
            while len(self.tasks_) < self.cfg.replicas:
                await self._start_task()
            problem = ""
            for name in sorted(self.tasks_):
                try:
                    text = await self._command("mailq", self.cfg.mailq, name, record=False)
                except DrillAbortedError as exc:
                    problem = str(exc)
                    break
                # Debian's mailq exits 0 even when it cannot read its cf or queue yet
                # (a start command still writing {task_dir}/sendmail.cf): not ready.
                said = unanswered(text)
                if said is not None:
                    problem = f"mailq on {name} gave no queue listing: {said}"
                    break
            if not problem:
                return
            if self.clock() >= deadline:
                raise DrillAbortedError(f"local cluster not steady within {timeout:g} s: "
                                        f"{problem}")
            await self.sleep(STEADY_POLL)

    async def _command(self, what: str, template: list[str], task: str,
                       record: bool = True) -> str:
        found = self.tasks_.get(task)
        if found is None or not found.alive():
            raise DrillAbortedError(f"local cluster: task {task} is not running")
        argv = self._fill(template, task, found.directory)
        if record:
            self._record({"call": f"local:{what}", "task": task, "argv": argv})
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, cwd=found.directory)
        except OSError as exc:
            raise DrillAbortedError(f"{what} on {task}: cannot run {argv[0]}: "
                                    f"{exc.strerror or exc}") from None
        try:
            async with asyncio.timeout(self.cfg.command_timeout):
                output = await _read_bounded(proc)
                code = await proc.wait()
        except TimeoutError:
            raise DrillAbortedError(f"{what} on {task}: no end within "
                                    f"{self.cfg.command_timeout:g} s") from None
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                with contextlib.suppress(Exception):
                    await asyncio.shield(proc.wait())
        text = output.decode("utf-8", errors="replace")
        if code != 0:
            raise DrillAbortedError(f"{what} on {task} exited {code}: "
                                    f"{text.strip()[-300:] or 'no output'}")
        return text


async def _read_bounded(proc: asyncio.subprocess.Process) -> bytes:
    """All of stdout, keeping at most MAX_OUTPUT bytes (the rest is read and dropped)."""
    assert proc.stdout is not None
    kept = bytearray()
    while chunk := await proc.stdout.read(65536):
        if len(kept) < MAX_OUTPUT:
            kept += chunk[: MAX_OUTPUT - len(kept)]
    return bytes(kept)


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)

