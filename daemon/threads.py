"""Blocking file I/O off the event loop, in threads that never hold up the process's exit.

`asyncio.to_thread` uses the default executor, and `asyncio.run` waits for its
threads without a time limit when the loop closes: one slow read or write would
keep a stopping daemon waiting. A daemon thread per call costs a little more and
leaves nothing for Python to wait for; the caller bounds its wait on the
returned future.

A daemon thread does not help against the kernel, though: one stuck in
uninterruptible sleep (a write to a frozen EFS/NFS hard mount) keeps the whole
process from exiting, SIGKILL included. The state volume's I/O therefore runs in
worker processes instead (daemon/state_io.py); these threads are for local files.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def in_daemon_thread(fn: Callable[..., T], *args: Any, name: str = "io") -> asyncio.Future[T]:
    """Run `fn(*args)` in a new daemon thread; its result or exception settles the future."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():
            return  # the caller stopped waiting (cancelled the future)
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]  # set only without error

    def work() -> None:
        result: T | None = None
        error: BaseException | None = None
        try:
            result = fn(*args)
        except BaseException as exc:  # handed to the awaiting coroutine
            error = exc
        # RuntimeError: the loop is gone, so nobody waits any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=work, name=name, daemon=True).start()
    return future
