"""Small shared pieces of the integration labs: required binaries, root, and (from
daemon.embedded.processes, which the shipped sendmail cluster shares) ports, polling,
starting and stopping daemons."""

from __future__ import annotations

import os

import pytest

from daemon.embedded.processes import (
    INSTALL_HINT,
    binary,
    find_binary,
    free_port,
    run,
    start_daemon,
    stop_daemon,
    tail,
    wait_for_port,
    wait_until,
)

__all__ = [
    "binary", "find_binary", "free_port", "require_binaries", "require_root", "run",
    "start_daemon", "stop_daemon", "tail", "wait_for_port", "wait_until",
]


def require_binaries(*names: str) -> None:
    """Skip when a Debian binary is missing; under CI=true a missing binary is a failure."""
    missing = [name for name in names if find_binary(name) is None]
    if not missing:
        return
    reason = f"missing system binaries {', '.join(missing)} ({INSTALL_HINT})"
    if os.environ.get("CI") == "true":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


def require_root(why: str) -> None:
    """Skip (fail under CI=true) when not root: the labs bind port 25, own /dev/log, etc."""
    if os.geteuid() == 0:
        return
    reason = f"integration labs need root to {why}"
    if os.environ.get("CI") == "true":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)
