"""The file source: appends, partial lines, rotation, truncation, restarts with a saved position."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from daemon.logwatch.sources.file import (
    FINGERPRINT_BYTES,
    FilePosition,
    FileTail,
    SourceUnavailable,
    split_lines,
)

# Root reads a chmod 000 file anyway: as root (CI), these tests run once more
# as `nobody`, by test_permission_tests_pass_without_root_privileges.
needs_non_root = pytest.mark.skipif(
    os.geteuid() == 0, reason="root reads a chmod 000 file; re-run as nobody instead")


def _append(path: Path, text: str) -> None:
    with path.open("ab") as f:
        f.write(text.encode())


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _events(logs: Sequence[Mapping[str, Any]]) -> list[str]:
    return [e["event"] for e in logs if e["event"].startswith("leakwatch_file_")]


def _saved(tail: FileTail) -> FilePosition:
    """The tail's position after a trip through the state file's JSON."""
    assert tail.position is not None
    return FilePosition.from_dict(json.loads(json.dumps(tail.position.as_dict())))


async def _unavailable(tail: FileTail) -> SourceUnavailable:
    with pytest.raises(SourceUnavailable) as info:
        await tail.read()
    return info.value


async def _drain(tail: FileTail) -> list[str]:
    lines = await tail.read()
    for _ in range(10_000):
        if not tail.more_pending:
            return lines
        lines += await tail.read()
    raise AssertionError("more_pending never cleared")


class LogWriter:
    """Test data: a syslog daemon and logrotate acting on one file, writing unique lines."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.count = 0
        self.rotations = 0
        path.touch()

    def line(self, pad: int) -> str:
        self.count += 1
        return f"L{self.count:05d} " + "x" * pad

    def write(self, data: str) -> None:
        _append(self.path, data)

    def rotate(self) -> None:
        """logrotate's default: rename the file, create an empty one at the path."""
        self.rotations += 1
        os.rename(self.path, self.path.with_name(f"{self.path.name}-{self.rotations}"))
        self.path.touch()

    def copytruncate(self) -> None:
        """logrotate's copytruncate: copy the file aside, truncate it in place (same inode)."""
        self.rotations += 1
        shutil.copyfile(self.path, self.path.with_name(f"{self.path.name}.{self.rotations}"))
        os.truncate(self.path, 0)


def test_split_lines_keeps_partial_rest() -> None:
    """Only newline-terminated lines are returned; the rest waits for more bytes."""
    assert split_lines(b"a\r\nb\nhalf") == (["a", "b"], b"half")
    assert split_lines(b"half") == ([], b"half")


# -- appends and partial lines -------------------------------------------------------------------
async def test_starts_at_end_and_follows_appends(tmp_path: Path) -> None:
    """Without a position existing content is skipped (tail -F); appends arrive, [] when idle."""
    log = tmp_path / "maillog"
    log.write_text("old line\n")
    tail = FileTail(log)
    assert await tail.read() == []
    _append(log, "one\r\ntwo\n")
    assert await tail.read() == ["one", "two"]
    assert await tail.read() == []
    assert not tail.more_pending
    tail.close()


async def test_start_at_end_keeps_the_unfinished_last_line(tmp_path: Path) -> None:
    """A line half written when the tail starts is handed out whole once its newline arrives."""
    log = tmp_path / "maillog"
    log.write_text("old\nhal")
    tail = FileTail(log)
    assert await tail.read() == []
    _append(log, "f\n")
    assert await tail.read() == ["half"]
    tail.close()


async def test_from_beginning_reads_existing_lines(tmp_path: Path) -> None:
    """from_beginning reads the lines already in the file."""
    log = tmp_path / "maillog"
    log.write_text("x\ny\n")
    tail = FileTail(log, from_beginning=True)
    assert await tail.read() == ["x", "y"]
    tail.close()


async def test_partial_line_waits_for_its_newline(tmp_path: Path) -> None:
    """An unterminated last line is not handed out and the position's offset stays before it."""
    log = tmp_path / "maillog"
    log.write_text("a\nb")
    tail = FileTail(log, from_beginning=True)
    assert await tail.read() == ["a"]
    assert tail.position is not None
    assert tail.position.offset == 2
    assert await tail.read() == []
    _append(log, "c\n")
    assert await tail.read() == ["bc"]
    assert tail.position.offset == 5
    assert tail.position.fingerprint == hashlib.sha256(b"a\nbc\n").hexdigest()
    tail.close()


