"""DMARC: one valid `v=DMARC1` record with a `p=`, at `_dmarc.<domain>` or the organisational
domain's.

As a receiver looks it up (RFC 7489 6.6.3): the TXT records at
`_dmarc.<domain>` that start with `v=DMARC1`; none there, then the same at
the organisational domain (the registrable domain by the Public Suffix List).
More than one record at the name where the search stops means receivers use
none. The record's grammar and tags are checkdmarc's to judge (in a thread:
checking a report address's domain asks DNS, under the run's deadline);
its warnings become notes. `p=none` is a note, not a problem: it is a valid
policy that asks receivers for reports and no action.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

from daemon.dns.libraries import checkdmarc_dmarc, evaluating_with, organizational_domain
from daemon.dns.resolver import BlockingResolver, Resolver
from daemon.dns.verdict import ItemResult, notes, ok, problem
from daemon.threads import in_daemon_thread

ITEM = "dmarc"
MAX_NOTES = 2
# RFC 7489 6.6.4: mail not selected by pct= gets the next milder policy.
MILDER = {"reject": "quarantine", "quarantine": "none"}
# RFC 7489 6.4: dmarc-version = "v" *WSP "=" *WSP "DMARC1", the record's first tag.
_DMARC1 = re.compile(r"v\s*=\s*DMARC1\s*(;|$)")
# What was meant to be one: receivers discard it all the same (RFC 7489 6.6.3).
_MEANT = re.compile(r"\s*v\s*=\s*dmarc", re.IGNORECASE)


def dmarc_records(texts: list[str]) -> list[str]:
    return [t for t in texts if _DMARC1.match(t)]


def discarded(texts: list[str]) -> list[str]:
    """TXT records meant as DMARC records that are not (`v=DMARC1 p=reject`)."""
    return [t for t in texts if _MEANT.match(t) and not _DMARC1.match(t)]


async def check(resolver: Resolver, domain: str, *, deadline: float,
                clock: Callable[[], float] = time.monotonic) -> ItemResult:
    location = domain
    texts = (await resolver.query(f"_dmarc.{domain}", "TXT")).texts()
    records, ignored = dmarc_records(texts), discarded(texts)
    org = organizational_domain(domain)
    if not records and org != domain:
        location = org
        texts = (await resolver.query(f"_dmarc.{org}", "TXT")).texts()
        records, ignored = dmarc_records(texts), ignored + discarded(texts)
    if not records:
        where = f"_dmarc.{domain}" + (f" nor at _dmarc.{org}" if org != domain else "")
        if ignored:
            return problem(ITEM, f"no valid DMARC record at {where}: "
                                 f"{', '.join(map(_quoted, ignored))} is not a valid DMARC "
                                 'record (it must start with "v=DMARC1;" and separate its '
                                 'tags with ";"), so receivers discard it and apply no '
                                 "policy (RFC 7489 6.6.3)", records=ignored)
        return problem(ITEM, f"no DMARC record at {where}: receivers apply no policy, and "
                             "Gmail and Yahoo require one from bulk senders; publish "
                             f'"v=DMARC1; p=none; rua=mailto:..." to start')
    if len(records) > 1:
        return problem(ITEM, f"{len(records)} DMARC records at _dmarc.{location}: receivers "
                             "ignore them all (RFC 7489 6.6.3); keep one", records=records)
    blocking = resolver.blocking(deadline, clock)
    parsed = await in_daemon_thread(_parse, records[0], location, blocking, name="dmarc")
    return judge(domain, location, records[0], parsed, ignored)


def _pct(record: str) -> int | None:
    """The record's pct= (0-100), None when absent or not a number (checkdmarc, which
    judged the record valid, does not return it)."""
    for tag in record.split(";"):
        name, _, value = tag.partition("=")
        if name.strip().lower() == "pct" and value.strip().isdigit():
            return min(100, int(value.strip()))
    return None


def _quoted(record: str) -> str:
    return f'"{record}"'


def _parse(record: str, location: str, resolver: BlockingResolver) -> dict[str, Any] | str:
    """checkdmarc's parse (tags and warnings), or why the record is invalid."""
    try:
        with evaluating_with(resolver):
            parsed: dict[str, Any] = checkdmarc_dmarc.parse_dmarc_record(
                record, location, resolver=resolver, timeout=resolver.lifetime, retries=0,
                ignore_unrelated_records=True)
    except checkdmarc_dmarc.DMARCError as exc:
        return str(exc)
    return parsed


def judge(domain: str, location: str, record: str, parsed: dict[str, Any] | str,
          ignored: list[str] | None = None) -> ItemResult:
    """The DMARC item from the record and checkdmarc's parse (pure: unit-tested);
    `ignored`: records at the domain receivers discarded before falling back."""
    where = f"_dmarc.{location}"
    if location != domain:
        where += f" (the organisational domain of {domain})"
    if isinstance(parsed, str):
        return problem(ITEM, f"the DMARC record at {where} is invalid: {parsed}",
                       record=record)
    tags = parsed["tags"]
    if not tags["p"].get("explicit"):
        return problem(ITEM, f"the DMARC record at {where} has no p= tag: RFC 7489 requires "
                             "one; receivers treat it as p=none at best", record=record)
    # For a subdomain found through its organisational domain, sp= applies (else p=).
    key = "sp" if location != domain and tags["sp"].get("explicit") else "p"
    policy = str(tags[key]["value"])
    caveats = [f"_dmarc.{domain} has {', '.join(map(_quoted, ignored))}, not a valid DMARC "
               "record, so receivers use this one"] if ignored else []
    if policy == "none":
        caveats.append(f"{key}=none: monitoring only, receivers take no action on "
                       "failing mail")
    elif (pct := _pct(record)) is not None and pct < 100:
        milder = MILDER[policy]
        caveats.append(f"pct=0: receivers apply {key}={policy} to none of the failing mail, "
                       f"in effect {key}={milder}" if pct == 0 else
                       f"pct={pct}: receivers apply {key}={policy} to {pct}% of failing mail "
                       f"and {key}={milder} to the rest (RFC 7489 6.6.4)")
    # checkdmarc says pct is gone from DMARCbis; receivers on RFC 7489 still apply it.
    caveats += [w for w in parsed["warnings"]
                if "p tag value of none" not in w and "pct tag" not in w][:MAX_NOTES]
    return ok(ITEM, notes(f"v=DMARC1 at {where}: {key}={policy}", caveats), record=record,
              location=location, policy=policy)
