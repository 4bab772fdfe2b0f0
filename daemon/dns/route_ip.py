"""The sending IP of a route: who handed its latest received probe to the receiving side.

Read from the probe's Received hops (daemon/roundtrip/hops.py), first hop
first. Hop 0 is selfcheckd's own submission, so the sending IP is the first
external address after it: the receiver's border MX stamps the public
address of the MTA that connected to it, while the hops inside either
network carry internal ones (RFC 1918, CGNAT, loopback, link-local, ULA).
Only when no later hop has an external address and hop 0 has one (the
route submits straight to the receiving MX) is that one taken.
Documentation ranges (192.0.2.0/24, 203.0.113.0/24, 2001:db8::/32) count as
external: they stand for public addresses in examples and tests.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from daemon.checks.result import Hop

INTERNAL = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
    "172.16.0.0/12", "192.168.0.0/16", "::/128", "::1/128", "fc00::/7", "fe80::/10",
))


@dataclass(frozen=True)
class RouteIp:
    """Where the sending IP of an entry's `ips_from_route` came from."""

    route: str
    ip: str
    run_id: str
    by: str | None  # the receiving host that stamped it
    seen_at: float | None  # wall clock of the run that found it

    def as_dict(self) -> dict[str, object]:
        return {"route": self.route, "ip": self.ip, "run_id": self.run_id, "by": self.by,
                "seen_at": self.seen_at}


def canonical(text: str) -> str:
    """An address as sending_ips holds it (compressed; an IPv4-mapped one as IPv4)."""
    address = ipaddress.ip_address(text)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def is_external(text: str | None) -> bool:
    if not text:
        return False
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return not any(address in net for net in INTERNAL if net.version == address.version)


def handing_hop(hops: Sequence[Hop]) -> Hop | None:
    """The hop whose from_ip handed the probe to the receiving side (None if none did)."""
    for hop in hops[1:]:
        if is_external(hop.from_ip):
            return hop
    if hops and is_external(hops[0].from_ip):
        return hops[0]
    return None
