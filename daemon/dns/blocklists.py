"""Is a sending IP on a DNS blocklist, and did the blocklist really answer? (RFC 5782)

The question is an A query for the reversed IP under the zone (IPv4 octets,
IPv6 nibbles). What the answer means, carefully:

* NXDOMAIN (or no A record): not listed.
* A code in 127.255.255.0/24, from any zone: the blocklist refused *us*
  (Spamhaus: .252 a typo'd zone, .254 a query through a public or open
  resolver, .255 too many queries). Unusable from this resolver: `error`,
  never a listing and never clean.
* A code outside 127.0.0.0/8: not a blocklist answer (a dead zone whose
  domain was parked, a hijacked one): `error`.
* A code in 127.0.0.0/8: listed, with the zone's TXT reason when it has one;
  unless the zone also lists RFC 5782's test address 127.0.0.1 (::ffff:7f00:1),
  which no blocklist lists: such a zone lists everything and is `error`.
* No answer in time: `error`. A timeout proves nothing.
"""

from __future__ import annotations

import ipaddress

import dns.name
import dns.reversename

from daemon.dns.resolver import DnsError, Resolver
from daemon.dns.verdict import ItemResult, error, ok, problem
from daemon.logs import shorten

LISTING = ipaddress.ip_network("127.0.0.0/8")
REFUSED = ipaddress.ip_network("127.255.255.0/24")
# What Spamhaus says these codes mean (other zones copy them).
REFUSALS = {
    "127.255.255.252": "a typo in the zone name, or a query for the wrong zone",
    "127.255.255.254": "a query through a public or open resolver, refused",
    "127.255.255.255": "too many queries, rate limited",
}
# RFC 5782 section 5: a DNSxL never lists 127.0.0.1 (for IPv6, ::FFFF:7F00:1).
NEVER_LISTED = {4: "127.0.0.1", 6: "::ffff:7f00:1"}
MAX_TXT = 300


def item_name(zone: str, ip: str) -> str:
    return f"blocklist/{zone}/{ip}"


def query_name(ip: str, zone: str) -> str:
    """`7.113.0.203.zen.spamhaus.org.` for 203.0.113.7 (nibbles for IPv6)."""
    origin = dns.name.from_text(zone)
    name: str = dns.reversename.from_address(ip, v4_origin=origin, v6_origin=origin).to_text()
    return name


async def check(resolver: Resolver, zone: str, ip: str) -> ItemResult:
    item = item_name(zone, ip)
    name = query_name(ip, zone)
    answer = await resolver.query(name, "A")
    facts: dict[str, object] = {"ip": ip, "zone": zone, "query": name}
    codes = sorted(set(answer.addresses()), key=ipaddress.ip_address)
    if not codes:
        return ok(item, f"{ip} is not listed in {zone}", listed=False, **facts)
    refused = _refusal(zone, codes)
    if refused:
        return error(item, refused, codes=codes, **facts)
    outside = [c for c in codes if ipaddress.ip_address(c) not in LISTING]
    if outside:
        return error(item, f"{zone} answered {', '.join(outside)} for {ip}, outside "
                           "127.0.0.0/8: not a blocklist answer (is the zone dead, its domain "
                           "parked?)", codes=codes, **facts)
    insane = await _lists_everything(resolver, zone, ip)
    if insane:
        return error(item, insane, codes=codes, **facts)
    why = await _txt_reason(resolver, name)
    text = f"{ip} is listed in {zone} ({', '.join(codes)})"
    return problem(item, f"{text}: {why}" if why else text, listed=True, codes=codes,
                   txt=why, **facts)


def _refusal(zone: str, codes: list[str]) -> str | None:
    refused = [c for c in codes if ipaddress.ip_address(c) in REFUSED]
    if not refused:
        return None
    meaning = "; ".join(f"{c}: {REFUSALS.get(c, 'an error code, not a listing')}"
                        for c in refused)
    return (f"blocklist unusable from this resolver: {zone} answered {meaning}. Query it "
            "through your own recursive resolver (not a public one), or its paid feed")


async def _lists_everything(resolver: Resolver, zone: str, ip: str) -> str | None:
    """Why the zone's listings mean nothing (it lists RFC 5782's never-listed address)."""
    test = NEVER_LISTED[ipaddress.ip_address(ip).version]
    try:
        answer = await resolver.query(query_name(test, zone), "A")
    except DnsError:
        return None  # the listing itself was answered; this check alone is undecided
    codes = answer.addresses()
    refused = _refusal(zone, codes)
    if refused:
        return refused
    listed = [c for c in codes if ipaddress.ip_address(c) in LISTING]
    if listed:
        return (f"{zone} lists everything: it also lists {test}, which RFC 5782 says no "
                f"blocklist lists (answered {', '.join(listed)}); its answer for {ip} "
                "means nothing")
    return None


async def _txt_reason(resolver: Resolver, name: str) -> str | None:
    """The zone's TXT explanation of a listing, when it gives one (its failure costs
    the listing nothing)."""
    try:
        answer = await resolver.query(name, "TXT")
    except DnsError:
        return None
    texts = [t.strip() for t in answer.texts() if t.strip()]
    return shorten(" | ".join(texts), MAX_TXT) if texts else None
