"""An in-memory lease table with DynamoDB's conditional semantics, and faults to inject.

For the lease state machine's tests under a fake clock (tests/test_ha.py); the
same calls against moto's DynamoDB are tested in tests/test_ha_dynamodb.py.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from daemon.ha import LeaseError, LeaseLostError, LeaseRecord, LeaseTakenError


@dataclass
class LeaseItem:
    """The one item every client of a `SharedLease` sees."""

    holder: str | None = None
    token: int = 0
    expires: float = 0.0
    exists: bool = False
    writes: list[tuple[str, str, int]] = field(default_factory=list)  # (call, holder, token)

    def record(self) -> LeaseRecord | None:
        return LeaseRecord(self.holder, self.token, self.expires) if self.exists else None


@dataclass
class Faults:
    """What one client's calls do instead of answering: fail, or hang (a partition)."""

    fail: int = 0  # the next N calls raise LeaseError
    hang: bool = False  # calls never answer (until `hang` is cleared)
    applied_then_lost: int = 0  # the next N renewals are applied, but the answer is lost


class MemoryLeaseTable:
    """One client of the shared item; its `faults` apply to its calls only."""

    def __init__(self, item: LeaseItem, faults: Faults | None = None) -> None:
        self.item = item
        self.faults = faults or Faults()
        self.calls: list[str] = []
        self._unhang = asyncio.Event()

    @contextlib.asynccontextmanager
    async def opened(self) -> AsyncIterator[None]:
        yield

    async def _fault(self, call: str) -> None:
        self.calls.append(call)
        if self.faults.hang:
            await asyncio.Event().wait()  # cancelled by the caller's deadline
        if self.faults.fail:
            self.faults.fail -= 1
            raise LeaseError("connection", f"{call}: injected failure")

    async def acquire(self, holder: str, expires: float, now: float) -> int:
        await self._fault("acquire")
        item = self.item
        if item.exists and item.holder is not None and not item.expires < now:
            raise LeaseTakenError(item.record())
        item.exists = True
        item.holder, item.expires = holder, expires
        item.token += 1
        item.writes.append(("acquire", holder, item.token))
        return item.token

    async def renew(self, holder: str, token: int, expires: float) -> None:
        await self._fault("renew")
        item = self.item
        if not (item.exists and item.holder == holder and item.token == token):
            raise LeaseLostError(item.record())
        item.expires = expires
        item.writes.append(("renew", holder, token))
        if self.faults.applied_then_lost:
            self.faults.applied_then_lost -= 1
            raise LeaseError("timeout", "renew: the answer was lost")

    async def release(self, holder: str) -> bool:
        await self._fault("release")
        item = self.item
        if item.exists and item.holder == holder:
            item.holder = None
            item.writes.append(("release", holder, item.token))
            return True
        return False

    async def read(self) -> LeaseRecord | None:
        await self._fault("read")
        return self.item.record()


class Wall:
    """A wall clock that follows a fake monotonic clock, `offset` seconds apart (skew)."""

    def __init__(self, clock: Callable[[], float], offset: float = 0.0,
                 epoch: float = 1_800_000_000.0) -> None:
        self._clock = clock
        self.offset = offset
        self._epoch = epoch - clock()

    def __call__(self) -> float:
        return self._epoch + self._clock() + self.offset
