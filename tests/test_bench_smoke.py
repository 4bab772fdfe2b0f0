"""`python -m bench --small` runs end to end and prints its one table (no thresholds)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_small_benchmark_prints_its_table() -> None:
    """The benchmark command generates a small input, runs every section but the Dovecot
    lab (the integration tier's) and prints one table with a row for each measure."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--small", "--skip", "dovecot"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    out = proc.stdout
    assert out.count("| measure | result | ratio | against |") == 1
    for measure in ("scan: `grep -F -i -c", "scan: fast path findings", "scan: fast path peak RSS",
                    "scan, hard shapes: findings", "live watcher:", "run: RSS after start-up",
                    "check, 10 routes",
                    "pymap (embedded), IDLE", "polling every 2 s",
                    "FilterLogEvents calls per idle poll", "put-to-alert latency",
                    "flood: `run` RSS", "flood: leaks accounted for"):
        assert measure in out, measure
