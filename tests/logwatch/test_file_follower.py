"""The tail -F style file follower: appends, rotation, truncation, late creation."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

from daemon.logwatch.sources.file import FileFollower, split_lines


class Collector:
    """Runs a follower in a task and collects its lines."""

    def __init__(self, follower: FileFollower) -> None:
        self.lines: list[str] = []
        self.polls = 0
        self._iter: AsyncIterator[list[str]] = follower.batches()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for batch in self._iter:
            self.polls += 1
            self.lines.extend(batch)

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[str]:
        async with asyncio.timeout(timeout):
            while len(self.lines) < count:
                await asyncio.sleep(0.01)
        return self.lines

    async def idle_polls(self, n: int = 3) -> None:
        start = self.polls
        async with asyncio.timeout(10):
            while self.polls < start + n:
                await asyncio.sleep(0.01)

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


def _append(path: Path, text: str) -> None:
    with path.open("a") as f:
        f.write(text)


def test_split_lines_keeps_partial_rest() -> None:
    """Only newline-terminated lines are returned; the rest waits for more bytes."""
    assert split_lines(b"a\r\nb\nhalf") == (["a", "b"], b"half")
    assert split_lines(b"half") == ([], b"half")


async def test_starts_at_end_and_follows_appends(tmp_path: Path) -> None:
    """Existing content is skipped (like tail -F); appended lines arrive, partial ones later."""
    log = tmp_path / "maillog"
    log.write_text("old line\n")
    c = Collector(FileFollower(log, poll_interval=0.02))
    try:
        await c.idle_polls()
        _append(log, "one\ntw")
        await c.wait_for(1)
        _append(log, "o\n")
        assert await c.wait_for(2) == ["one", "two"]
    finally:
        await c.close()


async def test_follows_rename_rotation(tmp_path: Path) -> None:
    """After logrotate's rename + new file, the old file's tail and the new file are read."""
    log = tmp_path / "maillog"
    log.write_text("")
    c = Collector(FileFollower(log, poll_interval=0.02))
    try:
        await c.idle_polls()
        _append(log, "before\n")
        await c.wait_for(1)
        _append(log, "last of old\n")
        os.rename(log, tmp_path / "maillog.1")
        log.write_text("first of new\n")
        _append(log, "second of new\n")
        assert await c.wait_for(4) == ["before", "last of old", "first of new", "second of new"]
    finally:
        await c.close()


async def test_follows_copytruncate(tmp_path: Path) -> None:
    """After truncation in place (copytruncate) reading restarts at offset 0."""
    log = tmp_path / "maillog"
    log.write_text("")
    c = Collector(FileFollower(log, poll_interval=0.02))
    try:
        await c.idle_polls()
        _append(log, "a long line before truncation\n")
        await c.wait_for(1)
        with log.open("w"):
            pass
        await c.idle_polls()
        _append(log, "after\n")
        assert await c.wait_for(2) == ["a long line before truncation", "after"]
    finally:
        await c.close()


async def test_waits_for_a_missing_file(tmp_path: Path) -> None:
    """A file that does not exist yet is reported once, then read from its start."""
    log = tmp_path / "maillog"
    errors: list[str] = []
    c = Collector(FileFollower(log, poll_interval=0.02, on_error=errors.append))
    try:
        await c.idle_polls()
        log.write_text("created later\n")
        assert await c.wait_for(1) == ["created later"]
        assert errors == ["file_missing"]
    finally:
        await c.close()


async def test_from_beginning(tmp_path: Path) -> None:
    """from_beginning reads the lines already in the file."""
    log = tmp_path / "maillog"
    log.write_text("x\ny\n")
    c = Collector(FileFollower(log, poll_interval=0.02, from_beginning=True))
    try:
        assert await c.wait_for(2) == ["x", "y"]
    finally:
        await c.close()
