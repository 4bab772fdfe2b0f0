"""Tail a local mail log with a restartable position, as log shippers do.

`FileTail.read()` returns the complete lines appended since the last call. Its `position`
(device, inode, the offset just after the last line handed out, a fingerprint of the bytes
before that offset) is what the caller saves, like Filebeat's registry or Fluent Bit's tail DB;
a `FileTail` given that position after a restart resumes exactly there.

- Start without a position: at the end of the file (from the start of its unfinished last line),
  or at 0 with `from_beginning`. A file first seen after the first read is read from 0.
- Rename rotation: the old file is read to its end (an unterminated last line counts as complete
  then), then the new file from 0. While the new file is still empty the writer may not have
  reopened yet, so the old file keeps being read.
- Truncation (copytruncate keeps the inode): the file is shorter than the offset or, since a
  refill can grow past the old offset between two reads, the bytes before the offset no longer
  match the fingerprint. The file is then read from 0.
- Restart: same inode and matching fingerprint resume at the offset (a different fingerprint
  is a truncation). A different inode is a rotation: the old file is looked up by inode in the
  same directory (compressed names skipped) and finished first, then the new file from 0.
- A missing path, something other than a regular file, or a file that cannot be opened or read
  raises `SourceUnavailable` on every call, so the caller shows the source as down, not idle.
  A file already open is read through its handle, whatever later happens to its permissions.

All file I/O runs in a worker thread, one `read()` at a time. A read that is cancelled moves
nothing: its lines are handed out again by the next read.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import stat
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import structlog

from daemon.threads import in_daemon_thread

log = structlog.get_logger()

# Bytes before the offset that must match for a resume; the last line or two of a mail log,
# timestamps included, so a refill after copytruncate cannot match by chance. Changing it
# invalidates saved fingerprints (those files are then read again from 0).
FINGERPRINT_BYTES = 256
# How far back from the end a first start looks for the beginning of the unfinished last line.
_LINE_START_LOOKBACK = 64 * 1024
# logrotate's `compress` writes a new file whose inode may be a recycled one: never take a
# compressed file for the text file we were reading.
_COMPRESSED_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".lz4", ".lzma", ".lz", ".z", ".zip", ".br")
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")


def split_lines(buffer: bytes) -> tuple[list[str], bytes]:
    """Complete lines (decoded, newline stripped) and the unfinished rest."""
    cut = buffer.rfind(b"\n")
    if cut < 0:
        return [], buffer
    text = buffer[:cut].decode("utf-8", errors="replace")
    return [line.rstrip("\r") for line in text.split("\n")], buffer[cut + 1 :]


def _decode(line: bytes) -> str:
    return line.decode("utf-8", errors="replace").rstrip("\r")


def _fingerprint(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fingerprint_at(fd: int, offset: int) -> str:
    size = min(offset, FINGERPRINT_BYTES)
    return _fingerprint(os.pread(fd, size, offset - size))


_EMPTY_FINGERPRINT = _fingerprint(b"")


def _truncated(offset: int) -> tuple[str, str, dict[str, Any]]:
    """The event of a truncation no copy beside the file could make up for: what was
    written after `offset` and before the truncation is not read (a copy compressed at
    once, or none: `> maillog`)."""
    return ("warning", "leakwatch_file_truncated",
            {"offset": offset,
             "consequence": "lines written after this offset and before the truncation "
                            "are not read unless a plain copy is beside the log "
                            "(logrotate: copytruncate needs delaycompress)"})


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass(frozen=True)
class FilePosition:
    """Where a file was left: the identity of the file and the offset after its last line."""

    device: int
    inode: int
    offset: int  # byte offset just after the last complete line handed out
    fingerprint: str  # sha256 hex of the (up to) FINGERPRINT_BYTES bytes just before `offset`

    def as_dict(self) -> dict[str, int | str]:
        return {"device": self.device, "inode": self.inode, "offset": self.offset,
                "fingerprint": self.fingerprint}

    @classmethod
    def from_dict(cls, data: object) -> FilePosition:
        """The position saved by `as_dict`; ValueError naming the problem otherwise."""
        if not isinstance(data, dict):
            raise ValueError(f"file position must be an object, not {type(data).__name__}")
        numbers: dict[str, int] = {}
        for key in ("device", "inode", "offset"):
            if key not in data:
                raise ValueError(f"file position has no {key!r}")
            value = data[key]
            # bool is an int subclass, but `true` is no inode number.
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(
                    f"file position {key!r} must be a non-negative integer, not {_show(value)}")
            numbers[key] = value
        if "fingerprint" not in data:
            raise ValueError("file position has no 'fingerprint'")
        digest = data["fingerprint"]
        if not isinstance(digest, str) or not _HEX_DIGEST.fullmatch(digest):
            raise ValueError(
                f"file position 'fingerprint' must be 64 lowercase hex digits, not {_show(digest)}")
        return cls(device=numbers["device"], inode=numbers["inode"], offset=numbers["offset"],
                   fingerprint=digest)


class SourceUnavailable(Exception):  # noqa: N818 - the name the leak watcher uses
    """The file cannot be read now. `reason` is a bounded metric label."""

    reason: str  # "file_missing" | "not_a_file" | "file_unreadable"

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _unavailable(path: Path, exc: OSError) -> SourceUnavailable:
    if isinstance(exc, (FileNotFoundError, NotADirectoryError)):
        reason = "file_missing"
    elif isinstance(exc, IsADirectoryError):
        reason = "not_a_file"
    else:
        reason = "file_unreadable"
    return SourceUnavailable(reason, f"cannot read {path}: {exc.strerror or exc}")


def _not_a_file(path: Path, mode: int) -> SourceUnavailable:
    what = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
    return SourceUnavailable("not_a_file", f"cannot read {path}: it is {what}")


def _open_regular(path: Path) -> tuple[int, os.stat_result]:
    """An fd on the regular file at `path`; SourceUnavailable("not_a_file") otherwise."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # O_NONBLOCK: a FIFO must not block us
    try:
        fst = os.fstat(fd)
        if not stat.S_ISREG(fst.st_mode):
            raise _not_a_file(path, fst.st_mode)
    except BaseException:
        os.close(fd)
        raise
    return fd, fst


