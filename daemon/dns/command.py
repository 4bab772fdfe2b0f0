"""`selfcheckd dns`: every item of every `[[dns]]` entry (or of --name), once, then exit.

One line per item: entry, item, verdict, reason (`--json`: one object per
item). Exit 0 when every item is ok, 1 when any is a problem, 2 for a bad
configuration or an unknown --name, 3 when some item could not be decided
and none is a problem. No probe mail is sent, so an entry's `ips_from_route`
IP is unknown here (`route-ip` says so): `selfcheckd run` learns it from the
route's probes and shows it in /status.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Sequence
from typing import TextIO

from daemon.dns.config import DnsEntry
from daemon.dns.mta_sts import PolicyFetcher
from daemon.dns.run import RouteIpState, run_entry
from daemon.dns.verdict import EntryResult, Verdict
from daemon.logs import install_exception_hooks

EXIT_OK, EXIT_PROBLEM, EXIT_CONFIG, EXIT_UNDECIDED = 0, 1, 2, 3
NO_PROBE = ("`selfcheckd dns` sends no probe; `selfcheckd run` learns this IP from the route's "
            "probes (see /status), or list it in sending_ips")


def select(entries: Sequence[DnsEntry], names: Sequence[str] | None,
           ) -> tuple[list[DnsEntry], list[str]]:
    """The entries to check, and the --name values that match none."""
    known = {e.name for e in entries}
    unknown = [n for n in names or () if n not in known]
    return [e for e in entries if not names or e.name in names], unknown


async def check_entries(entries: Sequence[DnsEntry], fetcher: PolicyFetcher | None = None,
                        ) -> list[EntryResult]:
    """Run every entry once, concurrently."""
    undo = install_exception_hooks(asyncio.get_running_loop())
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(run_entry(
                e, route=RouteIpState(None, NO_PROBE) if e.ips_from_route else None,
                fetcher=fetcher)) for e in entries]
    finally:
        undo()
    return [t.result() for t in tasks]


def exit_code(results: Sequence[EntryResult]) -> int:
    verdicts = {i.verdict for r in results for i in r.items}
    if Verdict.PROBLEM in verdicts:
        return EXIT_PROBLEM
    return EXIT_UNDECIDED if Verdict.ERROR in verdicts else EXIT_OK


def report(results: Sequence[EntryResult], out: TextIO, *, as_json: bool) -> None:
    rows = [(r, i) for r in results for i in r.items]
    if as_json:
        for result, item in rows:
            out.write(json.dumps({"name": result.name, "domain": result.domain,
                                  **item.as_dict()}) + "\n")
        return
    name_width = max((len(r.name) for r, _ in rows), default=0)
    item_width = max((len(i.item) for _, i in rows), default=0)
    for result, item in rows:
        out.write(f"{result.name:<{name_width}}  {item.item:<{item_width}}  "
                  f"{item.verdict.value:<7}  {item.reason}\n")


def run_command(entries: Sequence[DnsEntry], names: Sequence[str] | None, *, as_json: bool,
                out: TextIO | None = None, err: TextIO | None = None,
                fetcher: PolicyFetcher | None = None) -> int:
    out, err = out or sys.stdout, err or sys.stderr  # looked up now: tests swap them
    if not entries:
        err.write("selfcheckd: config: dns: no [[dns]] entry to check\n")
        return EXIT_CONFIG
    chosen, unknown = select(entries, names)
    if unknown:
        err.write(f"selfcheckd dns: --name: no such entry: {', '.join(map(repr, unknown))} "
                  f"(entries: {', '.join(e.name for e in entries)})\n")
        return EXIT_CONFIG
    results = asyncio.run(check_entries(chosen, fetcher))
    report(results, out, as_json=as_json)
    return exit_code(results)