async def test_backlog_is_read_in_bounded_batches(tmp_path: Path) -> None:
    """A large backlog comes in batches of about max_batch_bytes, more_pending set until drained."""
    log = tmp_path / "maillog"
    lines = [f"line {n:04d}" for n in range(1000)]  # 10 bytes each with the newline
    log.write_text("".join(f"{line}\n" for line in lines))
    tail = FileTail(log, from_beginning=True, max_batch_bytes=1000)
    got: list[str] = []
    reads = 0
    while True:
        batch = await tail.read()
        reads += 1
        assert len(batch) <= 100
        got += batch
        if not tail.more_pending:
            break
    assert got == lines
    assert reads == 10
    tail.close()


async def test_overlong_line_is_cut_and_its_rest_dropped(tmp_path: Path) -> None:
    """A line longer than max_batch_bytes is handed out cut to that size; reading never stalls."""
    log = tmp_path / "maillog"
    log.write_text("x" * 250 + "\nnext\n")
    tail = FileTail(log, from_beginning=True, max_batch_bytes=100)
    with capture_logs() as logs:
        assert await _drain(tail) == ["x" * 100, "next"]
    assert _events(logs) == ["leakwatch_file_line_too_long"]
    tail.close()


# -- the file cannot be read ---------------------------------------------------------------------
async def test_missing_file_is_unavailable_on_every_call_then_read_from_start(
        tmp_path: Path) -> None:
    """A missing path raises on every read, warns once per episode; a late file is read from 0."""
    log = tmp_path / "maillog"
    tail = FileTail(log)
    with capture_logs() as logs:
        for _ in range(3):
            exc = await _unavailable(tail)
            assert exc.reason == "file_missing"
            assert str(exc) == f"cannot read {log}: No such file or directory"
        log.write_text("created later\n")
        assert await tail.read() == ["created later"]
        os.rename(log, tmp_path / "maillog.1")
        assert (await _unavailable(tail)).reason == "file_missing"
        assert (await _unavailable(tail)).reason == "file_missing"
    assert _events(logs) == ["leakwatch_file_unavailable", "leakwatch_file_available",
                             "leakwatch_file_unavailable"]
    assert logs[0]["path"] == str(log)
    assert logs[0]["reason"] == "file_missing"
    tail.close()


async def test_directory_at_path_is_not_a_file(tmp_path: Path) -> None:
    """A directory at the path raises not_a_file on every read until a regular file replaces it."""
    log = tmp_path / "maillog"
    log.mkdir()
    tail = FileTail(log, from_beginning=True)
    for _ in range(2):
        exc = await _unavailable(tail)
        assert exc.reason == "not_a_file"
        assert str(exc) == f"cannot read {log}: it is a directory"
    log.rmdir()
    log.write_text("x\n")
    assert await tail.read() == ["x"]
    tail.close()


@needs_non_root
async def test_unreadable_file_is_unavailable_until_readable(tmp_path: Path) -> None:
    """A file without read permission raises file_unreadable on every read until it is fixed."""
    log = tmp_path / "maillog"
    log.write_text("a\n")
    log.chmod(0)
    tail = FileTail(log, from_beginning=True)
    with capture_logs() as logs:
        for _ in range(2):
            exc = await _unavailable(tail)
            assert exc.reason == "file_unreadable"
            assert str(exc) == f"cannot read {log}: Permission denied"
        log.chmod(0o644)
        assert await tail.read() == ["a"]
    assert _events(logs) == ["leakwatch_file_unavailable", "leakwatch_file_available"]
    tail.close()


@needs_non_root
async def test_rotation_to_an_unreadable_file_hands_out_old_lines_then_reports(
        tmp_path: Path) -> None:
    """Rotated to a file we may not open: the old file's last lines first, then file_unreadable."""
    log = tmp_path / "maillog"
    log.write_text("")
    tail = FileTail(log)
    assert await tail.read() == []
    _append(log, "last of old\n")
    os.rename(log, tmp_path / "maillog.1")
    log.write_text("new\n")
    log.chmod(0)
    with capture_logs() as logs:
        assert await tail.read() == ["last of old"]
        assert (await _unavailable(tail)).reason == "file_unreadable"
        assert (await _unavailable(tail)).reason == "file_unreadable"
        log.chmod(0o644)
        assert await tail.read() == ["new"]
    assert _events(logs) == ["leakwatch_file_rotated", "leakwatch_file_unavailable",
                             "leakwatch_file_available"]
    tail.close()


