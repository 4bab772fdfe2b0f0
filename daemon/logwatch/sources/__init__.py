"""Where mail log lines come from: CloudWatch Logs, a followed file, standard input.

Every source has the same shape (`LineSource`): `opened()` holds its clients
or handles, `read()` returns the lines that are new since the last read (an
empty list is a successful read that found nothing) and raises `SourceError`
when the source cannot be read right now. The leak watcher's source loop owns
the cadence, the backoff and the health reporting.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol


class SourceError(Exception):
    """The source cannot be read now. `reason` is a bounded metric label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class EndOfInput(Exception):  # noqa: N818 - an event, not an error
    """The source has no more lines, ever (standard input closed)."""


class LineSource(Protocol):
    """What the leak watcher's source loop needs from a source."""

    kind: str  # cloudwatch | file | stdin

    @property
    def poll_interval(self) -> float:
        """Seconds between reads when nothing is pending."""

    @property
    def max_backoff(self) -> float:
        """The longest wait after repeated failures."""

    @property
    def more_pending(self) -> bool:
        """True when the last read stopped short of the end (read again at once)."""

    def opened(self) -> AbstractAsyncContextManager[Any]:
        """Hold the source's clients or handles; may raise SourceError."""

    async def read(self) -> list[str]:
        """New lines since the last read; raises SourceError or EndOfInput."""

    def state(self) -> dict[str, Any] | None:
        """What to persist to resume where this source stopped (None: nothing)."""
