"""Every read and write of the state volume, done by a child process the daemon can abandon.

A write to a frozen volume (a stalled EFS/NFS hard mount) waits in the kernel and no
signal ends it until the volume answers. A thread stuck like that held the whole daemon:
`selfcheckd_stopped` was logged after SIGTERM, but the process could not exit (a process
ends only when all its threads do), not even on SIGKILL. So each operation runs in a
fresh child process (daemon/state_worker.py) under a deadline. When it misses it, the
child is sent SIGKILL and abandoned: if the kernel holds it, it holds only the child,
and the daemon goes on, and exits on time.

At most one child is alive at a time: the next operation gives an abandoned one a
moment to end (a killed healthy child is gone in milliseconds); while it is still
stuck, the operation fails (`VolumeStuckError`) instead of starting another that would
get stuck the same way. Writes are therefore never reordered: one the daemon gave up on
may still land when the volume thaws, but no later one can have landed before it.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

WORKER = Path(__file__).with_name("state_worker.py")
# -I: no environment, user site or current directory; -S: no site-packages. The worker
# needs only the standard library, and starts in a few tens of milliseconds.
DEFAULT_COMMAND = (sys.executable, "-I", "-S", str(WORKER))
# How long the next operation waits for an abandoned (killed) worker to end.
KILL_GRACE = 1.0
# What a worker may answer besides a file's bytes; and what it may say on stderr.
_ANSWER_SLACK = 64 * 1024
_STDERR_KEPT = 2000


class VolumeError(OSError):
    """An operation on the state volume did not complete; `str()` says why."""


class VolumeTimeoutError(VolumeError):
    """The worker did not answer within the deadline: abandoned."""


class VolumeStuckError(VolumeError):
    """An earlier worker, abandoned, is still alive: the volume has not answered since."""


class _Worker(asyncio.SubprocessProtocol):
    """Collects one worker's answer; `done` resolves once it exited and its pipes closed."""

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: int) -> None:
        self.done: asyncio.Future[None] = loop.create_future()
        self.limit = limit
        self.out = bytearray()
        self.err = bytearray()
        self.overflow = False

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        if fd == 1:
            if len(self.out) + len(data) > self.limit:
                self.overflow = True  # not ours to hold: never more than the limit
            else:
                self.out += data
        elif fd == 2 and len(self.err) < _STDERR_KEPT:
            self.err += data[: _STDERR_KEPT - len(self.err)]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


class VolumeIO:
    """Runs state volume operations in worker processes, one at a time, each under a deadline."""

    def __init__(
        self,
        command: Sequence[str] = DEFAULT_COMMAND,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.command = tuple(command)
        self._clock = clock
        self._lock = asyncio.Lock()
        # The worker given up on while still running: (its protocol, pid, since when).
        self._abandoned: tuple[_Worker, int, float] | None = None
        self.abandoned_total = 0

    def stuck(self) -> tuple[int, float] | None:
        """(pid, seconds since it was abandoned) of a worker that has not ended, else None."""
        if self._abandoned is None:
            return None
        worker, pid, since = self._abandoned
        if worker.done.done():
            self._abandoned = None
            return None
        return pid, self._clock() - since

    async def _wait_for_abandoned(self) -> None:
        if self._abandoned is None:
            return
        worker, pid, since = self._abandoned
        try:
            await asyncio.wait_for(asyncio.shield(worker.done), KILL_GRACE)
        except TimeoutError:
            raise VolumeStuckError(
                f"the state volume is not answering: an operation abandoned "
                f"{self._clock() - since:.0f}s ago (worker pid {pid}) has not ended"
            ) from None
        self._abandoned = None

    async def settle(self, timeout: float) -> bool:
        """Give an abandoned worker up to `timeout` s to end; False if it is still alive.

        A save cancelled by its caller (a stop, a leader stepping down) kills its worker;
        a healthy one is gone in milliseconds, and waiting for it here lets it be reaped
        before the event loop closes (else the daemon leaves a zombie, and asyncio warns).
        """
        if self._abandoned is None:
            return True
        try:
            await asyncio.wait_for(asyncio.shield(self._abandoned[0].done), timeout)
        except TimeoutError:
            return False
        self._abandoned = None
        return True

    async def write(self, path: Path, payload: bytes, timeout: float | None) -> None:
        """Write `payload` to `path` atomically (temporary file, fsync, rename, fsync)."""
        answer, _ = await self._run(["write", str(path), str(len(payload))], payload,
                                    timeout, limit=_ANSWER_SLACK)
        _raise_for(answer)

    async def load(
        self, path: Path, max_bytes: int, stale_before: float, timeout: float | None,
    ) -> tuple[dict[str, Any], bytes]:
        """(answer, bytes): `answer["ok"]`, else `kind` is absent, unusable or os (with
        `error`); `removed` stale temporaries and any `temporaries_error`."""
        return await self._run(["load", str(path), str(max_bytes), repr(stale_before)], b"",
                               timeout, limit=max_bytes + _ANSWER_SLACK)

    async def rename(self, source: Path, target: Path, timeout: float | None) -> None:
        answer, _ = await self._run(["rename", str(source), str(target)], b"", timeout,
                                    limit=_ANSWER_SLACK)
        _raise_for(answer)

    async def _run(
        self, args: list[str], payload: bytes, timeout: float | None, limit: int,
    ) -> tuple[dict[str, Any], bytes]:
        loop = asyncio.get_running_loop()
        worker = _Worker(loop, limit)
        transport: asyncio.SubprocessTransport | None = None
        try:
            async with asyncio.timeout(timeout):
                async with self._lock:
                    await self._wait_for_abandoned()
                    # Its own session: a terminal's Ctrl-C to our group must not cut a
                    # write short (we decide when it ends: the deadline, then SIGKILL).
                    transport, _ = await loop.subprocess_exec(
                        lambda: worker, *self.command, *args, stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
                    stdin = transport.get_pipe_transport(0)
                    assert isinstance(stdin, asyncio.WriteTransport)
                    stdin.write(payload)
                    stdin.close()  # after the buffered bytes are sent
                    await asyncio.shield(worker.done)
        except BaseException as exc:  # the deadline, or our caller stopped waiting
            if transport is not None and transport.get_returncode() is None:
                transport.close()  # SIGKILL; if the kernel holds it, it holds only the child
                self._abandoned = (worker, transport.get_pid(), self._clock())
                self.abandoned_total += 1
            if isinstance(exc, TimeoutError):
                raise VolumeTimeoutError(f"no answer from the state volume within {timeout:g}s"
                                    ) from None
            raise
        transport.close()
        return _parse(worker, transport.get_returncode())


def _parse(worker: _Worker, returncode: int | None) -> tuple[dict[str, Any], bytes]:
    line, _, data = bytes(worker.out).partition(b"\n")
    try:
        answer = json.loads(line)
    except ValueError:
        answer = None
    if not isinstance(answer, dict) or worker.overflow:
        said = worker.err.decode("utf-8", "replace").strip().splitlines()
        why = said[-1] if said else "no answer"
        raise VolumeError(f"the state worker failed (exit status {returncode}): {why}")
    return answer, data


def _raise_for(answer: dict[str, Any]) -> None:
    if not answer.get("ok"):
        raise VolumeError(answer.get("errno") or 0, str(answer.get("error") or "failed"))
