"""DNS and sending-reputation checks: blocklists, PTR, MX, SPF, DKIM, DMARC, MTA-STS, TLS-RPT.

One module per item family, each a probe that only does its DNS work and
returns its verdict (`verdict.py`); `run.py` runs an entry's probes under the
entry's deadline and owns the verdict when a probe fails to reach one;
`component.py` schedules the entries inside `selfcheckd run`, `command.py` is
`selfcheckd dns`. docs/dns.md says what each item means for deliverability.
"""
