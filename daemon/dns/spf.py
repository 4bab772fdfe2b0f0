"""SPF: one `v=spf1` record, valid, within 10 DNS lookups, and a `pass` for every sending IP.

The record set is fetched here (RFC 7208 4.5: records whose version section
is exactly `v=spf1`; none is `none`, two or more a permerror for every
message). Then, in one thread with the run's deadline on every query:

* checkdmarc parses the record and follows every include and redirect,
  counting the DNS-querying terms the whole record needs (RFC 7208 4.6.4:
  more than 10 is a permerror, more than 2 void lookups too). This is the
  static count: a record that needs 12 lookups is broken for any sender even
  if a given IP matches before the eleventh;
* pyspf evaluates `check_host()` for each sending IP exactly as a receiver
  does (mail from postmaster@<domain>, HELO <domain>): only `pass` counts;
  and once for an address nobody sends from (`NOBODY`): a record that passes
  it (`+all`, here or in an include) lets anyone pass SPF, and DMARC through
  SPF, as the domain.

A DNS failure on the way is `error`, never a verdict: both libraries would
otherwise turn a timed-out include into "no SPF record" or a permerror.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from daemon.dns.libraries import checkdmarc_spf, evaluating_with, spf
from daemon.dns.resolver import BlockingResolver, Resolver
from daemon.dns.verdict import ItemResult, error, notes, ok, problem
from daemon.threads import in_daemon_thread

ITEM = "spf"
MAX_LOOKUPS = 10
# In 240.0.0.0/4, reserved (RFC 1112 4, RFC 6890): no record has reason to authorise
# it, so one that does authorises every address.
NOBODY = "240.0.0.1"
MAX_NOTES = 3


def spf_records(texts: list[str]) -> list[str]:
    """The TXT records whose version section is exactly `v=spf1` (RFC 7208 4.5)."""
    return [t for t in texts if t.lower() == "v=spf1" or t.lower().startswith("v=spf1 ")]


@dataclass
class Evaluation:
    """What the two libraries said (filled in the thread)."""

    lookups: int | None = None
    void_lookups: int | None = None
    broken: str | None = None  # checkdmarc's reason the record is invalid
    over_limit: str | None = None  # "lookups" or "void lookups" when that broke it
    warnings: list[str] = field(default_factory=list)
    parse_failures: list[str] = field(default_factory=list)  # DNS failures while parsing
    # ip -> (result, explanation, matching mechanism)
    results: dict[str, tuple[str, str, str | None]] = field(default_factory=dict)
    # The mechanism passing NOBODY, when the record passes any address.
    passes_anyone: str | None = None
    # check_host()'s explanation of a permerror (for any IP): what receivers get.
    permerror: str | None = None


def evaluate(record: str, domain: str, ips: list[str], resolver: BlockingResolver,
             ) -> Evaluation:
    """Parse and count with checkdmarc, then check_host() per IP with pyspf (blocking)."""
    with evaluating_with(resolver):
        return _evaluate(record, domain, ips, resolver)


def _evaluate(record: str, domain: str, ips: list[str], resolver: BlockingResolver,
              ) -> Evaluation:
    found = Evaluation()
    try:
        # The version in any case is v=spf1 (RFC 7208 12: ABNF strings are case-insensitive;
        # pyspf agrees), which checkdmarc's grammar alone refuses.
        parsed = checkdmarc_spf.parse_spf_record("v=spf1" + record[6:], domain,
                                                 resolver=resolver,
                                                 timeout=resolver.lifetime, retries=0)
    except checkdmarc_spf.SPFError as exc:
        found.broken = str(exc)
        if isinstance(exc, checkdmarc_spf.SPFTooManyDNSLookups):
            found.over_limit = "lookups"
        elif isinstance(exc, checkdmarc_spf.SPFTooManyVoidDNSLookups):
            found.over_limit = "void lookups"
        found.lookups = (exc.data or {}).get("dns_lookups")
        found.void_lookups = (exc.data or {}).get("void_dns_lookups")
        found.warnings = list(exc.warnings)
    else:
        found.lookups = parsed["dns_lookups"]
        found.void_lookups = parsed["void_dns_lookups"]
        found.warnings = list(parsed["warnings"])
    found.parse_failures = list(resolver.failures)
    for ip in ips:
        found.results[ip] = _check_host(ip, domain, resolver)
    nobody = _check_host(NOBODY, domain, resolver)
    if found.broken is None and nobody[0] == "pass":
        found.passes_anyone = nobody[2] or "?"
    found.permerror = next((r[1] for r in [*found.results.values(), nobody]
                            if r[0] == "permerror"), None)
    return found


def _check_host(ip: str, domain: str, resolver: BlockingResolver,
                ) -> tuple[str, str, str | None]:
    """pyspf's check_host() for `ip`: (result, explanation, matching mechanism)."""
    left = max(0.001, resolver.deadline - resolver.clock())
    query = spf.query(i=ip, s=f"postmaster@{domain}", h=domain, querytime=left)
    result, _code, explanation = query.check()
    return str(result), str(explanation), query.mechanism


