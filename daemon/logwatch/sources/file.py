"""Follow a local mail log like `tail -F`: across rotation (rename + new file) and truncation."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import BinaryIO

import structlog

log = structlog.get_logger()

CHUNK = 256 * 1024


def split_lines(buffer: bytes) -> tuple[list[str], bytes]:
    """Complete lines (decoded, newline stripped) and the unfinished rest."""
    cut = buffer.rfind(b"\n")
    if cut < 0:
        return [], buffer
    text = buffer[:cut].decode("utf-8", errors="replace")
    return [line.rstrip("\r") for line in text.split("\n")], buffer[cut + 1 :]


def _open(path: Path) -> tuple[BinaryIO, os.stat_result]:
    handle = path.open("rb")
    return handle, os.fstat(handle.fileno())


class FileFollower:
    """Yields batches of new lines; an empty batch per idle poll."""

    def __init__(
        self,
        path: Path,
        poll_interval: float = 1.0,
        from_beginning: bool = False,
        on_error: Callable[[str], None] = lambda _reason: None,
    ) -> None:
        self.path = path
        self.poll_interval = poll_interval
        self.from_beginning = from_beginning
        self.on_error = on_error

    async def batches(self) -> AsyncIterator[list[str]]:
        handle: BinaryIO | None = None
        identity: tuple[int, int] | None = None
        # Only the file present at start is read from its end; files that
        # appear later (after rotation) are new, so read from their start.
        seek_end = not self.from_beginning
        missing_reported = False
        rest = b""
        try:
            while True:
                if handle is None:
                    try:
                        opened, st = await asyncio.to_thread(_open, self.path)
                    except OSError as exc:
                        if not missing_reported:
                            self.on_error("file_missing")
                            log.warning("leakwatch_file_unavailable", path=str(self.path),
                                        error=exc.strerror)
                            missing_reported = True
                        seek_end = False
                        yield []
                        await asyncio.sleep(self.poll_interval)
                        continue
                    missing_reported = False
                    handle = opened
                    identity = (st.st_dev, st.st_ino)
                    if seek_end:
                        await asyncio.to_thread(opened.seek, 0, os.SEEK_END)
                    seek_end = False
                current: BinaryIO = handle
                data = await asyncio.to_thread(current.read, CHUNK)
                if data:
                    lines, rest = split_lines(rest + data)
                    if lines:
                        yield lines
                    continue
                switched = await asyncio.to_thread(self._rotated_or_truncated, current, identity)
                if switched == "rotated":
                    # The old file was drained above; a final unterminated line is complete now.
                    if rest:
                        yield [rest.decode("utf-8", errors="replace").rstrip("\r")]
                        rest = b""
                    current.close()
                    handle = None
                    log.info("leakwatch_file_rotated", path=str(self.path))
                    continue
                if switched == "truncated":
                    current.seek(0)
                    rest = b""
                    log.info("leakwatch_file_truncated", path=str(self.path))
                    continue
                yield []
                await asyncio.sleep(self.poll_interval)
        finally:
            if handle is not None:
                handle.close()

    def _rotated_or_truncated(self, handle: BinaryIO, identity: tuple[int, int] | None) -> str:
        try:
            st = os.stat(self.path)
        except OSError:
            return ""  # renamed away and not yet recreated: keep the old file open
        if (st.st_dev, st.st_ino) != identity:
            return "rotated"
        if st.st_size < handle.tell():
            return "truncated"
        return ""
