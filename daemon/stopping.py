"""The shutdown budget and the one way to let a cleanup finish despite cancellation.

ECS sends SIGKILL `stopTimeout` seconds after SIGTERM. Everything the daemon
does after SIGTERM (runs finishing, probe deletions, the final state save, the
outbox flush, closing clients) draws on one `StopBudget`, so no path can add
its own timeout on top of another's.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import Any

# How long a cleanup that ran out of time gets to unwind after being cancelled.
CANCEL_GRACE = 1.0


class StopBudget:
    """Seconds left before the process must be gone: infinite until `start()`."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._ends_at: float | None = None

    def start(self, seconds: float) -> None:
        """Begin the countdown (once; a second SIGTERM does not extend it)."""
        if self._ends_at is None:
            self._ends_at = self._clock() + seconds

    @property
    def started(self) -> bool:
        return self._ends_at is not None

    def remaining(self, reserve: float = 0.0) -> float:
        """Seconds left, keeping `reserve` for the steps after this one (never negative)."""
        if self._ends_at is None:
            return math.inf
        return max(0.0, self._ends_at - reserve - self._clock())


async def finish_shielded(
    task: asyncio.Task[Any], timeout: float, allowed: Callable[[], float] | None = None,
) -> bool:
    """Wait up to `timeout` s for `task`, even if we are cancelled meanwhile.

    Used for work that must not be abandoned half-way (deleting a probe): a
    cancellation of the caller is held back until the task ends or the time is
    up, then re-raised. `allowed()` is asked again at every cancellation and can
    only shorten the wait: a shutdown that starts while the task runs brings its
    deadline forward to what the budget has left. A task still running at the
    deadline is cancelled and given `CANCEL_GRACE` to unwind. True if the task
    finished on its own.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    cancelled = False
    while not task.done():
        if allowed is not None:
            deadline = min(deadline, loop.time() + allowed())
        left = deadline - loop.time()
        if left <= 0:
            break
        try:
            await asyncio.wait({task}, timeout=left)
        except asyncio.CancelledError:
            cancelled = True
    finished = task.done()
    if not finished:
        task.cancel()
        try:
            await asyncio.wait({task}, timeout=CANCEL_GRACE)
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return finished
