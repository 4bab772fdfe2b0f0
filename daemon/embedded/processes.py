"""Running real Debian daemons on loopback: binaries, free ports, polling, start and stop.

Shared by the integration labs (tests/integration) and the sendmail cluster that
`selfcheckd demo --drill` ships (daemon.embedded.sendmail_cluster).
"""

from __future__ import annotations

import ctypes
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

INSTALL_HINT = "run scripts/install-system-deps as root"


def find_binary(name: str) -> str | None:
    """Find a binary on PATH or in the sbin directories a non-root PATH often lacks."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/lib/dovecot")


def binary(name: str) -> str:
    """The absolute path of a binary, or RuntimeError naming it and how to install it."""
    path = find_binary(name)
    if path is None:
        raise RuntimeError(f"{name} not found ({INSTALL_HINT})")
    return path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (daemons that need a number up front)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(
    probe: Callable[[], T | None], *, timeout: float, what: str, interval: float = 0.05
) -> T:
    """Poll `probe` until it returns a non-None value; TimeoutError naming `what` after
    `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def wait_for_port(host: str, port: int, *, timeout: float, what: str) -> None:
    """Wait until a TCP listener accepts connections on host:port."""

    def accepts() -> bool | None:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            return None

    wait_until(accepts, timeout=timeout, what=f"{what} to listen on {host}:{port}")


def run(args: Sequence[str], *, timeout: float = 30, stdin: str | None = None) -> str:
    """Run a command to completion; RuntimeError with its stderr when it fails."""
    proc = subprocess.run(
        list(args), input=stdin, capture_output=True, text=True, timeout=timeout, check=False
    )
    if proc.returncode != 0:
        output = proc.stderr.strip() or proc.stdout.strip()
        raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}: {output}")
    return proc.stdout


def tail(path: Path, lines: int = 20) -> str:
    """The end of a daemon's log, for error messages when it fails to start."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no log: {exc})"


def start_daemon(args: Sequence[str], log_path: Path, *, new_session: bool = False,
                 death_signal: int = signal.SIGTERM) -> subprocess.Popen[bytes]:
    """Start a daemon in the foreground, its output in `log_path`.

    The kernel sends it `death_signal` if the thread that started it ends, so a killed
    test run or demo never leaves a private rsyslogd or sendmail behind. `new_session`:
    in a process group of its own (stopped as a whole, as ECS stops a task).
    """
    with log_path.open("wb") as output:
        return subprocess.Popen(
            list(args), stdout=output, stderr=output, stdin=subprocess.DEVNULL,
            preexec_fn=lambda: die_with_parent(death_signal), start_new_session=new_session,
        )


def stop_daemon(process: subprocess.Popen[bytes] | None, *, timeout: float = 10) -> None:
    """SIGTERM, wait, then SIGKILL if it lingers."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """In a child before exec: `signum` when the thread that forked it ends (Linux
    PR_SET_PDEATHSIG)."""
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signum)