async def check(resolver: Resolver, domain: str, ips: list[str], *, deadline: float,
                ips_unknown: str | None = None,
                clock: Callable[[], float] = time.monotonic) -> ItemResult:
    """`ips_unknown`: why some sending IPs are not known yet (said in the reason)."""
    answer = await resolver.query(domain, "TXT")
    records = spf_records(answer.texts())
    if not answer.exists:
        return problem(ITEM, f"{domain} does not exist (NXDOMAIN): receivers see spf=none")
    if not records:
        return problem(ITEM, f"no SPF record (v=spf1) at {domain}: receivers see spf=none, "
                             "and DMARC can then pass only through DKIM")
    if len(records) > 1:
        return problem(ITEM, f"{len(records)} SPF records at {domain}: RFC 7208 4.5 makes "
                             "that a permerror for every message; merge them into one",
                       records=records)
    record = records[0]
    blocking = resolver.blocking(deadline, clock)
    found = await in_daemon_thread(evaluate, record, domain, ips, blocking, name="spf")
    return verdict(domain, record, found, ips_unknown)


def verdict(domain: str, record: str, found: Evaluation,
            ips_unknown: str | None = None) -> ItemResult:
    """The SPF item from what the libraries found (pure: unit-tested on its own)."""
    facts = {"record": record, "lookups": found.lookups, "void_lookups": found.void_lookups,
             "results": {ip: r[0] for ip, r in found.results.items()}}
    if found.broken is not None:
        if found.parse_failures:
            return error(ITEM, f"could not follow {domain}'s SPF record: "
                               f"{found.parse_failures[0]}", **facts)
        if found.over_limit == "lookups":
            return problem(ITEM, f"{domain}'s SPF record needs more than {MAX_LOOKUPS} DNS "
                                 "lookups (includes, a, mx, ptr, exists, redirect; RFC 7208 "
                                 "4.6.4): receivers return permerror for every message; "
                                 "flatten includes or drop some", **facts)
        if found.over_limit == "void lookups":
            return problem(ITEM, f"{domain}'s SPF record makes more than 2 lookups that find "
                                 "nothing (RFC 7208 4.6.4): receivers return permerror; remove "
                                 "the terms naming missing domains", **facts)
        said = f" (receivers get permerror: {_unprefixed(found.permerror)})" \
            if found.permerror else ""
        return problem(ITEM, f"{domain}'s SPF record is invalid: {found.broken}{said}",
                       **facts)
    if found.passes_anyone is not None:
        return problem(ITEM, f"{domain}'s SPF record authorises any IP (it passes {NOBODY}, "
                             f"an address nobody sends from, matching {found.passes_anyone}): "
                             f"anyone passes SPF, and DMARC through it, as {domain}; end it "
                             "with -all or ~all and list the senders", **facts)
    refused = {ip: r for ip, r in found.results.items() if r[0] not in ("pass", "temperror")}
    undecided = {ip: r for ip, r in found.results.items() if r[0] == "temperror"}
    counted = f"{found.lookups} of {MAX_LOOKUPS} DNS lookups"
    if refused:
        said = "; ".join(_said(ip, r) for ip, r in refused.items())
        return problem(ITEM, f"{domain}'s SPF record does not authorise {said} ({counted})",
                       **facts)
    if undecided or found.parse_failures:
        why = next(iter(undecided.values()))[1] if undecided else found.parse_failures[0]
        return error(ITEM, f"could not evaluate {domain}'s SPF record: {why}", **facts)
    passed = f"pass for {', '.join(found.results)}" if found.results \
        else "no sending IP to evaluate"
    text = f"one valid SPF record, {counted}; {passed}"
    caveats = ([f"not checked for the IPs of {ips_unknown}"] if ips_unknown else []) \
        + found.warnings[:MAX_NOTES]
    return ok(ITEM, notes(text, caveats), **facts)


def _unprefixed(explanation: str) -> str:
    """pyspf's explanation without its "SPF Permanent Error: " prefix."""
    return explanation.split(": ", 1)[1] if explanation.startswith("SPF Permanent") \
        else explanation


def _said(ip: str, result: tuple[str, str, str | None]) -> str:
    outcome, explanation, mechanism = result
    matched = f" (matched {mechanism})" if mechanism else ""
    if outcome == "permerror":
        return f"{ip}: permerror, {explanation}"
    return f"{ip}: {outcome}{matched}"