# -- rotation and truncation while running -------------------------------------------------------
async def test_rename_rotation_drains_old_file_then_reads_new(tmp_path: Path) -> None:
    """After rename + new file: the old file's rest (unterminated line too), then the new file."""
    log = tmp_path / "maillog"
    log.write_text("")
    tail = FileTail(log)
    assert await tail.read() == []
    _append(log, "before\n")
    assert await tail.read() == ["before"]
    _append(log, "last of old\nno newline")
    os.rename(log, tmp_path / "maillog.1")
    log.write_text("first of new\n")
    with capture_logs() as logs:
        assert await tail.read() == ["last of old", "no newline", "first of new"]
    assert _events(logs) == ["leakwatch_file_rotated"]
    _append(log, "second of new\n")
    assert await tail.read() == ["second of new"]
    assert tail.position == FilePosition(
        log.stat().st_dev, log.stat().st_ino, log.stat().st_size,
        hashlib.sha256(b"first of new\nsecond of new\n").hexdigest())
    tail.close()


async def test_rotation_keeps_reading_old_file_while_new_one_is_empty(tmp_path: Path) -> None:
    """Lines written to the renamed file are read until the new file gets its first bytes."""
    log = tmp_path / "maillog"
    log.write_text("")
    tail = FileTail(log)
    assert await tail.read() == []
    old = tmp_path / "maillog.1"
    os.rename(log, old)
    log.write_text("")
    _append(old, "late\npart")
    assert await tail.read() == ["late"]
    _append(log, "new\n")
    assert await tail.read() == ["part", "new"]
    tail.close()


async def test_copytruncate_is_detected_by_size(tmp_path: Path) -> None:
    """A file truncated in place below the offset is read again from 0."""
    log = tmp_path / "maillog"
    log.write_text("")
    tail = FileTail(log)
    assert await tail.read() == []
    _append(log, "a long line before truncation\n")
    assert await tail.read() == ["a long line before truncation"]
    os.truncate(log, 0)
    with capture_logs() as logs:
        assert await tail.read() == []
    assert _events(logs) == ["leakwatch_file_truncated"]
    _append(log, "after\n")
    assert await tail.read() == ["after"]
    tail.close()


async def test_copytruncate_refilled_past_offset_is_read_from_start(tmp_path: Path) -> None:
    """copytruncate refilled past the offset before the next read: read from 0, no cut line."""
    log = tmp_path / "maillog"
    log.write_text("short\n")
    tail = FileTail(log, from_beginning=True)
    assert await tail.read() == ["short"]
    os.truncate(log, 0)
    _append(log, "refilled line, longer than the old offset\nsecond\n")
    with capture_logs() as logs:
        assert await tail.read() == ["refilled line, longer than the old offset", "second"]
    assert _events(logs) == ["leakwatch_file_truncated"]
    tail.close()


async def test_copytruncate_reads_the_unread_rest_from_the_copy_first(tmp_path: Path) -> None:
    """Lines written after our last read and copied aside by copytruncate are read from
    the copy (maillog.1), then the truncated file from 0: none lost, none twice."""
    log = tmp_path / "maillog"
    log.write_text("seen\n")
    base = _fds()
    tail = FileTail(log, from_beginning=True)
    assert await tail.read() == ["seen"]
    _append(log, "written before the rotation\n")
    shutil.copyfile(log, tmp_path / "maillog.1")
    os.truncate(log, 0)
    _append(log, "written after it\n")
    with capture_logs() as logs:
        assert await _drain(tail) == ["written before the rotation", "written after it"]
    assert "leakwatch_file_resumed_copy" in _events(logs)
    assert "leakwatch_file_truncated" not in _events(logs)
    _append(log, "and later\n")
    assert await tail.read() == ["and later"]
    tail.close()
    assert _fds() == base


