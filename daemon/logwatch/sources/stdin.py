"""Standard input as a source: a daemon thread reads, the event loop receives batches.

A daemon thread (not the default executor) so that a blocked read never holds
up interpreter exit after the watcher is stopped; it is started once and lives
as long as standard input does.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
from collections.abc import AsyncIterator
from typing import Any, BinaryIO

from daemon.logwatch.sources import EndOfInput, SourceError
from daemon.roundtrip.tls import os_error_text

_EOF = None


class _ReadFailed(str):
    """Put on the queue instead of a line when reading standard input failed."""
# A read with nothing to hand over returns after this long, so the loop
# reading it keeps reporting progress while standard input is quiet.
QUIET_READ = 1.0


class StdinReader:
    """`LineSource` over a byte stream (standard input by default)."""

    kind = "stdin"
    poll_interval = 0.0  # read() itself waits for lines
    max_backoff = 1.0
    more_pending = False

    def __init__(self, stream: BinaryIO | None = None, max_batch: int = 10_000) -> None:
        self.stream = stream if stream is not None else sys.stdin.buffer
        self.max_batch = max_batch
        self._queue: asyncio.Queue[str | None] | None = None
        self._ended = False
        self._failed: str | None = None  # why reading broke off, for good

    @contextlib.asynccontextmanager
    async def opened(self) -> AsyncIterator[None]:
        if self._queue is None:
            self._queue = asyncio.Queue(maxsize=100_000)
            self._start_pump(asyncio.get_running_loop(), self._queue)
        yield

    def _start_pump(
        self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[str | None],
    ) -> None:
        def pump() -> None:
            last: str | None = _EOF
            try:
                for raw in self.stream:
                    text = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                    asyncio.run_coroutine_threadsafe(queue.put(text), loop).result()
            except OSError as exc:
                # Not an end: the writer's side broke (a reset socket, EIO). Said, and
                # the source stays down, rather than passing for a clean end of input.
                last = _ReadFailed(os_error_text(exc))
            except (ValueError, RuntimeError):
                pass  # the stream was closed or the loop is gone: we are exiting
            finally:
                with contextlib.suppress(RuntimeError):
                    asyncio.run_coroutine_threadsafe(queue.put(last), loop)

        threading.Thread(target=pump, name="leakwatch-stdin", daemon=True).start()

    async def read(self) -> list[str]:
        if self._failed is not None:
            raise SourceError("stdin_error", f"standard input: {self._failed}")
        queue = self._queue
        if queue is None or self._ended:
            raise EndOfInput
        try:
            first = await asyncio.wait_for(queue.get(), QUIET_READ)
        except TimeoutError:
            return []
        batch: list[str] = []
        item = first
        while True:
            if isinstance(item, _ReadFailed):
                self._failed = str(item)
                if batch:
                    return batch
                raise SourceError("stdin_error", f"standard input: {self._failed}")
            if item is _EOF:
                self._ended = True
                if batch:
                    return batch
                raise EndOfInput
            batch.append(item)
            if len(batch) >= self.max_batch or queue.empty():
                return batch
            item = queue.get_nowait()

    def state(self) -> dict[str, Any] | None:
        return None
