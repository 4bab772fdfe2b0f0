"""The state volume's I/O, run as a child process of `selfcheckd run`: one operation, then exit.

A write stuck on a frozen volume (a stalled EFS/NFS hard mount) waits in the kernel, in
uninterruptible sleep: no signal ends it until the volume answers. In a thread of the
daemon it would hold the whole process (a process exits only when all its threads do);
in this child it holds only the child, which the daemon abandons at its deadline
(daemon/state_io.py).

Run as `python -I -S state_worker.py OPERATION ARGS...`, with the standard library
only, so that it starts in a few tens of milliseconds:

- `write PATH SIZE`: read exactly SIZE bytes from stdin, then write them to PATH
  atomically: a temporary file beside it (`.NAME.XXXX.tmp`), fsync, rename over PATH,
  fsync the directory. Nothing touches the volume before the bytes are all here.
- `load PATH MAX_BYTES STALE_BEFORE`: remove the temporaries of saves a kill cut short
  (modified before STALE_BEFORE, epoch seconds), then read PATH if it is a regular file
  of at most MAX_BYTES, opened without blocking (a FIFO at the path must not hang us).
- `rename SOURCE TARGET`: move an unusable file aside.

The answer on stdout is one JSON line, `{"ok": true, ...}` or `{"ok": false, "kind":
..., "errno": ..., "error": ...}`; `load` follows it with the file's bytes.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any, BinaryIO


def _failure(kind: str, exc: BaseException | None = None, error: str = "") -> dict[str, Any]:
    if isinstance(exc, OSError):
        return {"ok": False, "kind": kind, "errno": exc.errno,
                "error": exc.strerror or str(exc)}
    return {"ok": False, "kind": kind, "errno": None,
            "error": error or f"{type(exc).__name__}: {exc}"}


def write(path: Path, size: int, source: BinaryIO) -> dict[str, Any]:
    payload = source.read(size)
    if len(payload) != size or source.read(1):
        # The daemon stopped sending (it died or gave up): write nothing.
        return _failure("input", error=f"got {len(payload)} of {size} bytes")
    try:
        # A fresh volume or host may not have the directory yet (/var/lib/selfcheckd).
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        temporary = Path(name)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        # The rename itself must reach the disk too.
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except OSError as exc:
        return _failure("os", exc)
    return {"ok": True}


def remove_stale_temporaries(path: Path, stale_before: float) -> dict[str, Any]:
    """Temporary files of saves a kill cut short (each as big as the state). Only old
    ones: a task overlapping us on a shared volume may be writing a fresh one now."""
    removed = 0
    try:
        for temporary in path.parent.glob(f".{path.name}.*.tmp"):
            if temporary.stat().st_mtime < stale_before:
                temporary.unlink(missing_ok=True)
                removed += 1
    except FileNotFoundError:
        pass  # no directory yet: nothing was ever saved there
    except OSError as exc:
        return {"removed": removed, "temporaries_error": exc.strerror or str(exc)}
    return {"removed": removed}


def load(path: Path, max_bytes: int, stale_before: float) -> tuple[dict[str, Any], bytes]:
    cleanup = remove_stale_temporaries(path, stale_before)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return {**_failure("absent", error="no such file"), **cleanup}, b""
    except OSError as exc:
        return {**_failure("os", exc), **cleanup}, b""
    try:
        with os.fdopen(fd, "rb") as fh:
            # Type and size of the open file: nothing can be swapped in between.
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                return {**_failure("unusable", error="not a regular file (mode "
                                   f"{stat.filemode(info.st_mode)})"), **cleanup}, b""
            if info.st_size > max_bytes:
                return {**_failure("unusable", error=f"{info.st_size} bytes, more than the "
                                   f"{max_bytes} a state file can hold"), **cleanup}, b""
            data = fh.read(max_bytes + 1)
    except OSError as exc:
        return {**_failure("os", exc), **cleanup}, b""
    if len(data) > max_bytes:  # it grew while we read it
        return {**_failure("unusable", error=f"more than the {max_bytes} bytes a state "
                           "file can hold"), **cleanup}, b""
    return {"ok": True, "size": len(data), **cleanup}, data


def rename(source: Path, target: Path) -> dict[str, Any]:
    try:
        os.replace(source, target)
    except OSError as exc:
        return _failure("os", exc)
    return {"ok": True}


def main(argv: list[str]) -> int:
    # The daemon alone decides when this ends (its deadline, then SIGKILL): a terminal's
    # Ctrl-C or a service manager's SIGTERM to the group must not cut a write short.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    out = sys.stdout.buffer
    data = b""
    try:
        operation, *args = argv
        if operation == "write":
            answer = write(Path(args[0]), int(args[1]), sys.stdin.buffer)
        elif operation == "load":
            answer, data = load(Path(args[0]), int(args[1]), float(args[2]))
        elif operation == "rename":
            answer = rename(Path(args[0]), Path(args[1]))
        else:
            answer = _failure("usage", error=f"unknown operation {operation!r}")
    except Exception as exc:  # answered, so the daemon can say what went wrong
        answer = _failure("internal", exc)
    out.write(json.dumps(answer).encode() + b"\n")
    out.write(data)
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
