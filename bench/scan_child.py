"""`python -m bench.scan_child FILE`: the scan's fast path in its own process.

Prints what `selfcheckd scan --file FILE --json` prints (one JSON object per leak on stdout,
the summary on stderr), with `[leakwatch]` defaults, so its output can be compared with the
CLI's line by line and its cost measured without the CLI's start-up.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from daemon.logwatch.config import LeakWatchConfig
from daemon.logwatch.fastscan import scan_file


def main(argv: list[str]) -> int:
    path = Path(argv[0])
    started = time.monotonic()
    result = scan_file(path, LeakWatchConfig())
    out = sys.stdout
    for f in result.findings:
        if not f.expected:
            out.write(json.dumps({"type": "leak", **f.as_dict()}) + "\n")
    out.flush()
    counts = result.counts
    sys.stderr.write(json.dumps({
        "type": "summary", "source": str(path), "lines": result.lines,
        "kinds": None if counts is None else counts.as_dict(),
        "mta_lines": None if counts is None else counts.mta,
        "leaks": result.leaks, "test_recipients": result.test_recipients,
        "blind": result.blind, "fast": result.fast,
        "seconds": round(time.monotonic() - started, 3)}) + "\n")
    return 1 if result.leaks else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