@dataclass(frozen=True)
class _Cursor:
    """What read() starts from; replaced as a whole only when a read's lines are handed out."""

    fd: int | None = None
    at: FilePosition | None = None  # where the next read starts in the file `fd` (or `at`) is
    done: bool = False  # `at`'s file was read to its end after a rotation: do not look for it
    skip_line: bool = False  # inside a line longer than max_batch_bytes: drop up to its newline
    start_at_end: bool = False  # tail -F: the first open skips what the file already holds


@dataclass
class _Step:
    """One read's work, done in the worker thread; committed or dropped by the event loop."""

    cursor: _Cursor
    lines: list[str] = field(default_factory=list)
    used: int = 0
    more: bool = False
    opened: list[int] = field(default_factory=list)  # dropping the step closes these
    retired: list[int] = field(default_factory=list)  # committing the step closes these
    events: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    # Lines of a rotated-away file were drained, but the new file cannot be opened.
    problem: SourceUnavailable | None = None


class FileTail:
    """The lines appended to one log file, across rotation, truncation and restarts."""

    def __init__(self, path: Path, *, from_beginning: bool = False,
                 position: FilePosition | None = None,
                 max_batch_bytes: int = 4 * 1024 * 1024) -> None:
        if max_batch_bytes < 1:
            raise ValueError(f"max_batch_bytes must be at least 1, not {max_batch_bytes}")
        self.path = path
        self.max_batch_bytes = max_batch_bytes
        self._cursor = _Cursor(at=position, start_at_end=position is None and not from_beginning)
        self._more = False
        self._down: str | None = None  # reason of the current unavailability episode
        self._reading = False
        self._closed = False
        self._orphans: set[asyncio.Future[_Step]] = set()

    @property
    def more_pending(self) -> bool:
        """The last read stopped at max_batch_bytes: read again at once."""
        return self._more

    @property
    def position(self) -> FilePosition | None:
        """After the last line handed out (the given position until the file is opened)."""
        return self._cursor.at

    async def read(self) -> list[str]:
        """Complete lines appended since the last call; SourceUnavailable while unreadable."""
        if self._closed:
            raise RuntimeError(f"FileTail for {self.path} is closed")
        if self._reading:
            raise RuntimeError(f"FileTail for {self.path} is already being read")
        self._reading = True
        try:
            work = in_daemon_thread(self._step, self._cursor, name="leakwatch-file")
            try:
                step = await asyncio.shield(work)
            except SourceUnavailable as exc:
                self._cursor = replace(self._cursor, start_at_end=False)
                self._more = False
                self._report_down(exc)
                raise
            except asyncio.CancelledError:
                # The worker may still be opening files: close them when it ends. Nothing
                # moved, so the next read hands out the same lines.
                self._orphans.add(work)
                work.add_done_callback(self._drop)
                raise
        finally:
            self._reading = False
        if self._closed:  # close() ran while the worker was busy
            self._drop_step(step)
            raise RuntimeError(f"FileTail for {self.path} is closed")
        self._commit(step)
        return step.lines

    def close(self) -> None:
        """Close the file; `position` stays valid for saving."""
        self._closed = True
        fd = self._cursor.fd
        if fd is not None:
            self._cursor = replace(self._cursor, fd=None)
            os.close(fd)

    # -- the event loop side ----------------------------------------------------------------
    def _commit(self, step: _Step) -> None:
        for fd in step.retired:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._cursor = replace(step.cursor, start_at_end=False)
        self._more = step.more
        for level, event, fields in step.events:
            getattr(log, level)(event, path=str(self.path), **fields)
        if step.problem is not None:
            self._report_down(step.problem)
        elif self._down is not None:
            self._down = None
            log.info("leakwatch_file_available", path=str(self.path))

    def _report_down(self, exc: SourceUnavailable) -> None:
        if self._down is None:
            log.warning("leakwatch_file_unavailable", path=str(self.path), reason=exc.reason,
                        error=str(exc))
        self._down = exc.reason

    def _drop(self, work: asyncio.Future[_Step]) -> None:
        self._orphans.discard(work)
        if not work.cancelled() and work.exception() is None:
            self._drop_step(work.result())

    @staticmethod
    def _drop_step(step: _Step) -> None:
        for fd in step.opened:
            with contextlib.suppress(OSError):
                os.close(fd)

    # -- the worker thread side: reads files, changes nothing in self ----------------------
    def _step(self, cursor: _Cursor) -> _Step:
        step = _Step(cursor)
        try:
            self._walk(step)
        except BaseException as exc:
            self._drop_step(step)
            if isinstance(exc, OSError):
                raise _unavailable(self.path, exc) from exc
            raise
        return step

    def _walk(self, step: _Step) -> None:
        try:
            st = os.stat(self.path)
        except OSError as exc:
            raise _unavailable(self.path, exc) from exc
        if not stat.S_ISREG(st.st_mode):
            raise _not_a_file(self.path, st.st_mode)
        # At most twice round: a rotated-away file, then the file at the path.
        while True:
            if step.cursor.fd is None:
                try:
                    st = self._open(step, st)
                except SourceUnavailable as exc:
                    if not step.lines:
                        raise
                    step.problem = exc  # hand out the old file's lines; the next read raises
                    return
            fd, at = step.cursor.fd, step.cursor.at
            assert fd is not None
            assert at is not None
            at_path = (at.device, at.inode) == (st.st_dev, st.st_ino)
            if at_path or st.st_size == 0:
                # Our file is still at the path, or the new file there is empty: the writer
                # may still be appending to the renamed one, so keep reading that.
                self._advance(step, final=False, at_path=at_path)
                return
            self._advance(step, final=True)
            if step.more:
                return
            step.events.append(("info", "leakwatch_file_rotated", {"inode": at.inode}))
            step.retired.append(fd)
            step.cursor = replace(step.cursor, fd=None, done=True)

    def _open(self, step: _Step, st: os.stat_result) -> os.stat_result:
        """Open what the next read continues: a rotated-away file or the file at the path."""
        cursor = step.cursor
        at = cursor.at
        if at is not None and not cursor.done and (at.device, at.inode) != (st.st_dev, st.st_ino):
            found = self._find_rotated(step, at)
            if found is not None:
                step.cursor = replace(cursor, fd=found[0], at=found[1])
                return st
            step.events.append(("warning", "leakwatch_file_rotated_while_stopped",
                                {"inode": at.inode, "offset": at.offset}))
            at = None
        try:
            fd, fst = _open_regular(self.path)
        except OSError as exc:
            raise _unavailable(self.path, exc) from exc
        step.opened.append(fd)
        skip_line = False
        if at is not None and (at.device, at.inode) == (fst.st_dev, fst.st_ino):
            if fst.st_size >= at.offset and _fingerprint_at(fd, at.offset) == at.fingerprint:
                offset = at.offset
            elif (copy := self._find_copy(step, at)) is not None:
                # Truncated while we were away, its bytes copied aside first: finish the
                # copy, then read this file from 0 (the walk does both).
                step.opened.remove(fd)
                os.close(fd)
                step.cursor = replace(cursor, fd=copy[0], at=copy[1])
                return fst
            else:
                step.events.append(_truncated(at.offset))
                offset = 0
        elif cursor.start_at_end:
            offset, skip_line = self._line_start_near_end(fd, fst.st_size)
        else:
            offset = 0
        position = FilePosition(fst.st_dev, fst.st_ino, offset, _fingerprint_at(fd, offset))
        step.cursor = _Cursor(fd=fd, at=position, skip_line=skip_line)
        return fst

    @staticmethod
    def _line_start_near_end(fd: int, size: int) -> tuple[int, bool]:
        """Where the unfinished last line starts, so it is handed out whole once complete."""
        start = max(0, size - _LINE_START_LOOKBACK)
        cut = os.pread(fd, size - start, start).rfind(b"\n")
        if cut >= 0:
            return start + cut + 1, False
        if start == 0:
            return 0, False
        return size, True  # a line longer than the look-back: drop what is left of it

    def _find_rotated(self, step: _Step, at: FilePosition) -> tuple[int, FilePosition] | None:
        """The file `at` names if it was renamed within the directory, and where to go on."""
        try:
            with os.scandir(self.path.parent) as scan:
                entries = list(scan)
        except OSError:
            return None
        for entry in entries:
            if entry.name.lower().endswith(_COMPRESSED_SUFFIXES):
                continue
            try:
                est = entry.stat(follow_symlinks=False)
                if ((est.st_dev, est.st_ino) != (at.device, at.inode)
                        or not stat.S_ISREG(est.st_mode)):
                    continue
                fd, fst = _open_regular(Path(entry.path))
            except (OSError, SourceUnavailable):
                continue
            try:
                ours = (fst.st_dev, fst.st_ino) == (at.device, at.inode)
                intact = (ours and fst.st_size >= at.offset
                          and _fingerprint_at(fd, at.offset) == at.fingerprint)
            except OSError:
                ours = intact = False
            if intact:
                resume = at
            elif ours and entry.name.startswith(self.path.name):
                # Our log under its rotated name, truncated before it was rotated: all of it
                # was written after what we handed out.
                resume = FilePosition(at.device, at.inode, 0, _EMPTY_FINGERPRINT)
            else:
                os.close(fd)  # the inode was reused for another file
                return None
            step.opened.append(fd)
            step.events.append(("info", "leakwatch_file_resumed_rotated",
                                {"rotated": entry.path, "offset": resume.offset}))
            self._warn_skipped(step, entries, entry, est)
            return fd, resume
        return None

    def _warn_skipped(self, step: _Step, entries: list[os.DirEntry[str]],
                      ours: os.DirEntry[str], ours_st: os.stat_result) -> None:
        """Rotated more than once while we were stopped: the files written between ours
        and the one at the path are not read. Say which, so they can be scanned."""
        later = []
        for entry in entries:
            if entry.name == self.path.name or entry.path == ours.path \
                    or not entry.name.startswith(self.path.name):
                continue
            try:
                est = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISREG(est.st_mode) and est.st_mtime_ns > ours_st.st_mtime_ns:
                later.append(entry.path)
        if later:
            step.events.append(("warning", "leakwatch_file_rotations_not_read",
                                {"files": sorted(later),
                                 "hint": "rotated more than once while stopped; "
                                         "scan them: selfcheckd scan --file FILE"}))

    def _find_copy(self, step: _Step, at: FilePosition) -> tuple[int, FilePosition] | None:
        """After our file was truncated in place: the copy logrotate's copytruncate left
        beside it (`maillog.1`, `maillog-20261125`; not compressed yet) if it still holds
        the bytes we stopped at, opened and positioned there. Newest first; None if none."""
        if at.offset == 0:
            return None  # no bytes of ours to recognise the copy by
        try:
            with os.scandir(self.path.parent) as scan:
                entries = list(scan)
        except OSError:
            return None
        candidates: list[tuple[int, str, os.DirEntry[str], os.stat_result]] = []
        for entry in entries:
            if (not entry.name.startswith(self.path.name) or entry.name == self.path.name
                    or entry.name.lower().endswith(_COMPRESSED_SUFFIXES)):
                continue
            try:
                est = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if (stat.S_ISREG(est.st_mode) and est.st_size >= at.offset
                    and (est.st_dev, est.st_ino) != (at.device, at.inode)):
                candidates.append((est.st_mtime_ns, entry.path, entry, est))
        for _, name, entry, est in sorted(candidates, key=lambda c: c[:2], reverse=True):
            try:
                fd, fst = _open_regular(Path(name))
            except (OSError, SourceUnavailable):
                continue
            try:
                same = fst.st_size >= at.offset and (
                    _fingerprint_at(fd, at.offset) == at.fingerprint)
            except OSError:
                same = False
            if not same:
                os.close(fd)
                continue
            step.opened.append(fd)
            step.events.append(("info", "leakwatch_file_resumed_copy",
                                {"copy": name, "offset": at.offset}))
            # Copied and truncated again since (twice while stopped): the later copies
            # are not read; say which.
            self._warn_skipped(step, entries, entry, est)
            return fd, FilePosition(fst.st_dev, fst.st_ino, at.offset, at.fingerprint)
        return None

    def _advance(self, step: _Step, *, final: bool, at_path: bool = False) -> None:
        """Hand out the complete lines after the cursor, within what is left of the budget."""
        cursor = step.cursor
        fd, at = cursor.fd, cursor.at
        assert fd is not None
        assert at is not None
        budget = max(0, self.max_batch_bytes - step.used)
        size = os.fstat(fd).st_size
        keep = min(at.offset, FINGERPRINT_BYTES)
        data = b""
        if size >= at.offset:
            # One pread both checks the bytes before the offset and reads what is new.
            data = os.pread(fd, keep + min(budget, size - at.offset), at.offset - keep)
        skip = cursor.skip_line
        if size < at.offset or _fingerprint(data[:keep]) != at.fingerprint:
            if at_path and (copy := self._find_copy(step, at)) is not None:
                # copytruncate: what was written after our offset and before the truncation
                # is in the copy. Read it there first; this file, still the one at the path,
                # is reopened from 0 after. (One renamed away since would not be reopened:
                # it is read from 0 below, as before.)
                step.retired.append(fd)
                step.cursor = replace(cursor, fd=copy[0], at=copy[1])
                step.more = True
                return
            # Truncated, perhaps refilled past the offset already: what we had is gone.
            step.events.append(_truncated(at.offset))
            at = replace(at, offset=0, fingerprint=_EMPTY_FINGERPRINT)
            keep, skip = 0, False
            data = os.pread(fd, min(budget, size), 0)
        before, new = data[:keep], data[keep:]
        start = 0
        if skip:
            newline = new.find(b"\n")
            start, skip = (len(new), True) if newline < 0 else (newline + 1, False)
        lines, rest = split_lines(new[start:])
        used = len(new) - len(rest)
        at_end = at.offset + len(new) >= size
        if rest and final and at_end:
            lines.append(_decode(rest))  # the writer moved on: this line will not grow
            used = len(new)
        elif len(rest) >= self.max_batch_bytes:
            lines.append(_decode(rest))
            used, skip = len(new), True
            step.events.append(("warning", "leakwatch_file_line_too_long",
                                {"offset": at.offset + start, "kept_bytes": len(rest)}))
        if used:
            tail = new[max(0, used - FINGERPRINT_BYTES):used]
            if len(tail) < FINGERPRINT_BYTES:
                tail = (before + tail)[-FINGERPRINT_BYTES:]
            at = replace(at, offset=at.offset + used, fingerprint=_fingerprint(tail))
        step.cursor = replace(cursor, at=at, skip_line=skip)
        step.lines.extend(lines)
        step.used += len(new)
        step.more = not at_end