async def test_restart_after_copytruncate_reads_the_copy_then_the_file(tmp_path: Path) -> None:
    """Stopped, then copytruncate: the lines written while we were down are in the copy
    (maillog-20261125) and are read from there; an older copy is left alone."""
    log = tmp_path / "maillog"
    (tmp_path / "maillog-20261124").write_text("yesterday's copy, longer than our offset\n")
    log.write_text("seen\n")
    first = FileTail(log, from_beginning=True)
    assert await first.read() == ["seen"]
    first.close()
    _append(log, "a leak while we were down\n")
    shutil.copyfile(log, tmp_path / "maillog-20261125")
    os.truncate(log, 0)
    _append(log, "after the rotation\n")
    second = FileTail(log, position=_saved(first))
    assert await _drain(second) == ["a leak while we were down", "after the rotation"]
    second.close()


async def test_a_truncated_file_renamed_away_is_still_read_from_start(tmp_path: Path) -> None:
    """copytruncate, a line into the truncated file, then a rename rotation before our
    read: the truncated file (no longer at the path) is read from 0, not left for the
    copy; that would lose the line written after the truncation."""
    log = tmp_path / "maillog"
    log.write_text("seen\n")
    tail = FileTail(log, from_beginning=True)
    assert await tail.read() == ["seen"]
    _append(log, "copied\n")
    shutil.copyfile(log, tmp_path / "maillog.1")
    os.truncate(log, 0)
    _append(log, "after the truncation\n")
    os.rename(log, tmp_path / "maillog-2")
    log.touch()
    out = await _drain(tail)
    _append(log, "new file\n")
    out += await _drain(tail)
    assert out == ["after the truncation", "new file"]
    tail.close()


async def test_two_copytruncates_while_stopped_name_the_copy_not_read(
    tmp_path: Path,
) -> None:
    """Copied and truncated twice while stopped: the copy holding our offset is finished,
    and the later copy, which is not read, is named in a warning."""
    log = tmp_path / "maillog"
    log.write_text("seen, a line long enough to be past the next ones\n")
    first = FileTail(log, from_beginning=True)
    assert await first.read() == ["seen, a line long enough to be past the next ones"]
    first.close()
    _append(log, "in the first copy\n")
    shutil.copyfile(log, tmp_path / "maillog.1")
    os.truncate(log, 0)
    os.utime(tmp_path / "maillog.1", (1000, 1000))
    _append(log, "in the second copy\n")
    os.rename(tmp_path / "maillog.1", tmp_path / "maillog.2")
    shutil.copyfile(log, tmp_path / "maillog.1")
    os.truncate(log, 0)
    _append(log, "now\n")
    second = FileTail(log, position=_saved(first))
    with capture_logs() as logs:
        assert await _drain(second) == ["in the first copy", "now"]
    [warning] = [e for e in logs if e["log_level"] == "warning"]
    assert warning["event"] == "leakwatch_file_rotations_not_read"
    assert warning["files"] == [str(tmp_path / "maillog.1")]
    second.close()


async def test_a_truncation_without_a_matching_copy_reads_from_start(tmp_path: Path) -> None:
    """`> maillog` beside an unrelated maillog.1: that file is not ours, nothing is read
    from it, the truncated file is read from 0."""
    log = tmp_path / "maillog"
    (tmp_path / "maillog.1").write_text("another day's lines, longer than the offset\n")
    log.write_text("seen\n")
    tail = FileTail(log, from_beginning=True)
    assert await tail.read() == ["seen"]
    os.truncate(log, 0)
    _append(log, "new\n")
    with capture_logs() as logs:
        assert await _drain(tail) == ["new"]
    assert _events(logs) == ["leakwatch_file_truncated"]
    tail.close()


async def test_no_file_handle_leaks_across_rotations_and_close(tmp_path: Path) -> None:
    """Rename rotations, truncations and close() leave no file descriptor behind."""
    log = tmp_path / "maillog"
    log.write_text("")
    base = _fds()
    tail = FileTail(log)
    assert await tail.read() == []
    for n in range(5):
        _append(log, f"line {n}\n")
        assert await tail.read() == [f"line {n}"]
        os.rename(log, tmp_path / f"maillog.{n}")
        log.write_text(f"new {n}\n")
        assert await tail.read() == [f"new {n}"]
        os.truncate(log, 0)
        assert await tail.read() == []
        assert _fds() == base + 1
    tail.close()
    assert _fds() == base


