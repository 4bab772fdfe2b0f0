"""Waiting in tests for something real (a socket, a file, a process) to happen, bounded."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any


async def until(condition: Callable[[], Any | Awaitable[Any]], timeout: float = 10.0) -> None:
    """Poll `condition` (sync or async) until it is truthy; fail after `timeout` seconds.

    For real I/O only: time that the code under test waits on goes through the
    injected clock and sleep (tests/fake_time.py), never through this.
    """
    deadline = time.monotonic() + timeout
    while True:
        held = condition()
        if isinstance(held, Awaitable):
            held = await held
        if held:
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"condition not met within {timeout:g}s")
        await asyncio.sleep(0.01)
