"""Sleep until a timeout or until poked: how a component's loop waits for new work."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable


class Waker:
    """`await waker.wait(t)` returns after `t` s (the injected sleep) or at `poke()`."""

    def __init__(self, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self._sleep = sleep
        self._poked = asyncio.Event()

    def poke(self) -> None:
        self._poked.set()

    async def wait(self, timeout: float) -> bool:
        """True if poked (now or since the last wait), False if the time ran out."""
        if not self._poked.is_set():
            sleeper = asyncio.ensure_future(self._sleep(max(0.0, timeout)))
            poked = asyncio.ensure_future(self._poked.wait())
            try:
                await asyncio.wait({sleeper, poked}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (sleeper, poked):
                    task.cancel()
                await asyncio.wait({sleeper, poked})
            if not sleeper.cancelled():
                sleeper.result()  # a broken sleep fails loudly instead of spinning
        was_poked = self._poked.is_set()
        self._poked.clear()
        return was_poked