async def test_cancelled_read_moves_nothing(tmp_path: Path) -> None:
    """A cancelled read hands out nothing and moves nothing; the next read returns those lines."""
    log = tmp_path / "maillog"
    log.write_text("a\nb\n")
    base = _fds()
    tail = FileTail(log, from_beginning=True)
    task = asyncio.create_task(tail.read())
    await asyncio.sleep(0)  # the read now waits for its worker thread
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert tail.position is None
    assert await tail.read() == ["a", "b"]
    tail.close()
    async with asyncio.timeout(5):  # the cancelled worker's handle is closed when it ends
        while _fds() != base:
            await asyncio.sleep(0.01)


async def test_close_keeps_the_position_and_refuses_reads(tmp_path: Path) -> None:
    """After close() the position is still there to save and read() is refused."""
    log = tmp_path / "maillog"
    log.write_text("a\n")
    tail = FileTail(log, from_beginning=True)
    assert await tail.read() == ["a"]
    tail.close()
    tail.close()
    assert tail.position is not None
    assert tail.position.offset == 2
    with pytest.raises(RuntimeError, match="closed"):
        await tail.read()


# -- restarts with a saved position -------------------------------------------------------------
async def test_restart_resumes_at_saved_position(tmp_path: Path) -> None:
    """A tail started with a saved position returns the lines written while the daemon was down."""
    log = tmp_path / "maillog"
    log.write_text("old\n")
    first = FileTail(log)
    assert await first.read() == []
    _append(log, "seen\n")
    assert await first.read() == ["seen"]
    first.close()
    _append(log, "leak while down\n")
    second = FileTail(log, position=_saved(first))
    assert second.position == first.position
    assert await second.read() == ["leak while down"]
    second.close()


async def test_restart_on_a_shorter_file_reads_from_start(tmp_path: Path) -> None:
    """A saved offset beyond the end of the same file (truncated while stopped) restarts at 0."""
    log = tmp_path / "maillog"
    log.write_text("first line of the old content\n")
    first = FileTail(log, from_beginning=True)
    assert await first.read() == ["first line of the old content"]
    first.close()
    os.truncate(log, 0)
    _append(log, "new\n")
    second = FileTail(log, position=_saved(first))
    with capture_logs() as logs:
        assert await second.read() == ["new"]
    assert _events(logs) == ["leakwatch_file_truncated"]
    second.close()


async def test_restart_on_a_refilled_file_reads_from_start(tmp_path: Path) -> None:
    """A saved fingerprint that no longer matches (refilled while stopped) restarts at 0."""
    log = tmp_path / "maillog"
    log.write_text("short\n")
    first = FileTail(log, from_beginning=True)
    assert await first.read() == ["short"]
    first.close()
    os.truncate(log, 0)
    _append(log, "refilled past the old offset\n")
    second = FileTail(log, position=_saved(first))
    assert await second.read() == ["refilled past the old offset"]
    second.close()


async def test_restart_after_rotation_finishes_the_rotated_file_first(tmp_path: Path) -> None:
    """A file rotated while stopped is found by inode, its rest read, then the new file from 0."""
    log = tmp_path / "maillog"
    log.write_text("")
    first = FileTail(log)
    assert await first.read() == []
    _append(log, "seen\n")
    assert await first.read() == ["seen"]
    first.close()
    _append(log, "leak before rotation\n")
    os.rename(log, tmp_path / "maillog-20261125")
    older = tmp_path / "maillog.2.gz"
    older.write_bytes(b"\x1f\x8b compressed")
    os.utime(older, (1, 1))  # an older rotation: gzip keeps the file's own mtime
    log.write_text("after rotation\n")
    second = FileTail(log, position=_saved(first))
    with capture_logs() as logs:
        assert await second.read() == ["leak before rotation", "after rotation"]
    assert _events(logs) == ["leakwatch_file_resumed_rotated", "leakwatch_file_rotated"]
    assert second.position is not None
    assert second.position.inode == log.stat().st_ino
    second.close()


async def test_two_rotations_while_stopped_name_the_file_not_read(tmp_path: Path) -> None:
    """Rotated twice while stopped: our file is finished and the new one read, and the
    file between them, which is not, is named in a warning (it was skipped silently)."""
    log = tmp_path / "maillog"
    log.write_text("seen\n")
    first = FileTail(log, from_beginning=True)
    assert await first.read() == ["seen"]
    first.close()
    _append(log, "ours, unread\n")
    os.rename(log, tmp_path / "maillog.1")
    os.utime(tmp_path / "maillog.1", (1000, 1000))
    log.write_text("between\n")
    os.rename(tmp_path / "maillog.1", tmp_path / "maillog.2")
    os.rename(log, tmp_path / "maillog.1")
    log.write_text("now\n")
    second = FileTail(log, position=_saved(first))
    with capture_logs() as logs:
        assert await _drain(second) == ["ours, unread", "now"]
    [warning] = [e for e in logs if e["log_level"] == "warning"]
    assert warning["event"] == "leakwatch_file_rotations_not_read"
    assert warning["files"] == [str(tmp_path / "maillog.1")]
    second.close()


