"""The state volume's I/O, run as a child process of `selfcheckd run`: one operation, then exit.

A write stuck on a frozen volume (a stalled EFS/NFS hard mount) waits in the kernel, in
uninterruptible sleep: no signal ends it until the volume answers. In a thread of the
daemon it would hold the whole process (a process exits only when all its threads do);
in this child it holds only the child, which the daemon abandons at its deadline
(daemon/state_io.py).

Run as `python -I -S state_worker.py OPERATION ARGS...`, with the standard library
only, so that it starts in a few tens of milliseconds:

- `write PATH SIZE`: read exactly SIZE bytes from stdin, then write them to PATH
  atomically: a temporary file beside it (`.NAME.XXXXXXXXXXXX.tmp`), fsync, rename over PATH,
  fsync the directory. Nothing touches the volume before the bytes are all here.
- `load PATH MAX_BYTES STALE_BEFORE`: remove the temporaries of saves a kill cut short
  (modified before STALE_BEFORE, epoch seconds), then read PATH if it is a regular file
  of at most MAX_BYTES, opened without blocking (a FIFO at the path must not hang us).
- `rename SOURCE TARGET`: move an unusable file aside.

The answer on stdout is one JSON line, `{"ok": true, ...}` or `{"ok": false, "kind":
..., "errno": ..., "error": ...}`; `load` follows it with the file's bytes.
"""

from __future__ import annotations

# io, os, sys and stat only: the interpreter has them loaded at start, so a worker starts
# in about 12 ms here (json, pathlib, tempfile or signal would double that, per save).
import io
import os
import stat
import sys

Answer = dict[str, "str | int | bool | None"]


def _quote(text: str) -> str:
    """A JSON string, without importing json."""
    out = ['"']
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch < " ":
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _json(answer: Answer) -> bytes:
    parts = []
    for key, value in answer.items():
        if value is None:
            shown = "null"
        elif isinstance(value, bool):
            shown = "true" if value else "false"
        elif isinstance(value, int):
            shown = str(value)
        else:
            shown = _quote(value)
        parts.append(f"{_quote(key)}: {shown}")
    return ("{" + ", ".join(parts) + "}").encode("utf-8", "backslashreplace")


def _failure(kind: str, exc: BaseException | None = None, error: str = "") -> Answer:
    if isinstance(exc, OSError):
        return {"ok": False, "kind": kind, "errno": exc.errno,
                "error": exc.strerror or str(exc)}
    return {"ok": False, "kind": kind, "errno": None,
            "error": error or f"{type(exc).__name__}: {exc}"}


def _split(path: str) -> tuple[str, str]:
    directory, _, name = path.rpartition("/")
    return directory or ".", name


def _fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temporary(directory: str, name: str) -> tuple[int, str]:
    """A new file `.NAME.XXXXXXXXXXXX.tmp` beside the state file, ours alone (O_EXCL)."""
    while True:
        candidate = f"{directory}/.{name}.{os.urandom(6).hex()}.tmp"
        try:
            return os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), candidate
        except FileExistsError:
            continue


def write(path: str, size: int, source: io.BufferedIOBase) -> Answer:
    payload = source.read(size)
    if len(payload) != size or source.read(1):
        # The daemon stopped sending (it died or gave up): write nothing.
        return _failure("input", error=f"got {len(payload)} of {size} bytes")
    directory, name = _split(path)
    try:
        # A fresh volume or host may not have the directory yet (/var/lib/selfcheckd).
        os.makedirs(directory, mode=0o700, exist_ok=True)
        fd, temporary = _temporary(directory, name)
        try:
            try:
                view = memoryview(payload)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temporary, path)
        except BaseException:
            try:  # noqa: SIM105 - contextlib would cost the start-up time saved above
                os.unlink(temporary)
            except OSError:
                pass
            raise
        _fsync_directory(directory)  # the rename itself must reach the disk too
    except OSError as exc:
        return _failure("os", exc)
    return {"ok": True}


def remove_stale_temporaries(path: str, stale_before: float) -> Answer:
    """Temporary files of saves a kill cut short (each as big as the state). Only old
    ones: a task overlapping us on a shared volume may be writing a fresh one now."""
    directory, name = _split(path)
    prefix = f".{name}."
    removed = 0
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                if (entry.name.startswith(prefix) and entry.name.endswith(".tmp")
                        and entry.stat(follow_symlinks=False).st_mtime < stale_before):
                    try:
                        os.unlink(entry.path)
                    except FileNotFoundError:
                        continue
                    removed += 1
    except FileNotFoundError:
        pass  # no directory yet: nothing was ever saved there
    except OSError as exc:
        return {"removed": removed, "temporaries_error": exc.strerror or str(exc)}
    return {"removed": removed}


def load(path: str, max_bytes: int, stale_before: float) -> tuple[Answer, bytes]:
    cleanup = remove_stale_temporaries(path, stale_before)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return {**_failure("absent", error="no such file"), **cleanup}, b""
    except OSError as exc:
        return {**_failure("os", exc), **cleanup}, b""
    try:
        # Type and size of the open file: nothing can be swapped in between.
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return {**_failure("unusable", error="not a regular file (mode "
                               f"{stat.filemode(info.st_mode)})"), **cleanup}, b""
        if info.st_size > max_bytes:
            return {**_failure("unusable", error=f"{info.st_size} bytes, more than the "
                               f"{max_bytes} a state file can hold"), **cleanup}, b""
        chunks, total = [], 0
        while total <= max_bytes:
            chunk = os.read(fd, max_bytes + 1 - total)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except OSError as exc:
        return {**_failure("os", exc), **cleanup}, b""
    finally:
        os.close(fd)
    if total > max_bytes:  # it grew while we read it
        return {**_failure("unusable", error=f"more than the {max_bytes} bytes a state "
                           "file can hold"), **cleanup}, b""
    return {"ok": True, "size": total, **cleanup}, b"".join(chunks)


def rename(source: str, target: str) -> Answer:
    try:
        os.replace(source, target)
    except OSError as exc:
        return _failure("os", exc)
    return {"ok": True}


def main(argv: list[str]) -> int:
    data = b""
    try:
        operation, *args = argv
        if operation == "write":
            stdin = sys.stdin.buffer
            assert isinstance(stdin, io.BufferedIOBase)
            answer = write(args[0], int(args[1]), stdin)
        elif operation == "load":
            answer, data = load(args[0], int(args[1]), float(args[2]))
        elif operation == "rename":
            answer = rename(args[0], args[1])
        else:
            answer = _failure("usage", error=f"unknown operation {operation!r}")
    except Exception as exc:  # answered, so the daemon can say what went wrong
        answer = _failure("internal", exc)
    out = sys.stdout.buffer
    out.write(_json(answer) + b"\n")
    out.write(data)
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
