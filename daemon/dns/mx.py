"""MX: the domain receives mail (bounces, replies, DMARC reports), at hosts that exist.

At least one MX whose every host has an address. A null MX (`MX 0 .`,
RFC 7505) says the domain takes no mail at all: for a domain mail is sent
from that is a problem too, because receivers may refuse mail whose sender
domain publishes one (RFC 7505 4.2, `550 5.7.27`), and no bounce can come
back. It is reported as a null MX, not as a broken one.
"""

from __future__ import annotations

import asyncio

import dns.name

from daemon.dns.resolver import Answer, DnsError, Resolver
from daemon.dns.verdict import ItemResult, error, notes, ok, problem

ITEM = "mx"
# RFC 7208 and most MTAs look at no more than 10 MX hosts.
MAX_HOSTS = 10


async def mx_hosts(resolver: Resolver, domain: str) -> tuple[Answer, list[tuple[int, str]]]:
    """The MX answer and its (preference, host) pairs, lowest preference first; the
    null MX's host is "." ."""
    answer = await resolver.query(domain, "MX")
    hosts = sorted({(int(r.preference),
                     "." if r.exchange == dns.name.root
                     else r.exchange.to_text(omit_final_dot=True).lower())
                    for r in answer.records})
    return answer, hosts


async def check(resolver: Resolver, domain: str) -> ItemResult:
    answer, hosts = await mx_hosts(resolver, domain)
    if not answer.exists:
        return problem(ITEM, f"{domain} does not exist (NXDOMAIN)")
    if not hosts:
        return problem(ITEM, f"{domain} has no MX record: senders fall back to its A record "
                             "(RFC 5321 5.1), bounces and DMARC reports may go nowhere; "
                             "publish an MX")
    if any(host == "." for _pref, host in hosts):
        if len(hosts) == 1 and hosts[0][0] == 0:
            return problem(ITEM, f"null MX (RFC 7505): {domain} accepts no mail, so no bounce "
                                 "or reply reaches it, and receivers may refuse mail sent "
                                 "from it (RFC 7505 4.2, 550 5.7.27)", null_mx=True)
        return problem(ITEM, "a null MX (MX 0 .) together with other MX records: RFC 7505 3 "
                             "says it must be the only one; senders' behaviour is undefined",
                       hosts=[h for _p, h in hosts])
    names = list(dict.fromkeys(h for _p, h in hosts))[:MAX_HOSTS]
    found = await asyncio.gather(*(_addresses(resolver, n) for n in names))
    addresses = {n: a for n, (a, _alias) in zip(names, found, strict=True)}
    aliases = {n: alias for n, (_a, alias) in zip(names, found, strict=True) if alias}
    missing = [n for n, a in addresses.items() if a == []]
    failed = [n for n, a in addresses.items() if a is None]
    listed = ", ".join(f"{p} {h}" for p, h in hosts)
    if missing:
        return problem(ITEM, f"MX host without an address: {', '.join(missing)} (no A or AAAA "
                             f"record); mail for {domain} cannot be delivered there "
                             f"(MX: {listed})", hosts=names)
    if failed:
        return error(ITEM, f"could not resolve MX host {', '.join(failed)} (MX: {listed})",
                     hosts=names)
    caveats = [f"{n} is a CNAME to {a}: RFC 2181 10.3 says an MX host must not be an alias "
               "(most MTAs deliver anyway); point the MX at the host's own name"
               for n, a in aliases.items()]
    return ok(ITEM, notes(f"MX {listed}, each with an address", caveats), hosts=names,
              addresses=addresses, **({"aliases": aliases} if aliases else {}))


async def _addresses(resolver: Resolver, host: str) -> tuple[list[str] | None, str | None]:
    """The host's A and AAAA addresses (None when a lookup failed and none was found),
    and the name they belong to when the host is an alias."""
    found: list[str] = []
    failed = False
    alias = None
    for rdtype in ("A", "AAAA"):
        try:
            answer = await resolver.query(host, rdtype)
        except DnsError:
            failed = True
            continue
        found += answer.addresses()
        alias = alias or answer.canonical
    return (None if failed and not found else found), alias
