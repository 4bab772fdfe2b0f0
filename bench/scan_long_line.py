"""Peak RSS of `selfcheckd scan` over a mail log with a long newline-free region (issue 17).

After an unclean shutdown a log file can hold a stretch of NUL bytes where the
filesystem had allocated blocks the writer never filled, or of whatever the blocks
held before: one "line" of hundreds of MiB. The file here is real-shaped sendmail
lines, then such a region (`--fill nul`: sparse, so it costs no disk; `--fill
random`: random bytes, not UTF-8, no newline), then more lines. Three leaks: one
before the region, one after it, and one whose `from=` line is before the region and
its `to=` line after it, so the sender lookup has to cross the region too.

Each way of scanning runs in a process of its own (`bench/procs.py`: wall time, peak
RSS from wait4): the fast path (`scan --file`), the per-line reference (`--counts`),
`--queue`, and standard input (`scan < F`).

    .venv/bin/python -m bench.scan_long_line --mib 500 [--fill nul|random] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from bench import procs

DOMAIN = "sinkhole.test"
HOST = "2026-11-23T19:30:26.073041+00:00 ip-10-0-1-5 sendmail[10775]"


def _from(qid: str, sender: str) -> str:
    return (f"{HOST}: {qid}: from=<{sender}>, size=237, class=0, nrcpts=1, "
            f"msgid=<{qid}@example.com>, proto=ESMTP, daemon=MTA, relay=h [10.0.0.9]\n")


def _to(qid: str, rcpt: str) -> str:
    return (f"{HOST}: {qid}: to=<{rcpt}>, delay=00:00:00, xdelay=00:00:00, mailer=smtp, "
            f"pri=30237, relay=sinkhole.cabal.internal. [127.0.0.2], dsn=4.0.0, "
            "stat=Deferred: 421 4.3.2 Service temporarily unavailable\n")


def _filler(n: int) -> str:
    return "".join(_from(f"6ANJUQ{i:02d}{i:06d}", "a@example.org")
                   + _to(f"6ANJUQ{i:02d}{i:06d}", "b@example.org") for i in range(n))


def write_log(path: Path, region_bytes: int, fill: str = "nul") -> None:
    """Lines, a region of `region_bytes` without a newline (NUL: sparse), lines."""
    with path.open("wb") as fh:
        head = (_filler(500) + _from("6ANJUQaa010001", "before@example.com")
                + _to("6ANJUQaa010001", f"nobody-1@{DOMAIN}")
                + _from("6ANJUQcc010003", "across@example.com") + _filler(500))
        fh.write(head.encode())
        start = fh.tell()
        if fill == "nul":
            fh.truncate(start + region_bytes)  # a hole: reads as NUL bytes, takes no disk
            fh.seek(start + region_bytes)
        else:
            left = region_bytes
            while left:
                block = os.urandom(min(left, 1 << 20)).replace(b"\n", b"\xff")
                fh.write(block)
                left -= len(block)
        tail = ("\n" + _filler(500) + _to("6ANJUQcc010003", f"nobody-3@{DOMAIN}")
                + _from("6ANJUQbb010002", "after@example.com")
                + _to("6ANJUQbb010002", f"nobody-2@{DOMAIN}") + _filler(500))
        fh.write(tail.encode())


def measure(log: Path, runs: int) -> dict[str, dict[str, object]]:
    cli = [sys.executable, "-m", "daemon.cli", "scan", "--json"]
    shapes = {
        "fast path (scan --file F)": ([*cli, "--file", str(log)], None),
        "reference (scan --file F --counts)": ([*cli, "--file", str(log), "--counts"], None),
        "queue (scan --file F --queue)": ([*cli, "--file", str(log), "--queue"], None),
        "stdin (scan < F)": (cli, log),
    }
    out: dict[str, dict[str, object]] = {}
    for name, (cmd, stdin) in shapes.items():
        results = [_run(cmd, stdin) for _ in range(runs)]
        last = results[-1]
        leaks = sorted(json.loads(line)["recipient"] for line in last.stdout.splitlines()
                       if b'"leak"' in line)
        summary: dict[str, object] = {}
        for line in last.stderr.splitlines():
            if line.startswith(b"{"):
                summary = json.loads(line)
        out[name] = {
            "exit": last.returncode,
            "wall_s": round(procs.median([r.wall for r in results]), 2),
            "peak_rss_mib": round(max(r.max_rss_mib for r in results), 1),
            "leaks": leaks,
            "too_long_lines": summary.get("too_long_lines"),
            "deferred": summary.get("deferred_messages"),
            "stderr_tail": last.stderr.decode(errors="replace").strip().splitlines()[-1:]
            if last.returncode not in (0, 1) else [],
        }
    return out


def _run(cmd: list[str], stdin: Path | None) -> procs.Run:
    if stdin is None:
        return procs.run(cmd)
    # procs.run gives the child /dev/null; a shell redirect gives it the file.
    return procs.run(["/bin/sh", "-c", '"$0" "$@" < "$SCAN_INPUT"', *cmd],
                     env={**os.environ, "SCAN_INPUT": str(stdin)})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=500, help="size of the region")
    parser.add_argument("--fill", choices=("nul", "random"), default="nul")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        log = Path(tmp) / "maillog"
        write_log(log, args.mib << 20, args.fill)
        size = log.stat().st_size
        results = measure(log, args.runs)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"maillog with a {args.mib} MiB newline-free {args.fill} region "
          f"({size:,} bytes)")
    for name, r in results.items():
        print(f"{name}: exit {r['exit']}, {r['wall_s']} s, peak RSS {r['peak_rss_mib']} MiB, "
              f"leaks {r['leaks']}, too_long_lines {r['too_long_lines']}, "
              f"deferred {r['deferred']} {r['stderr_tail']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
