"""Measure `selfcheckd scan --file F --json` throughput in lines per second.

    .venv/bin/python bench/scan_throughput.py [--lines 1000000] [--repeat 3]

Writes a synthetic maillog (real sendmail 8.17 / Postfix shapes, plus the
opendkim/dovecot/entrypoint noise CloudWatch carries) to a temp file, then runs
the scan entry point on it in-process, leaks written to /dev/null.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path

from daemon.logwatch import scan_command
from daemon.logwatch.config import LeakWatchConfig

TS = "2026-11-23T19:30:{s:02d}.{us:06d}+00:00"


def _qid(i: int) -> str:
    return f"6ANJ{i % 1_000_000:06d}{i:08d}"[:14]


def make_lines(n: int, seed: int = 7) -> list[str]:
    """Mixed lines: about 25% from=, 35% to= (1 in 200 to sinkhole.test), 40% other."""
    rnd = random.Random(seed)
    out: list[str] = []
    i = 0
    while len(out) < n:
        i += 1
        ts = TS.format(s=i % 60, us=i % 1_000_000)
        q = _qid(i)
        out.append(f"{ts} ip-10-0-1-5 sendmail[{i}]: {q}: from=<app{i % 97}@example.com>, "
                   f"size={rnd.randint(200, 90000)}, class=0, nrcpts=2, msgid=<m{i}@example.com>, "
                   "proto=ESMTP, daemon=MTA, relay=localhost [127.0.0.1]")
        rcpt = f"nobody-{i}@sinkhole.test" if i % 200 == 0 else f"user{i % 1013}@example.org"
        out.append(f"{ts} ip-10-0-1-5 sendmail[{i + 1}]: {q}: to=<{rcpt}>,<x{i}@example.net>, "
                   "delay=00:00:01, xdelay=00:00:01, mailer=esmtp, pri=120900, "
                   "relay=mx.example.org. [198.51.100.7], dsn=2.0.0, stat=Sent (ok queued)")
        if i % 3 == 0:
            out.append(f"{ts} ip-10-0-1-5 postfix/smtp[{i}]: 4Y8K{i:010X}: to=<p{i}@example.org>, "
                       "relay=mx.example.org[198.51.100.7]:25, delay=0.6, delays=0/0/0.2/0.4, "
                       "dsn=2.0.0, status=sent (250 2.0.0 Ok)")
        out.append(f"{ts} ip-10-0-1-5 opendkim[77]: {q}: DKIM-Signature field added "
                   "(s=mail, d=example.com)")
        out.append(f"{ts} ip-10-0-1-5 sendmail[{i}]: STARTTLS=client, relay=mx.example.org., "
                   "version=TLSv1.3, verify=OK, cipher=TLS_AES_256_GCM_SHA384, bits=256/256")
        if i % 5 == 0:
            out.append("tail: '/var/log/maillog' has been replaced;  following new file")
    return out[:n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    opts = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "maillog"
        log.write_text("\n".join(make_lines(opts.lines)) + "\n", encoding="utf-8")
        size_mb = log.stat().st_size / 1e6
        scan_args = argparse.ArgumentParser()
        scan_command.add_arguments(scan_args)
        args = scan_args.parse_args(["--file", str(log), "--json"])
        best = float("inf")
        with open(os.devnull, "w") as sink:
            for _ in range(opts.repeat):
                started = time.perf_counter()
                code = scan_command.run(args, LeakWatchConfig(), out=sink, err=sink)
                best = min(best, time.perf_counter() - started)
        print(f"lines={opts.lines} size_mb={size_mb:.1f} exit={code} best_seconds={best:.3f} "
              f"lines_per_second={opts.lines / best:,.0f}")


if __name__ == "__main__":
    main()
