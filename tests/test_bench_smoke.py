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
                    "flood: `run` RSS", "flood: leaks accounted for",
                    "state save, quiet", "worker process", "frozen state volume"):
        assert measure in out, measure


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_hostile_imap_benchmark_prints_its_table() -> None:
    """The hostile-IMAP memory benchmark runs `check` and `run` against a flooding server
    and prints a row for each, with the bound the run failed on (no thresholds)."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench.hostile_imap", "--seconds", "6", "--flood", "literal"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| `")]
    assert [row.split(" | ")[0] for row in rows] == ["| `check`", "| `run`"]
    assert all("limit 4 MiB" in row for row in rows), proc.stdout
