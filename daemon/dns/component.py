"""The `dns` component of `selfcheckd run`: each `[[dns]]` entry on its own schedule.

One `Scheduler` (daemon/checks/scheduler.py) runs the entries: the first run
at start-up, then every `interval` (1 s at the least), never two runs of an
entry at once, a hard deadline behind the entry's own. Each run's verdicts
go to the metrics (docs/dns.md), to /status with their reasons, and to the
log when an item's verdict changes. An entry taking its IP from a route
(`ips_from_route`) learns it from that route's results as they come
(`route_result`) and runs again at once when the IP changes.

The component is degraded (alive, down, named in /healthz) while an entry's
latest run decided nothing at all: the nameservers are unreachable, and a
restart would not mend that.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import structlog

from daemon.checks.result import CheckResult
from daemon.checks.scheduler import IDLE_TICK, Job, Scheduler
from daemon.dns.config import DnsEntry
from daemon.dns.mta_sts import PolicyFetcher
from daemon.dns.route_ip import RouteIp, canonical, handing_hop
from daemon.dns.run import RouteIpState, run_entry
from daemon.dns.verdict import EntryResult, ItemResult, Verdict
from daemon.metrics import Metrics
from daemon.supervisor import Progress

log = structlog.get_logger("daemon.dns")

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]
# The scheduler's backstop behind an entry's own deadline (its threads end by then too).
DEADLINE_MARGIN = 5.0


class DnsChecks:
    """Runs every `[[dns]]` entry; owns their metrics and their part of /status."""

    name = "dns"
    # The scheduler ticks at least every IDLE_TICK seconds, whatever the intervals.
    progress_deadline = IDLE_TICK + 30.0

    def __init__(self, entries: Sequence[DnsEntry], metrics: Metrics, *,
                 fetcher: PolicyFetcher | None = None, clock: Clock = time.monotonic,
                 sleep: Sleep = asyncio.sleep, wall: Clock = time.time) -> None:
        self.metrics = metrics
        self.fetcher = fetcher or PolicyFetcher()
        self._wall = wall
        self.entries = {e.name: e for e in entries}
        self.results: dict[str, EntryResult] = {}
        self.route_ips: dict[str, RouteIpState] = {}
        self._progress: Progress | None = None
        self._unanswered: dict[str, str] = {}  # entry -> why its latest run decided nothing
        self._error_since: dict[tuple[str, str], float] = {}
        # (ip, zone) -> {entry: listed} of the entries whose latest run decided it.
        self._listed: dict[tuple[str, str], dict[str, bool]] = {}
        self.scheduler = Scheduler(
            self._jobs(), clock=clock, sleep=sleep,
            # Nothing is lost by a skipped run (the next one decides): not a warning.
            on_skip=lambda name, count: log.info("dns_run_skipped", name=name, skipped=count,
                                                 why="previous run still going"),
            on_deadline=lambda name: log.error("dns_run_deadline_cancelled", name=name),
            on_crash=lambda _name: metrics.internal_errors.labels(kind="dns_run").inc())

    # -- the component ---------------------------------------------------------------------

    @property
    def may_finish(self) -> bool:
        return self.scheduler.stopping

    async def run(self, progress: Progress) -> None:
        self._progress = progress
        self.scheduler.on_tick = progress.progress
        self._report_health()
        await self.scheduler.run()

    async def stop(self, timeout: float) -> bool:
        """Start no run; cancel the ones going (a DNS run leaves nothing to clean up)."""
        self.scheduler.stop()
        return await self.scheduler.cancel_running(timeout=max(0.0, timeout))

    def replace(self, entries: Sequence[DnsEntry]) -> None:
        """A reload's entries: new ones run at once, changed ones run at once too (their
        cadence follows the scheduler's rules), removed ones lose their results and
        series."""
        old = self.entries
        removed = set(old) - {e.name for e in entries}
        self.entries = {e.name: e for e in entries}
        self.scheduler.replace_jobs(self._jobs())
        for name in removed:
            self._forget(name)
        for entry in entries:
            if entry.name in old and old[entry.name] != entry:
                self.scheduler.fire_now(entry.name)  # its items may differ: report them now
        self._report_health()

    def _jobs(self) -> list[Job]:
        return [Job(name=e.name, run=self._make_run(e.name), interval=e.interval,
                    deadline=e.deadline + DEADLINE_MARGIN)
                for e in self.entries.values()]

    def _make_run(self, name: str) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            entry = self.entries.get(name)  # looked up at run time, so a reload applies
            if entry is None:
                return
            route = self.route_ips.get(entry.ips_from_route) if entry.ips_from_route else None
            result = await run_entry(entry, route=route, fetcher=self.fetcher, wall=self._wall,
                                     on_internal=self._internal_error)
            if self.entries.get(name) is not entry:
                return  # removed or changed by a reload while it ran
            self.record(result)
        return run

    def _internal_error(self) -> None:
        self.metrics.internal_errors.labels(kind="dns_check").inc()

    # -- the IP of ips_from_route ----------------------------------------------------------

    def route_result(self, result: CheckResult) -> None:
        """A route's run ended: learn who handed its probe to the receiver."""
        if result.hops is None:
            return  # the probe was not read: what we knew still holds
        route = result.route
        hop = handing_hop(result.hops)
        if hop is None or hop.from_ip is None:
            state = RouteIpState(None, f"the latest received probe of route {route} (run "
                                       f"{result.run_id}) came through no external address: "
                                       "it never left your network; take ips_from_route from a "
                                       "route to an outside mailbox")
        else:
            state = RouteIpState(RouteIp(route=route, ip=canonical(hop.from_ip),
                                         run_id=result.run_id, by=hop.by,
                                         seen_at=result.finished_at))
        old = self.route_ips.get(route)
        self.route_ips[route] = state
        old_ip = old.learned.ip if old is not None and old.learned is not None else None
        new_ip = state.learned.ip if state.learned is not None else None
        if old is not None and new_ip == old_ip:
            return
        # Changed, or the route's first result: the entries' route-ip says so now.
        log.info("dns_route_ip_changed", route=route, ip=new_ip or "unknown", was=old_ip)
        for entry in self.entries.values():
            if entry.ips_from_route == route:
                self.scheduler.fire_now(entry.name)

    # -- results ---------------------------------------------------------------------------

    def record(self, result: EntryResult) -> None:
        """A run's verdicts into the metrics, the log (changes) and the health report."""
        name = result.name
        previous = self.results.get(name)
        self.results[name] = result
        before = {i.item: i for i in previous.items} if previous is not None else {}
        for item in result.items:
            self._record_item(name, item, before.get(item.item))
        for gone in set(before) - {i.item for i in result.items}:
            self._forget_item(name, gone)
        self.metrics.dns_last_run.labels(name).set(result.finished_at or self._wall())
        counts = {v.value: sum(i.verdict is v for i in result.items) for v in Verdict}
        log.info("dns_checked", name=name, domain=result.domain, **counts)
        if result.items and counts["error"] == len(result.items):
            self._unanswered[name] = result.items[0].reason
        else:
            self._unanswered.pop(name, None)
        self._report_health()

    def _record_item(self, name: str, item: ItemResult, before: ItemResult | None) -> None:
        labels = (name, item.item)
        if item.verdict is Verdict.ERROR:
            _remove(self.metrics.dns_ok, labels)
            self.metrics.dns_check_errors.labels(*labels).inc()
            since = self._error_since.setdefault(labels, self._wall())
            self.metrics.dns_error_since.labels(*labels).set(since)
        else:
            self.metrics.dns_ok.labels(*labels).set(1 if item.verdict is Verdict.OK else 0)
            self._error_since.pop(labels, None)
            _remove(self.metrics.dns_error_since, labels)
        if item.item.startswith("blocklist/"):
            listed = item.details.get("listed")
            self._set_listed(name, item.details.get("ip"), item.details.get("zone"), item.item,
                             listed if isinstance(listed, bool) else None)
        if before is None or before.verdict is not item.verdict:
            level = {Verdict.OK: log.info, Verdict.PROBLEM: log.warning,
                     Verdict.ERROR: log.warning}[item.verdict]
            level("dns_verdict", name=name, item=item.item, verdict=item.verdict.value,
                  was=before.verdict.value if before is not None else "none",
                  reason=item.reason)

    def _set_listed(self, name: str, ip: Any, zone: Any, item: str, listed: bool | None) -> None:
        if not isinstance(ip, str) or not isinstance(zone, str):
            _, zone, ip = item.split("/", 2)  # blocklist/<zone>/<ip>
        key = (ip, zone)
        decided = self._listed.setdefault(key, {})
        if listed is None:
            decided.pop(name, None)
        else:
            decided[name] = listed
        self._export_listed(key)

    def _export_listed(self, key: tuple[str, str]) -> None:
        decided = self._listed.get(key, {})
        if decided:
            self.metrics.dnsbl_listed.labels(*key).set(1 if any(decided.values()) else 0)
        else:
            self._listed.pop(key, None)
            _remove(self.metrics.dnsbl_listed, key)

    def _forget_item(self, name: str, item: str) -> None:
        labels = (name, item)
        for metric in (self.metrics.dns_ok, self.metrics.dns_check_errors,
                       self.metrics.dns_error_since):
            _remove(metric, labels)
        self._error_since.pop(labels, None)
        if item.startswith("blocklist/"):
            _, zone, ip = item.split("/", 2)
            self._listed.get((ip, zone), {}).pop(name, None)
            self._export_listed((ip, zone))

    def _forget(self, name: str) -> None:
        result = self.results.pop(name, None)
        for item in result.items if result is not None else []:
            self._forget_item(name, item.item)
        self.metrics.forget_dns_entry(name)
        self._unanswered.pop(name, None)

    def _report_health(self) -> None:
        if self._progress is None:
            return
        if self._unanswered:
            name, why = next(iter(sorted(self._unanswered.items())))
            more = f" (and {len(self._unanswered) - 1} more)" if len(self._unanswered) > 1 \
                else ""
            self._progress.down(f"[[dns]] {name}: no item could be decided{more}: {why}",
                                "dns_unanswered")
        else:
            self._progress.up()

    # -- /status ---------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, entry in self.entries.items():
            route = self.route_ips.get(entry.ips_from_route) if entry.ips_from_route else None
            result = self.results.get(name)
            out[name] = {
                "domain": entry.domain,
                "interval": entry.interval,
                "nameservers": entry.nameservers or "system resolver",
                "sending_ips": entry.sending_ips,
                "ips_from_route": entry.ips_from_route,
                "route_ip": None if route is None else (
                    route.learned.as_dict() if route.learned is not None
                    else {"ip": None, "why": route.missing}),
                "last_run": None if result is None else result.as_dict(),
            }
        return out


def _remove(metric: Any, labels: tuple[str, ...]) -> None:
    with contextlib.suppress(KeyError):  # not exported: nothing to remove
        metric.remove(*labels)
