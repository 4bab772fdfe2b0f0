"""Forward-confirmed reverse DNS (FCrDNS): the sending IP's PTR name resolves back to it.

Receivers (Gmail, Outlook, most spam filters) check it on connect: no PTR,
or a PTR whose name does not resolve back to the IP, gets mail refused or
scored as spam. A PTR name that resolves back is enough; the others of a
(rare, discouraged) multi-PTR set are named in the reason.
"""

from __future__ import annotations

import ipaddress

import dns.reversename

from daemon.dns.resolver import DnsError, Resolver
from daemon.dns.verdict import ItemResult, error, ok, problem

# RFC 7208 5.5 looks at no more than 10 PTR names; neither do we.
MAX_NAMES = 10


def item_name(ip: str) -> str:
    return f"ptr/{ip}"


async def check(resolver: Resolver, ip: str) -> ItemResult:
    item = item_name(ip)
    address = ipaddress.ip_address(ip)
    reverse = dns.reversename.from_address(ip).to_text()
    answer = await resolver.query(reverse, "PTR")
    names = list(dict.fromkeys(answer.names()))[:MAX_NAMES]
    if not names:
        where = "does not exist" if not answer.exists else "has no PTR record"
        if answer.canonical is not None:
            where = f"is a CNAME to {answer.canonical}, which {where}"
        return problem(item, f"{ip} has no reverse DNS ({reverse} {where}): receivers refuse "
                             "or junk mail from an IP without a PTR; ask whoever owns the IP "
                             "(your hosting or cloud provider) to set one", reverse=reverse)
    rdtype = "A" if address.version == 4 else "AAAA"
    resolved: dict[str, list[str]] = {}
    failed: list[str] = []
    for name in names:
        try:
            forward = await resolver.query(name, rdtype)
        except DnsError as exc:
            failed.append(str(exc))
            continue
        resolved[name] = forward.addresses()
        if any(ipaddress.ip_address(a) == address for a in resolved[name]):
            others = [n for n in names if n != name]
            extra = f" (other PTR names: {', '.join(others)})" if others else ""
            return ok(item, f"{ip} has PTR {name}, which resolves back to it{extra}",
                      names=names, confirmed=name)
    if failed:
        return error(item, f"{ip} has PTR {', '.join(names)}; its forward lookup failed: "
                           f"{failed[0]}", names=names)
    shown = "; ".join(f"{n} -> {', '.join(a) or f'no {rdtype} record'}"
                      for n, a in resolved.items())
    return problem(item, f"{ip}'s PTR does not resolve back to it ({shown}): "
                         f"forward-confirmed reverse DNS fails; give the PTR name an {rdtype} "
                         f"record of {ip}, or point the PTR at a name that has one",
                   names=names, forward=resolved)
