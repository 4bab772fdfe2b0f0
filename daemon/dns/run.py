"""One run of one `[[dns]]` entry: every item's probe at once, under the entry's deadline.

The runner owns the verdict when a probe cannot give one: a DNS failure
(`DnsError`) becomes `error` with its reason, a probe still going at the
deadline becomes `error` ("no verdict within ..."), and a crash becomes
`error` ("internal error"), logged with its traceback and counted. A probe
only does its DNS work and says ok or problem. The items of an entry and
their order are fixed by the entry, so every run reports the same items.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from daemon.dns import blocklists, dkim, dmarc, mta_sts, mx, ptr, spf, tlsrpt
from daemon.dns.config import DnsEntry
from daemon.dns.mta_sts import PolicyFetcher
from daemon.dns.resolver import DnsError, Resolver
from daemon.dns.route_ip import RouteIp
from daemon.dns.verdict import EntryResult, ItemResult, error, ok

log = structlog.get_logger("daemon.dns")

ROUTE_IP = "route-ip"
Probe = Callable[[], Awaitable[ItemResult]]


@dataclass(frozen=True)
class RouteIpState:
    """What is known of the sending IP of an entry's `ips_from_route`."""

    learned: RouteIp | None
    # Why it is not known, when `learned` is None (no probe received yet, ...).
    missing: str = "no probe of the route has been received yet"


def sending_ips(entry: DnsEntry, route: RouteIpState | None) -> tuple[list[str], ItemResult | None]:
    """The IPs to check, and the `route-ip` item when the entry takes one from a route."""
    ips = list(entry.sending_ips)
    if entry.ips_from_route is None:
        return ips, None
    if route is None or route.learned is None:
        why = route.missing if route is not None else "unknown"
        return ips, error(ROUTE_IP, f"sending IP of route {entry.ips_from_route} not known: "
                                    f"{why}", route=entry.ips_from_route)
    learned = route.learned
    if learned.ip not in ips:
        ips.append(learned.ip)
    by = f" to {learned.by}" if learned.by else ""
    return ips, ok(ROUTE_IP, f"{learned.ip} handed the latest received probe of route "
                             f"{learned.route}{by} (run {learned.run_id})", **learned.as_dict())


def plan(entry: DnsEntry, resolver: Resolver, ips: list[str], *, fetcher: PolicyFetcher,
         deadline: float, ips_unknown: str | None) -> list[tuple[str, Probe]]:
    """Every item of the entry with the probe that decides it, in report order."""
    domain = entry.domain
    probes: list[tuple[str, Probe]] = [
        (mx.ITEM, functools.partial(mx.check, resolver, domain)),
        (spf.ITEM, functools.partial(spf.check, resolver, domain, ips, deadline=deadline,
                                     ips_unknown=ips_unknown)),
        (dmarc.ITEM, functools.partial(dmarc.check, resolver, domain, deadline=deadline)),
    ]
    probes += [(dkim.item_name(s), functools.partial(dkim.check, resolver, domain, s))
               for s in entry.dkim_selectors]
    probes += [(ptr.item_name(ip), functools.partial(ptr.check, resolver, ip)) for ip in ips]
    probes += [(blocklists.item_name(zone, ip),
                functools.partial(blocklists.check, resolver, zone, ip))
               for ip in ips for zone in entry.blocklists]
    probes += [(mta_sts.ITEM, functools.partial(mta_sts.check, resolver, domain, fetcher)),
               (tlsrpt.ITEM, functools.partial(tlsrpt.check, resolver, domain))]
    return probes


async def run_entry(
    entry: DnsEntry,
    *,
    route: RouteIpState | None = None,
    fetcher: PolicyFetcher | None = None,
    on_internal: Callable[[], None] | None = None,
    wall: Callable[[], float] = time.time,
) -> EntryResult:
    """Decide every item of `entry`; cancellation (shutdown) propagates."""
    result = EntryResult(entry.name, entry.domain, started_at=wall())
    ips, route_item = sending_ips(entry, route)
    ips_unknown = f"route {entry.ips_from_route}" if route_item is not None \
        and route_item.verdict != "ok" else None
    resolver = Resolver(entry.servers, entry.timeout)
    # The threads (SPF, DMARC) end their queries by the same deadline.
    deadline = time.monotonic() + entry.deadline
    probes = plan(entry, resolver, ips, fetcher=fetcher or PolicyFetcher(),
                  deadline=deadline, ips_unknown=ips_unknown)
    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(_decide(entry, item, probe, on_internal),
                                   name=f"dns:{entry.name}:{item}")
                 for item, probe in probes]
    result.items = ([route_item] if route_item is not None else []) + \
        [t.result() for t in tasks]
    result.finished_at = wall()
    return result


async def _decide(entry: DnsEntry, item: str, probe: Probe,
                  on_internal: Callable[[], None] | None) -> ItemResult:
    """The probe's verdict, or `error` saying why there is none. Never raises but
    CancelledError."""
    try:
        async with asyncio.timeout(entry.deadline) as scope:
            found = await probe()
    except DnsError as exc:
        return error(item, str(exc))
    except TimeoutError as exc:
        if scope.expired():
            return error(item, f"no verdict within the run's deadline of {entry.deadline:g}s "
                               "(raise [[dns]] deadline, or find the slow nameserver)")
        return _internal(entry, item, exc, on_internal)
    except Exception as exc:
        return _internal(entry, item, exc, on_internal)
    if found.item != item:  # a probe reporting under another name is a bug
        return _internal(entry, item, ValueError(f"probe answered for {found.item}"),
                         on_internal)
    return found


def _internal(entry: DnsEntry, item: str, exc: Exception,
              on_internal: Callable[[], None] | None) -> ItemResult:
    log.error("dns_check_internal_error", name=entry.name, item=item, exc_info=exc)
    if on_internal is not None:
        on_internal()
    return error(item, f"internal error: {type(exc).__name__}: {exc}")
