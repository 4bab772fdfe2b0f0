"""The suite's mends for Debian's libfaketime 0.9.10 (tests/faketime_site) reach a child."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SITE = Path(__file__).parent / "faketime_site"
CHILD = """
import json, os, subprocess, sys, time
time.sleep(0.01)  # EINVAL from libfaketime 0.9.10 without the mend
subprocess.run([sys.executable, "-c", "pass"], timeout=30, check=True)  # sleeps while it waits
print(json.dumps({"year": time.gmtime().tm_year,
                  "fix": os.environ.get("FAKETIME_FORCE_MONOTONIC_FIX"),
                  "cache": os.environ.get("FAKETIME_CACHE_DURATION")}))
"""


def faketime() -> str:
    path = shutil.which("faketime")
    if path is None:
        reason = "faketime is not installed (run scripts/install-system-deps as root)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    return path


def test_a_python_child_sleeps_and_waits_on_a_faked_wall_clock_with_a_real_monotonic() -> None:
    """Under `faketime` with FAKETIME_DONT_FAKE_MONOTONIC=1 a Python child that loads the mend
    sleeps, waits for its own child with a timeout, sees the faked year, passes monotonic
    deadlines through (no GIL thrash) and hands its children an offset read once."""
    env = {**os.environ, "FAKETIME_DONT_FAKE_MONOTONIC": "1", "PYTHONPATH": str(SITE)}
    for name in ("FAKETIME_FORCE_MONOTONIC_FIX", "FAKETIME_CACHE_DURATION"):
        env.pop(name, None)
    proc = subprocess.run(
        [faketime(), "-f", "@2031-06-01 12:00:00", sys.executable, "-c", CHILD],
        env=env, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"year": 2031, "fix": "0", "cache": str(10**9)}
