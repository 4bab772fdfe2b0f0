"""A fake monotonic clock and sleep for components: time moves only when every task waits."""

from __future__ import annotations

import asyncio
import heapq
import itertools


class FakeClock:
    """`sleep()` parks the caller until `advance()` moves the clock past its wake-up time.

    `run_for(seconds)` advances in steps to the next pending wake-up, letting the
    event loop settle in between, so a component's loop runs exactly as it would
    in real time, in milliseconds.
    """

    SETTLE_TURNS = 20

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def __call__(self) -> float:
        return self.now

    @property
    def sleeping(self) -> bool:
        """Someone waits on this clock (else time would pass with nobody to notice)."""
        return any(not future.done() for _, _, future in self._sleepers)

    async def sleep(self, delay: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.now + max(0.0, delay), next(self._order), future))
        await future

    async def settle(self) -> None:
        for _ in range(self.SETTLE_TURNS):
            await asyncio.sleep(0)

    async def advance(self, seconds: float) -> None:
        """Move the clock forward by `seconds`, waking every sleeper due on the way."""
        target = self.now + seconds
        await self.settle()
        while self._sleepers and self._sleepers[0][0] <= target:
            when, _, future = heapq.heappop(self._sleepers)
            self.now = max(self.now, when)
            if not future.done():
                future.set_result(None)
            await self.settle()
        self.now = target
        await self.settle()

    async def run_until(self, predicate: object, limit: float, step: float = 1.0) -> None:
        """Advance in `step`s until `predicate()` holds; fail after `limit` fake seconds."""
        assert callable(predicate)
        start = self.now
        while not predicate():
            assert self.now - start <= limit, f"condition not reached within {limit} fake s"
            await self.advance(step)
