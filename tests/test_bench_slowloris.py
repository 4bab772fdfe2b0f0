"""Issue 17's slowloris attack on a real `selfcheckd run` under `prlimit --nofile=1024`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.slowloris import network_address

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_1100_idle_sockets_leave_the_monitor_working() -> None:
    """1,100 idle sockets against a 1,024-fd daemon: it stays up with fds to spare, every
    round trip and leak still gets through, and the log stays small (no line per socket)."""
    assert shutil.which("prlimit"), "prlimit (util-linux) is needed"
    source = "network" if network_address() else "loopback"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.slowloris", "--seconds", "8", "--from", source],
        cwd=ROOT, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["alive"]
    assert result["daemon_fds_max"] < 1024 // 2
    assert result["round_trips_failed"] == 0 and result["round_trips_ok"] >= 2
    assert result["leak_alerts_seen"] == result["leaks_written"]
    assert result["shed"] > 1100 - 200  # the flood was real: most sockets were shed
    assert result["log_lines_shed"] <= 1 and result["log_bytes"] < 64 * 1024
    if source == "network":  # the health check comes from loopback, as ECS's does
        assert set(result["healthz"]) == {"200"}, result["healthz"]
