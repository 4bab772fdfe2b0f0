"""`selfcheckd scan`: one pass over a mail log, printing every sinkhole leak.

    selfcheckd scan [--file F | --cloudwatch --since DURATION] [--json]

Standard input is read when neither --file nor --cloudwatch is given.
stdout carries only leaks: with --json one JSON object per line
(`{"type": "leak", "queue_id", "recipient", "sender", "stat", "timestamp"}`),
otherwise one `LEAK ...` line each. The summary always goes to stderr (a JSON
object with --json). Exit status: 1 if any leak was found, 0 if none, 2 on bad
input or config (unreadable file, bad --since, CloudWatch unreachable, or
lines of which none is a sendmail/Postfix line: the wrong file).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

from daemon.logwatch.config import LeakWatchConfig
from daemon.logwatch.detector import Finding, LeakDetector
from daemon.logwatch.pipeline import LineProcessor
from daemon.logwatch.sources.cloudwatch import (
    RETRYABLE,
    CloudWatchPoller,
    create_logs_client,
    error_reason,
)
from daemon.logwatch.watcher import LOGLEVEL_HINT, format_sender

EXIT_CLEAN, EXIT_LEAKS, EXIT_BAD_INPUT = 0, 1, 2

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw]?)")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """`90`, `90s`, `15m`, `2h`, `1d`, `1w` -> seconds; ValueError otherwise."""
    m = _DURATION.fullmatch(text.strip().lower())
    if m is None or float(m.group(1)) <= 0:
        raise ValueError(f"--since: not a duration like 15m, 2h or 1d: {text!r}")
    return float(m.group(1)) * _UNIT_SECONDS[m.group(2)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--file", type=Path, metavar="F",
                       help="scan this mail log (default: standard input)")
    where.add_argument("--cloudwatch", action="store_true",
                       help="scan the [leakwatch.cloudwatch] log groups (needs --since)")
    parser.add_argument("--since", metavar="DURATION",
                        help="with --cloudwatch: how far back, e.g. 15m, 2h, 1d")
    parser.add_argument("--json", action="store_true",
                        help="print leaks as JSON lines (summary to stderr as JSON)")


class ScanReport:
    """Collects findings; prints leaks as they are found."""

    def __init__(self, out: TextIO, as_json: bool) -> None:
        self.out = out
        self.as_json = as_json
        self.leaks = 0
        self.test_recipients = 0

    def emit(self, findings: Iterable[Finding]) -> None:
        for f in findings:
            if f.expected:
                self.test_recipients += 1
                continue
            self.leaks += 1
            if self.as_json:
                self.out.write(json.dumps({"type": "leak", **f.as_dict()}) + "\n")
            else:
                self.out.write(
                    f"LEAK {f.timestamp} queue_id={f.queue_id} recipient={f.recipient} "
                    f"sender={format_sender(f.sender)} stat={f.stat}\n"
                )


def scan_lines(lines: Iterable[str], processor: LineProcessor, report: ScanReport) -> None:
    feed, emit = processor.feed, report.emit
    for line in lines:
        found = feed(line.rstrip("\r\n"))
        if found:
            emit(found)


def _summary(processor: LineProcessor, report: ScanReport, source: str,
             seconds: float) -> dict[str, Any]:
    counts = processor.counts
    total = counts.from_ + counts.to + counts.other + counts.unparsed
    return {
        "type": "summary",
        "source": source,
        "lines": total,
        "kinds": counts.as_dict(),
        "mta_lines": counts.mta,
        "leaks": report.leaks,
        "test_recipients": report.test_recipients,
        # No delivery line at all: nothing was seen, so "no leak" means nothing.
        "blind": counts.to == 0,
        "seconds": round(seconds, 3),
    }


def _print_summary(summary: dict[str, Any], as_json: bool, err: TextIO) -> None:
    if as_json:
        err.write(json.dumps(summary) + "\n")
    else:
        kinds = " ".join(f"{k}={v}" for k, v in summary["kinds"].items())
        err.write(
            f"scan_summary source={summary['source']} lines={summary['lines']} {kinds} "
            f"leaks={summary['leaks']} test_recipients={summary['test_recipients']} "
            f"blind={'true' if summary['blind'] else 'false'}\n"
        )
    if summary["blind"]:
        if summary["mta_lines"]:
            err.write(f"warning: no to= delivery lines among {summary['mta_lines']} sendmail "
                      f"lines: {LOGLEVEL_HINT}\n")
        else:
            err.write("warning: no sendmail/Postfix delivery lines at all: this scan saw "
                      "nothing it could judge\n")


async def _scan_cloudwatch(config: LeakWatchConfig, since: float, processor: LineProcessor,
                           report: ScanReport, clock: float) -> None:
    poller = CloudWatchPoller(config.cloudwatch)
    end_ms = int(clock * 1000)
    start_ms = end_ms - int(since * 1000)
    async with create_logs_client(config.cloudwatch) as client:
        poller.client = client
        events = await poller.query(client, start_ms, end_ms, config.cloudwatch.filter_pattern)
        for line in poller.take_new(events, start_ms):
            for f in processor.feed(line):
                if f.sender is None and config.cloudwatch.filter_pattern:
                    sender = await poller.lookup_sender(f.queue_id, end_ms)
                    if sender is not None:
                        processor.detector.senders.put(f.queue_id, sender)
                        f = Finding(f.queue_id, f.recipient, sender, f.stat, f.timestamp,
                                    processor.detector.is_allowed(sender))
                report.emit([f])


def run(args: argparse.Namespace, config: LeakWatchConfig,
        out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Scan once; return the exit status (0 clean, 1 leaks, 2 bad input/config)."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    detector = LeakDetector(config.domains, config.allowed_senders,
                            config.max_tracked_queue_ids)
    processor = LineProcessor(detector)
    report = ScanReport(out, bool(args.json))
    started = time.monotonic()
    if args.since is not None and not args.cloudwatch:
        err.write("scan: --since only applies with --cloudwatch\n")
        return EXIT_BAD_INPUT
    try:
        if args.cloudwatch:
            if args.since is None:
                err.write("scan: --cloudwatch needs --since DURATION (e.g. 1h)\n")
                return EXIT_BAD_INPUT
            since = parse_duration(args.since)
            try:
                asyncio.run(_scan_cloudwatch(config, since, processor, report, time.time()))
            except RETRYABLE as exc:
                err.write(f"scan: CloudWatch query failed ({error_reason(exc)}): "
                          f"{type(exc).__name__}: {exc}\n")
                return EXIT_BAD_INPUT
            source = "cloudwatch"
        elif args.file is not None:
            with Path(args.file).open(encoding="utf-8", errors="replace", newline="\n") as fh:
                scan_lines(fh, processor, report)
            source = str(args.file)
        else:
            stdin = open(sys.stdin.fileno(), encoding="utf-8", errors="replace",  # noqa: SIM115
                         newline="\n", closefd=False)
            with stdin:
                scan_lines(stdin, processor, report)
            source = "stdin"
    except ValueError as exc:
        err.write(f"scan: {exc}\n")
        return EXIT_BAD_INPUT
    except OSError as exc:
        name = getattr(exc, "filename", None) or args.file
        err.write(f"scan: cannot read {name}: {exc.strerror or exc}\n")
        return EXIT_BAD_INPUT
    out.flush()
    summary = _summary(processor, report, source, time.monotonic() - started)
    if summary["lines"] and not summary["mta_lines"]:
        # Not a mail log at all: "no leak" would pass the wrong file as clean.
        read = summary["lines"]
        which = "the one line read is not" if read == 1 else f"none of the {read} lines read is"
        err.write(f"scan: {source}: {which} a sendmail or Postfix log line; "
                  "is this the mail log?\n")
        return EXIT_BAD_INPUT
    _print_summary(summary, bool(args.json), err)
    return EXIT_LEAKS if report.leaks else EXIT_CLEAN
