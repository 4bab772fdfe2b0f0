"""A /probe answer as Prometheus metrics, the way blackbox_exporter answers its /probe.

A scrape job with `metrics_path: /probe` and `params: {route: [NAME]}` gets
`probe_success` and `probe_duration_seconds` (the names every blackbox
dashboard and rule already knows) plus the round trip's own details under
`probe_selfcheck_*`: each step's duration and outcome, the failure reason as a
one-hot gauge over the fixed set of reasons (never error text: label values
stay bounded), and whether the answer is a cached one. No `route` label: the
scrape job's target labels say which route it is, as with blackbox's targets.

The format follows the request's Accept header (`prometheus_client` picks the
text format or OpenMetrics, as for /metrics); `wants_metrics` decides between
metrics and JSON with `python-mimeparse`, JSON being the answer to `*/*`.
"""

from __future__ import annotations

from collections.abc import Iterator

import mimeparse
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from daemon.checks.result import CheckResult, FailureReason

# Ties (`*/*`, no Accept at all) go to the last entry: JSON, the answer /probe always gave.
_OFFERED = ["text/plain", "application/openmetrics-text", "application/json"]


def wants_metrics(accept: str) -> bool:
    """Whether `accept` prefers the Prometheus text or OpenMetrics format to JSON."""
    if not accept.strip():
        return False
    try:
        best = mimeparse.best_match(_OFFERED, accept)
    except (mimeparse.MimeTypeParseException, ValueError, IndexError):
        return False  # a header we cannot read gets the default
    return bool(best) and best != "application/json"


class _Answer(Collector):
    def __init__(self, result: CheckResult, cached: bool, age: float) -> None:
        self._result = result
        self._cached = cached
        self._age = age

    def collect(self) -> Iterator[Metric]:
        r = self._result
        yield _gauge("probe_success", "1 if the route's round trip succeeded, else 0.",
                     1.0 if r.success else 0.0)
        if r.started_at is not None and r.finished_at is not None:
            duration = max(0.0, r.finished_at - r.started_at)
        else:
            duration = sum(s.duration for s in r.steps)
        yield _gauge("probe_duration_seconds",
                     "How long the round trip took, from its start to its verdict.", duration)
        took = GaugeMetricFamily("probe_selfcheck_step_duration_seconds",
                                 "Duration of each step of the round trip.", labels=["step"])
        ok = GaugeMetricFamily("probe_selfcheck_step_success",
                               "1 if the step succeeded, else 0.", labels=["step"])
        for step in r.steps:
            took.add_metric([step.name], step.duration)
            ok.add_metric([step.name], 1.0 if step.ok else 0.0)
        yield took
        yield ok
        reason = GaugeMetricFamily(
            "probe_selfcheck_failure_reason",
            "1 for the reason the round trip failed (all 0 when it succeeded).",
            labels=["reason"])
        for value in FailureReason:
            reason.add_metric([value.value], 1.0 if r.reason is value else 0.0)
        yield reason
        yield _gauge("probe_selfcheck_cached",
                     "1 if this is the latest result again, not a new run (a run for the route "
                     "started less than [server] probe_min_interval ago).",
                     1.0 if self._cached else 0.0)
        yield _gauge("probe_selfcheck_result_age_seconds",
                     "Seconds since the run that gave this result ended.", self._age)
        if r.finished_at is not None:
            yield _gauge("probe_selfcheck_finished_timestamp_seconds",
                         "Unix time the run that gave this result ended.", r.finished_at)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def render(result: CheckResult, *, cached: bool, age: float, accept: str) -> tuple[bytes, str]:
    """The result as a metrics body in the format `accept` asks for, and its Content-Type."""
    encoder, content_type = choose_encoder(accept)
    return encoder(_Answer(result, cached, age)), content_type