async def test_restart_after_rotation_without_the_old_file_warns(tmp_path: Path) -> None:
    """Saved inode gone (here only a compressed name has it): warn, read the new file from 0."""
    log = tmp_path / "maillog"
    log.write_text("")
    first = FileTail(log)
    assert await first.read() == []
    _append(log, "seen\n")
    assert await first.read() == ["seen"]
    first.close()
    _append(log, "lost\n")
    os.rename(log, tmp_path / "maillog.1.gz")  # same inode, but never opened as text
    log.write_text("new file\n")
    second = FileTail(log, position=_saved(first))
    with capture_logs() as logs:
        assert await second.read() == ["new file"]
    assert _events(logs) == ["leakwatch_file_rotated_while_stopped"]
    assert logs[0]["log_level"] == "warning"
    second.close()


async def test_restart_after_truncation_then_rotation_reads_the_rotated_file_from_0(
        tmp_path: Path) -> None:
    """The saved file, truncated and refilled and then rotated while stopped, is read from 0."""
    log = tmp_path / "maillog"
    log.write_text("seen\n")
    first = FileTail(log, from_beginning=True)
    assert await first.read() == ["seen"]
    first.close()
    os.truncate(log, 0)
    _append(log, "refill\n")
    os.rename(log, tmp_path / "maillog.1")
    log.write_text("new file\n")
    second = FileTail(log, position=_saved(first))
    assert await second.read() == ["refill", "new file"]
    second.close()


# -- the saved position --------------------------------------------------------------------------
async def test_position_fingerprint_is_of_the_bytes_before_the_offset(tmp_path: Path) -> None:
    """The position names the file and hashes the FINGERPRINT_BYTES bytes just before the offset."""
    log = tmp_path / "maillog"
    content = "".join(f"line {n:03d} of the log\n" for n in range(100)).encode()
    log.write_bytes(content + b"partial")
    tail = FileTail(log, from_beginning=True)
    assert len(await tail.read()) == 100
    st_ = log.stat()
    assert tail.position == FilePosition(
        st_.st_dev, st_.st_ino, len(content),
        hashlib.sha256(content[-FINGERPRINT_BYTES:]).hexdigest())
    tail.close()


def test_position_round_trips_through_json() -> None:
    """as_dict() gives JSON types and from_dict() reads them back unchanged."""
    position = FilePosition(2049, 131_075, 4_096, "ab" * 32)
    assert FilePosition.from_dict(json.loads(json.dumps(position.as_dict()))) == position


