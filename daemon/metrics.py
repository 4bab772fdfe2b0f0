"""Every Prometheus metric selfcheckd exports, named in one place.

One `Metrics` object owns one `CollectorRegistry`, so tests (and two daemons in
one process) never share counters. Labels carry only bounded values: route
names from the config, reasons from a fixed enum, never error text.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from daemon import __version__

# 50 ms resolves a local loop-back round trip; 10 min is the longest timeout an
# operator is likely to configure. Roughly x2 steps in between.
DURATION_BUCKETS = (
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)


class Metrics:
    """The daemon's metrics, registered on a private registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry

        # -- the round-trip selfcheck ------------------------------------------------
        self.runs = Counter(
            "selfcheck_runs", "Selfcheck runs by route and result (success|failure).",
            ["route", "result"], registry=r,
        )
        self.failures = Counter(
            "selfcheck_failures", "Failed selfcheck runs by route and reason.",
            ["route", "reason"], registry=r,
        )
        self.success = Gauge(
            "selfcheck_success", "1 if the last selfcheck of the route succeeded, else 0.",
            ["route"], registry=r,
        )
        self.last_run = Gauge(
            "selfcheck_last_run_timestamp_seconds", "Unix time the last selfcheck run ended.",
            ["route"], registry=r,
        )
        self.last_success = Gauge(
            "selfcheck_last_success_timestamp_seconds",
            "Unix time the last successful selfcheck run ended.",
            ["route"], registry=r,
        )
        self.send_duration = Histogram(
            "selfcheck_send_duration_seconds", "Duration of the SMTP transaction of a probe.",
            ["route"], buckets=DURATION_BUCKETS, registry=r,
        )
        self.reception_duration = Histogram(
            "selfcheck_reception_duration_seconds",
            "Time from SMTP acceptance of a probe to its detection in the mailbox.",
            ["route"], buckets=DURATION_BUCKETS, registry=r,
        )
        self.late_arrivals = Counter(
            "selfcheck_late_arrivals",
            "Probes of earlier runs found in the mailbox after their timeout (and deleted).",
            ["route"], registry=r,
        )
        self.cleanup_failures = Counter(
            "selfcheck_cleanup_failures", "Runs whose probe could not be deleted afterwards.",
            ["route"], registry=r,
        )
        self.skipped_runs = Counter(
            "selfcheck_skipped_runs",
            "Due runs skipped because the previous run of the route was still going.",
            ["route"], registry=r,
        )
        self.heartbeats = Counter(
            "selfcheck_heartbeats",
            "Heartbeat deliveries by target name and result (success, failure, skipped).",
            ["target", "result"], registry=r,
        )
        self.build_info = Info("selfcheckd_build", "selfcheckd build information.", registry=r)
        self.build_info.info({"version": __version__})
        self.config_reload_ok = Gauge(
            "selfcheckd_config_last_reload_successful",
            "1 if the last configuration (re)load succeeded, else 0.", registry=r,
        )

        # -- the leak watcher ------------------------------------------------------------
        self.leaked_recipients = Counter(
            "sinkhole_leaked_recipients",
            "Sinkhole-domain recipients from senders outside the allowlist (one per queue id "
            "and recipient).", registry=r,
        )
        self.test_recipients = Counter(
            "sinkhole_test_recipients",
            "Sinkhole-domain recipients from allowlisted test senders (expected traffic).",
            registry=r,
        )
        self.maillog_lines = Counter(
            "maillog_lines", "Mail log lines read by kind (from, to, other, unparsed).",
            ["kind"], registry=r,
        )
        self.last_delivery_line = Gauge(
            "maillog_last_delivery_line_timestamp_seconds",
            "Unix time of the newest delivery (to=) line seen.", registry=r,
        )
        self.leakwatch_last_poll_success = Gauge(
            "leakwatch_last_poll_success_timestamp_seconds",
            "Unix time of the last successful poll of the log source.", registry=r,
        )
        self.leakwatch_lag = Gauge(
            "leakwatch_lag_seconds",
            "Age of the newest log event read, as seen at the last poll.", registry=r,
        )
        self.leakwatch_errors = Counter(
            "leakwatch_errors", "Leak watcher errors by reason.", ["reason"], registry=r,
        )
        self.leakwatch_alerts = Counter(
            "leakwatch_alerts", "Leak alerts sent to the alert webhook by result.",
            ["result"], registry=r,
        )
        self.sinkhole_mode = Gauge(
            "sinkhole_mode", "1 for the current value of /cabal/sinkhole_mode, 0 for the others.",
            ["mode"], registry=r,
        )
