"""Helpers shared by the Prometheus and Grafana tests: promtool, metric names, PromQL checks."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml

from daemon.metrics import Metrics
from tests.integration.support import binary, require_binaries

# Series that Prometheus itself provides for every target.
PROMETHEUS_SERIES = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})
# The prefixes of every selfcheckd metric; identifiers with these are checked.
OUR_PREFIXES = ("selfcheck_", "selfcheckd_", "sinkhole_", "maillog_", "leakwatch_", "mta_")
_IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')

_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
}


def exported_series_names() -> frozenset[str]:
    """Every series name selfcheckd's /metrics can expose, as Prometheus stores it."""
    names: set[str] = set()
    for family in Metrics().registry.collect():
        names.update(family.name + suffix for suffix in _SUFFIXES[family.type])
    return frozenset(names)


def our_metric_names(expr: str) -> set[str]:
    """The selfcheckd metric names a PromQL expression mentions (quoted strings ignored)."""
    bare = _QUOTED.sub('""', expr)
    return {word for word in _IDENTIFIER.findall(bare) if word.startswith(OUR_PREFIXES)}


def promtool() -> str:
    """promtool's path; skips the test without it, fails it under CI=true."""
    require_binaries("promtool")
    return binary("promtool")


def run_promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run promtool with a deadline; the caller asserts on returncode and output."""
    return subprocess.run(
        [promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def check_expressions_parse(exprs: dict[str, str], workdir: Path) -> None:
    """Fail naming the first expression promtool rejects (one recording rule per expression)."""
    rules = [{"record": f"selfcheckd:check_{i}", "expr": e} for i, e in enumerate(exprs.values())]
    path = workdir / "expressions.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "exprs", "rules": rules}]}))
    result = run_promtool("check", "rules", str(path))
    if result.returncode != 0:
        # Narrow down to the culprit so the failure names the panel, not rule N.
        for where, expr in exprs.items():
            one = workdir / "one.rules.yml"
            one.write_text(yaml.safe_dump(
                {"groups": [{"name": "one", "rules": [{"record": "x:y", "expr": expr}]}]}
            ))
            single = run_promtool("check", "rules", str(one))
            assert single.returncode == 0, f"{where}: {expr}\n{single.stdout}{single.stderr}"
        raise AssertionError(result.stdout + result.stderr)
