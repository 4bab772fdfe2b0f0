"""TLS-RPT (RFC 8460): when `_smtp._tls.<domain>` is published, it is one valid record.

Sending MTAs mail (or POST) daily reports of TLS failures to its `rua=`;
without a valid record, a broken MTA-STS or STARTTLS setup goes unreported.
Not publishing one is not a problem; publishing two, or one checkdmarc's
grammar rejects, means no reports (RFC 8460 3.1).
"""

from __future__ import annotations

from daemon.dns.libraries import checkdmarc_tlsrpt
from daemon.dns.resolver import Resolver
from daemon.dns.verdict import ItemResult, notes, ok, problem

ITEM = "tls-rpt"


def tlsrpt_records(texts: list[str]) -> list[str]:
    return [t for t in texts if t.startswith("v=TLSRPTv1")]


async def check(resolver: Resolver, domain: str) -> ItemResult:
    name = f"_smtp._tls.{domain}"
    records = tlsrpt_records((await resolver.query(name, "TXT")).texts())
    if not records:
        return ok(ITEM, f"not published (no v=TLSRPTv1 record at {name})", published=False)
    if len(records) > 1:
        return problem(ITEM, f"{len(records)} v=TLSRPTv1 records at {name}: senders send no "
                             "reports (RFC 8460 3.1); keep one", records=records)
    try:
        parsed = checkdmarc_tlsrpt.parse_smtp_tls_reporting_record(records[0])
    except checkdmarc_tlsrpt.SMTPTLSReportingError as exc:
        return problem(ITEM, f"the record at {name} is invalid: {exc}; senders send no "
                             "reports", record=records[0])
    rua = parsed["tags"].get("rua", {}).get("value", [])
    destinations = ", ".join(str(u) for u in rua) if isinstance(rua, list) else str(rua)
    return ok(ITEM, notes(f"reports go to {destinations}", parsed.get("warnings", [])[:2]),
              record=records[0])
