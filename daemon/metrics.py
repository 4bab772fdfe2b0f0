"""Every Prometheus metric selfcheckd exports, named in one place.

One `Metrics` object owns one `CollectorRegistry`, so tests (and two daemons in
one process) never share counters. Labels carry only bounded values: route
names from the config, reasons from a fixed enum, never error text.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from daemon import __version__
from daemon.checks.result import FailureReason

# 50 ms resolves a local loop-back round trip; 10 min is the longest timeout an
# operator is likely to configure. Roughly x2 steps in between.
DURATION_BUCKETS = (
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)
# sendmail logs delay= in whole seconds, Postfix in fractions; a deferred message
# may be delivered days later (sendmail returns it after 5 days).
MTA_DELAY_BUCKETS = (
    1.0, 5.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 43200.0,
    86400.0, 172800.0, 432000.0,
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
        # The alert rules are written relative to these two (deploy/prometheus/alerts.yml),
        # so they hold at any interval, not only the default 600 s.
        self.interval = Gauge(
            "selfcheck_interval_seconds",
            "Seconds between the scheduled selfchecks of the route (from the config in force).",
            ["route"], registry=r,
        )
        self.consecutive_failures = Gauge(
            "selfcheck_consecutive_failures",
            "Selfcheck runs of the route that failed in a row, up to the last one (0 after a "
            "success).",
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
        self.internal_errors = Counter(
            "selfcheckd_internal_errors",
            "Errors that escaped their owner (event loop handler, unraisable hook) by kind.",
            ["kind"], registry=r,
        )

        # -- delivery quality (docs/delivery-quality.md) ----------------------------------
        self.auth_result = Gauge(
            "selfcheck_auth_result",
            "1 for the probe's current Authentication-Results verdict per method (spf, dkim, "
            "dmarc, arc) from the trusted authserv-id; results outside RFC 8601's are 'other'.",
            ["route", "method", "result"], registry=r,
        )
        self.auth_unparsed = Counter(
            "selfcheck_auth_results_unparsed",
            "Authentication-Results headers from the trusted authserv-id that could not be "
            "read, even leniently; what they said is unknown.",
            ["route"], registry=r,
        )
        self.tls_cert_expiry = Gauge(
            "selfcheck_tls_cert_expiry_timestamp_seconds",
            "notAfter (Unix time) of the certificate the route's SMTP or IMAP server presented "
            "at the last TLS handshake.",
            ["route", "protocol"], registry=r,
        )
        self.tls_version = Info(
            "selfcheck_tls_version",
            "TLS version negotiated with the route's SMTP or IMAP server at the last handshake.",
            ["route", "protocol"], registry=r,
        )

        # -- DNS and sending reputation (docs/dns.md) ------------------------------------
        self.dns_ok = Gauge(
            "selfcheck_dns_ok",
            "1 if the item's latest verdict is ok, 0 if it is a problem (spf, dmarc, mx, "
            "mta-sts, tls-rpt, dkim/<selector>, ptr/<ip>, blocklist/<zone>/<ip>, route-ip); "
            "absent while it could not be decided.",
            ["name", "item"], registry=r,
        )
        self.dnsbl_listed = Gauge(
            "selfcheck_dnsbl_listed",
            "1 if the IP is listed in the blocklist zone, 0 if not; absent while undecided "
            "(no answer, the zone refusing our resolver, a zone that lists everything).",
            ["ip", "zone"], registry=r,
        )
        self.dns_check_errors = Counter(
            "selfcheck_dns_check_errors",
            "Item checks that could not reach a verdict (timeout, SERVFAIL, REFUSED, a "
            "blocklist refusing the resolver, the run's deadline).",
            ["name", "item"], registry=r,
        )
        self.dns_error_since = Gauge(
            "selfcheck_dns_error_since_timestamp_seconds",
            "Unix time the item's current streak of undecided (error) runs began; absent "
            "while it has a verdict.",
            ["name", "item"], registry=r,
        )
        self.dns_last_run = Gauge(
            "selfcheck_dns_last_run_timestamp_seconds",
            "Unix time the latest run of the [[dns]] entry ended.", ["name"], registry=r,
        )

        # -- supervision: every long-running component -----------------------------------
        self.component_up = Gauge(
            "selfcheckd_component_up",
            "1 while the component can do its job, 0 while it cannot (source unreadable, "
            "last poll or delivery failed, crashed and waiting to restart).",
            ["component"], registry=r,
        )
        self.component_progress = Gauge(
            "selfcheckd_component_last_progress_timestamp_seconds",
            "Unix time the component last made progress (a poll, a tick, a delivery).",
            ["component"], registry=r,
        )
        self.component_deadline = Gauge(
            "selfcheckd_component_progress_deadline_seconds",
            "Seconds without progress after which the component counts as stalled.",
            ["component"], registry=r,
        )
        self.component_restarts = Counter(
            "selfcheckd_component_restarts",
            "Times the supervisor restarted the component after it crashed.",
            ["component"], registry=r,
        )
        # Read at scrape time from the supervisor (whether a down component is still
        # alive depends on its deadline, which passes without anyone calling us).
        self._degraded: Callable[[], dict[str, str]] = dict
        r.register(_Degraded(self))

        # -- two tasks, one leader (docs/ha.md) ------------------------------------------
        self.leader = Gauge(
            "selfcheckd_leader",
            "1 while this process does the leader's work (the round trips, heartbeats, the "
            "leak watcher), 0 while it stands by. Without [ha] always 1: the sum over the "
            "job is the number of leaders.", registry=r,
        )
        self.lease_transitions = Counter(
            "selfcheckd_lease_transitions",
            "Times this process became leader (to=leader) or stopped being it (to=standby).",
            ["to"], registry=r,
        )
        self.lease_errors = Counter(
            "selfcheckd_lease_errors",
            "Lease calls to DynamoDB that failed, by reason (connection, timeout, throttled, "
            "access_denied, no_table, credentials, config, api_error, other); a lease held "
            "by another task is no error.", ["reason"], registry=r,
        )

        # -- the HTTP listener (docs/configuration.md, [server]) ---------------------------
        self.http_connections = Gauge(
            "selfcheckd_http_connections", "HTTP connections held open now.", registry=r,
        )
        self.http_connection_cap = Gauge(
            "selfcheckd_http_connection_cap",
            "The most HTTP connections held at once: [server] max_connections, at most a "
            "quarter of RLIMIT_NOFILE.", registry=r,
        )
        self.http_connections_shed = Counter(
            "selfcheckd_http_connections_shed",
            "Connections closed at the cap: evicted (the oldest idle one made room for a new "
            "one) or refused (every held connection was busy).", ["action"], registry=r,
        )
        self.probe_requests = Counter(
            "selfcheckd_probe_requests",
            "GET /probe answers by outcome: ran (started a run), joined (a run in flight), "
            "cached (the latest result, within probe_min_interval), unauthorized, refused "
            "(off, unknown route, stopping).", ["outcome"], registry=r,
        )

        # -- the alert outbox ------------------------------------------------------------
        self.alerts_pending = Gauge(
            "selfcheckd_alerts_pending",
            "Alerts accepted for delivery and not yet accepted by the webhook.", registry=r,
        )
        self.alerts_oldest_pending_age = Gauge(
            "selfcheckd_alerts_oldest_pending_age_seconds",
            "Age of the oldest undelivered alert (0 when none is pending).", registry=r,
        )
        self.alert_deliveries = Counter(
            "selfcheckd_alert_deliveries",
            "Alert delivery attempts by result: sent (2xx), failed (network, timeout, 5xx: "
            "retried), rejected (other 4xx: retried), expired (undelivered after max_age).",
            ["result"], registry=r,
        )
        self.alerts_suppressed = Counter(
            "selfcheckd_alerts_suppressed",
            "Alerts not queued on their own: duplicate (already pending or sent) or folded "
            "into a digest (rate limit or the cap on pending alerts).",
            ["reason"], registry=r,
        )
        self.state_saves = Counter(
            "selfcheckd_state_saves",
            "Writes of the state file by result (ok, failed; fenced: refused because another "
            "leader wrote the S3 state since, docs/ha.md).", ["result"], registry=r,
        )
        self.state_shed = Counter(
            "selfcheckd_state_shed",
            "Entries left out of state file saves to keep the file within its size bound, "
            "by section (pending alerts are folded into a digest, never dropped).",
            ["section"], registry=r,
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
        self.sinkhole_mode = Gauge(
            "sinkhole_mode", "1 for the current value of /cabal/sinkhole_mode, 0 for the others.",
            ["mode"], registry=r,
        )

        # -- the scheduled queue-persistence drill (docs/drill.md) --------------------------
        self.drill_runs = Counter(
            "selfcheck_drill_runs",
            "Scheduled queue-persistence drills by result: passed, failed, aborted, refused, "
            "cleanup_failed.", ["result"], registry=r,
        )
        self.drill_last_success = Gauge(
            "selfcheck_drill_last_success_timestamp_seconds",
            "Unix time the last drill that passed ended (0 until one passed; restored from "
            "[drill] journal_dir).", registry=r,
        )
        self.drill_scheduled_since = Gauge(
            "selfcheck_drill_scheduled_since_timestamp_seconds",
            "Unix time this process started scheduling drills.", registry=r,
        )
        self.drill_duration = Gauge(
            "selfcheck_drill_duration_seconds",
            "How long the last drill took, its cleanup included.", registry=r,
        )
        self.drill_last_result = Gauge(
            "selfcheck_drill_last_result",
            "1 for the result of the last drill, 0 for the other results.", ["result"],
            registry=r,
        )

        # -- queue health from the mail log (docs/queue-health.md) -------------------------
        self.mta_deliveries = Counter(
            "mta_deliveries",
            "Recipients of delivery (to=) lines by result: sent, deferred, queued, bounced, "
            "other. Every retry line counts again.", ["result"], registry=r,
        )
        self.mta_skipped_lines = Counter(
            "mta_delivery_lines_skipped",
            "Delivery (to=) lines not counted as deliveries: 'truncated' (cut short before "
            "stat=), 'duplicate' (an exact repeat of a recent line, e.g. ingested twice).",
            ["reason"], registry=r,
        )
        self.mta_delivery_delay = Histogram(
            "mta_delivery_delay_seconds",
            "delay= of sent recipients: from the message's arrival to its delivery.",
            buckets=MTA_DELAY_BUCKETS, registry=r,
        )
        self.mta_deferred_messages = Gauge(
            "mta_deferred_messages",
            "Queue ids with at least one recipient whose latest result is deferred.", registry=r,
        )
        self.mta_oldest_deferred = Gauge(
            "mta_oldest_deferred_seconds",
            "Seconds since the first line of the oldest deferred message (0 when none).",
            registry=r,
        )
        self.mta_tracked_messages = Gauge(
            "mta_tracked_messages",
            "Queue ids the leak watcher remembers (bounded by leakwatch.max_tracked_messages).",
            registry=r,
        )
        # -- the shared queue, per task (docs/queue-health.md) --------------------------------
        self.mta_deferred_silent = Gauge(
            "mta_deferred_silent_messages",
            "Deferred messages with no line for longer than leakwatch.queue_silent_after: no "
            "queue runner retries them.", registry=r,
        )
        self.mta_oldest_silent = Gauge(
            "mta_oldest_silent_deferred_seconds",
            "Seconds since the last line of the longest silent deferred message (0 when none).",
            registry=r,
        )
        self.mta_handoffs = Counter(
            "mta_queue_handoffs",
            "Attempts on a deferred message logged by another task than its previous line "
            "(the shared queue at work; a replacement taking over its predecessor's retries).",
            registry=r,
        )
        self.mta_queue_errors = Counter(
            "mta_queue_errors",
            "Lines in which the MTA reports an error of its queue, by kind: lock, permission, "
            "space, other.", ["kind"], registry=r,
        )
        self.mta_tasks_logging = Gauge(
            "mta_tasks_logging",
            "Tasks (log streams, else syslog hosts) that logged an MTA line within "
            "leakwatch.queue_silent_after.", registry=r,
        )

    def watch_degraded(self, source: Callable[[], dict[str, str]]) -> None:
        """Export `source()` ({component: reason code}) as selfcheckd_component_degraded."""
        self._degraded = source

    def degraded_family(self) -> GaugeMetricFamily:
        family = GaugeMetricFamily(
            "selfcheckd_component_degraded",
            "1 for the reason code of a component that is alive but cannot do its job "
            "(file_missing, webhook, crashed, ...): degraded, not dead; /healthz stays 200.",
            labels=["component", "reason"])
        for component, code in sorted(self._degraded().items()):
            family.add_metric([component, code], 1.0)
        return family

    def forget_route(self, route: str) -> None:
        """Drop every series of a route a reload removed, so no stale value lingers."""
        per_route = (self.success, self.last_run, self.last_success, self.interval,
                     self.consecutive_failures, self.send_duration,
                     self.reception_duration, self.late_arrivals, self.cleanup_failures,
                     self.skipped_runs, self.auth_unparsed)
        labelled: list[tuple[Any, tuple[str, ...]]] = [(m, (route,)) for m in per_route]
        labelled += [(self.runs, (route, result)) for result in ("success", "failure")]
        labelled += [(self.failures, (route, reason.value)) for reason in FailureReason]
        for metric, labels in labelled:
            with contextlib.suppress(KeyError):
                metric.remove(*labels)
        for quality in (self.auth_result, self.tls_cert_expiry, self.tls_version):
            quality.remove_by_labels({"route": route})

    def schedule_route(self, route: str, interval: float) -> None:
        """A route is scheduled (start-up, reload): export its interval and its run count.

        The failure streak starts at 0 for a new route and carries over a reload."""
        self.interval.labels(route).set(interval)
        self.consecutive_failures.labels(route)

    def forget_dns_entry(self, name: str) -> None:
        """Drop every series of a [[dns]] entry a reload removed."""
        for metric in (self.dns_ok, self.dns_check_errors, self.dns_error_since,
                       self.dns_last_run):
            metric.remove_by_labels({"name": name})

    def forget_leakwatch_series(self) -> None:
        """The leak watcher's series that alert rules read, back to "no watcher here" (a
        leader became standby): the poll and delivery-line times and the lag at 0, the
        line, error and sinkhole-mode series gone."""
        for gauge in (self.leakwatch_last_poll_success, self.leakwatch_lag,
                      self.last_delivery_line):
            gauge.set(0)
        for family in (self.leakwatch_errors, self.maillog_lines, self.sinkhole_mode):
            family.clear()

    def forget_drill_series(self) -> None:
        """No drill scheduled here any more (a leader became standby): the drill rules'
        series read as "no schedule" (0) and the last result is gone."""
        self.drill_scheduled_since.set(0)
        self.drill_last_success.set(0)
        self.drill_last_result.clear()

    def forget_heartbeat_target(self, target: str) -> None:
        for result in ("success", "failure", "skipped"):
            with contextlib.suppress(KeyError):
                self.heartbeats.remove(target, result)


class _Degraded(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield self._metrics.degraded_family()

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily("selfcheckd_component_degraded", "", labels=["component", "reason"])