@pytest.mark.parametrize(("data", "message"), [
    ([], "file position must be an object, not list"),
    ({"inode": 1, "offset": 0, "fingerprint": "0" * 64}, "file position has no 'device'"),
    ({"device": 1, "inode": "7", "offset": 0, "fingerprint": "0" * 64},
     "file position 'inode' must be a non-negative integer, not '7'"),
    ({"device": 1, "inode": 7, "offset": -1, "fingerprint": "0" * 64},
     "file position 'offset' must be a non-negative integer, not -1"),
    ({"device": True, "inode": 7, "offset": 0, "fingerprint": "0" * 64},
     "file position 'device' must be a non-negative integer, not True"),
    ({"device": 1, "inode": 7, "offset": 0}, "file position has no 'fingerprint'"),
    ({"device": 1, "inode": 7, "offset": 0, "fingerprint": "xyz"},
     "file position 'fingerprint' must be 64 lowercase hex digits, not 'xyz'"),
])
def test_position_from_dict_names_the_problem(data: object, message: str) -> None:
    """A saved position of the wrong shape raises ValueError naming the field and the rule."""
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(") + "$"):
        FilePosition.from_dict(data)


# -- property: nothing duplicated, nothing lost --------------------------------------------------
_OPS = st.lists(st.one_of(
    st.tuples(st.just("append"), st.lists(st.integers(0, 60), min_size=1, max_size=4),
              st.booleans()),
    st.tuples(st.sampled_from(["read", "rotate", "copytruncate", "restart"]),
              st.just([0]), st.just(False)),
), max_size=40)


async def _scenario(directory: Path, ops: list[tuple[str, list[int], bool]], budget: int) -> None:
    path = directory / "maillog"
    writer = LogWriter(path)
    base = _fds()
    tail: FileTail | None = FileTail(path, from_beginning=True, max_batch_bytes=budget)
    saved: FilePosition | None = None
    out: list[str] = []
    written: list[str] = []
    in_file: list[str] = []  # complete lines in the file now at the path
    since_read: set[str] = set()
    excused: set[str] = set()  # lines a truncation or a double rotation may legitimately lose
    fragment: str | None = None  # a line written up to its middle
    taken = False  # the tail has opened the file at the path, so it drains it after a rotation
    in_copy: set[str] | None = None  # unread lines of a copytruncate copy, read from there

    def finish_fragment() -> None:
        nonlocal fragment
        if fragment is not None:
            writer.write(fragment[len(fragment) // 2:] + "\n")
            written.append(fragment)
            in_file.append(fragment)
            since_read.add(fragment)
            fragment = None

    for kind, pads, partial in ops:
        if kind != "read":
            finish_fragment()
        if kind == "append":
            for pad in pads:
                line = writer.line(pad)
                writer.write(line + "\n")
                written.append(line)
                in_file.append(line)
                since_read.add(line)
            if partial:
                fragment = writer.line(pads[0])
                writer.write(fragment[: len(fragment) // 2])
        elif kind == "read" and tail is not None:
            out += await _drain(tail)
            since_read.clear()
            in_copy = None
            taken = tail.position is not None and tail.position.inode == path.stat().st_ino
        elif kind == "rotate":
            if not taken:
                excused.update(in_file)
            # Copied and truncated, then renamed away before a read: the truncated file is
            # read from 0, the unread rest in the copy is not.
            excused.update(in_copy or ())
            in_copy = None
            writer.rotate()
            in_file, taken = [], False
        elif kind == "copytruncate":
            # What was copied aside before the tail read it is only in the copy. It is read
            # from there when the tail's position is in this file, past its start, and this
            # is the first copy since the last read; a later copy's lines are not.
            unread = since_read.intersection(in_file)
            position = tail.position if tail is not None else saved
            found = (position is not None and position.offset > 0
                     and position.inode == path.stat().st_ino)
            if in_copy is None and found:
                in_copy = unread
            else:
                excused.update(unread)
            writer.copytruncate()
            in_file = []
        elif kind == "restart" and tail is not None:
            saved = _saved(tail) if tail.position is not None else None
            tail.close()
            tail = None
        elif kind == "restart":
            tail = FileTail(path, from_beginning=True, position=saved, max_batch_bytes=budget)
    finish_fragment()
    if tail is None:
        tail = FileTail(path, from_beginning=True, position=saved, max_batch_bytes=budget)
    out += await _drain(tail)
    tail.close()

    assert set(out) <= set(written), "a line was handed out cut or garbled"
    ids = [int(line[1:6]) for line in out]
    assert ids == sorted(set(ids)), "a line was handed out twice or out of order"
    lost = [line for line in written if line not in set(out) and line not in excused]
    assert lost == []
    assert _fds() == base


@settings(max_examples=150, deadline=None)
@given(ops=_OPS, budget=st.sampled_from([128, 512, 1 << 20]))
def test_no_line_duplicated_or_lost_across_rotations_truncations_restarts(
        ops: list[tuple[str, list[int], bool]], budget: int) -> None:
    """Appends, rotations, truncations, restarts: each line once, in order, unless copied unread."""
    with tempfile.TemporaryDirectory() as directory:
        asyncio.run(_scenario(Path(directory), ops, budget))


@pytest.mark.skipif(os.geteuid() != 0, reason="without root the permission tests run directly")
def test_permission_tests_pass_without_root_privileges() -> None:
    """As root, the chmod 000 tests run as `nobody` (setpriv), who cannot read the file."""
    command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--",
               sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               str(Path(__file__).resolve()), "-k", "unreadable"]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "HOME": tempfile.gettempdir()}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[2], check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout, result.stdout
