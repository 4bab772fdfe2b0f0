"""Standard input as a source: a daemon thread reads, the event loop receives batches.

A daemon thread (not the default executor) so that a blocked read never holds
up interpreter exit after the watcher is stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
from collections.abc import AsyncIterator
from typing import BinaryIO

_EOF = None


class StdinReader:
    def __init__(self, stream: BinaryIO | None = None, max_batch: int = 10_000) -> None:
        self.stream = stream if stream is not None else sys.stdin.buffer
        self.max_batch = max_batch

    async def batches(self) -> AsyncIterator[list[str]]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str | None] = asyncio.Queue(maxsize=100_000)

        def pump() -> None:
            try:
                for raw in self.stream:
                    text = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                    asyncio.run_coroutine_threadsafe(queue.put(text), loop).result()
            except (OSError, ValueError, RuntimeError):
                pass  # stream closed or loop gone: end of input either way
            finally:
                with contextlib.suppress(RuntimeError):
                    asyncio.run_coroutine_threadsafe(queue.put(_EOF), loop)

        threading.Thread(target=pump, name="leakwatch-stdin", daemon=True).start()
        while True:
            first = await queue.get()
            if first is _EOF:
                return
            batch = [first]
            while len(batch) < self.max_batch and not queue.empty():
                item = queue.get_nowait()
                if item is _EOF:
                    yield batch
                    return
                batch.append(item)
            yield batch
