"""`selfcheckd scan`: one pass over a mail log, printing every sinkhole leak.

    selfcheckd scan [--file F | --cloudwatch --since DURATION] [--json]
                    [--queue | --queue-id ID]

Standard input is read when neither --file nor --cloudwatch is given.
stdout carries only leaks: with --json one JSON object per line
(`{"type": "leak", "queue_id", "recipient", "sender", "stat", "timestamp"}`),
otherwise one `LEAK ...` line each. The summary always goes to stderr (a JSON
object with --json). Exit status: 1 if any leak was found, 0 if none, 2 on bad
input or config (unreadable file, bad --since, CloudWatch unreachable, or
lines of which none is a sendmail/Postfix line: the wrong file), 3 if the log
is blind: sendmail/Postfix lines but not one delivery (to=) line, so a leak
could not have been seen (sendmail's LogLevel below 8). A cron job must not
read that as clean.

`--queue` prints, instead of leaks, every message still deferred at the end of
the input (exit 1 if any, 0 if none, 3 blind as above); `--queue-id ID` prints
every line of one message in order (exit 1 while it is deferred, 0 when it is
not, 3 when no line has that queue id). See docs/queue-health.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO, TextIO

from daemon.logwatch.config import LeakWatchConfig
from daemon.logwatch.detector import (
    LOGLEVEL_HINT,
    Finding,
    LeakDetector,
    format_sender,
    scan_senders,
)
from daemon.logwatch.fastscan import MAX_LINE_BYTES, FastScan, LineReader
from daemon.logwatch.parser import line_queue_header
from daemon.logwatch.pipeline import LineProcessor
from daemon.logwatch.queue import Message, QueueTracker, Result, iso

# The CloudWatch source (aiobotocore, botocore) is imported only by --cloudwatch:
# loading it costs a `scan --file` a quarter of a second.

EXIT_CLEAN, EXIT_LEAKS, EXIT_BAD_INPUT = 0, 1, 2
EXIT_DEFERRED, EXIT_NOT_FOUND = 1, 3  # --queue / --queue-id
# Mail log lines, not one delivery line: nothing could be judged (a leak, a deferral).
EXIT_BLIND = 3
_QUEUE_ID = re.compile(r"[0-9A-Za-z]{5,24}")

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
    parser.add_argument("--counts", action="store_true",
                        help="with --file: also count every line by kind in the summary "
                             "(parses every line: several times slower)")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--queue", action="store_true",
                      help="instead of leaks, print every message still deferred at the end "
                           "of the input (exit 1 if any, 0 if none)")
    what.add_argument("--queue-id", metavar="ID",
                      help="instead of leaks, print every line of this message in order "
                           "(exit 1 while it is deferred, 0 when not, 3 when no line has it)")


class ScanReport:
    """Collects findings; prints leaks as they are found."""

    def __init__(self, out: TextIO, as_json: bool, print_leaks: bool = True) -> None:
        self.out = out
        self.as_json = as_json
        self.print_leaks = print_leaks  # False: counted for the summary only
        self.leaks = 0
        self.test_recipients = 0

    def emit(self, findings: Iterable[Finding]) -> None:
        for f in findings:
            if f.expected:
                self.test_recipients += 1
                continue
            self.leaks += 1
            if not self.print_leaks:
                continue
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
             seconds: float, too_long: int = 0) -> dict[str, Any]:
    counts = processor.counts
    total = counts.from_ + counts.to + counts.other + counts.unparsed + too_long
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
        # Longer than MAX_LINE_BYTES (garbage after an unclean shutdown): counted in
        # `lines`, skipped unread.
        "too_long_lines": too_long,
        "seconds": round(seconds, 3),
    }


def _fast_summary(fast: FastScan, report: ScanReport, source: str,
                  seconds: float) -> dict[str, Any]:
    """The fast path's summary: per-kind counts are null when it did not need them."""
    counts = fast.counts
    return {
        "type": "summary",
        "source": source,
        "lines": fast.lines,
        "kinds": None if counts is None else counts.as_dict(),
        "mta_lines": None if counts is None else counts.mta,
        "leaks": report.leaks,
        "test_recipients": report.test_recipients,
        "blind": fast.blind,
        "too_long_lines": fast.too_long,
        "seconds": round(seconds, 3),
    }


def _print_summary(summary: dict[str, Any], as_json: bool, err: TextIO,
                   max_line: int = MAX_LINE_BYTES) -> None:
    if as_json:
        err.write(json.dumps(summary) + "\n")
    else:
        kinds = "".join(f" {k}={v}" for k, v in (summary["kinds"] or {}).items())
        err.write(
            f"scan_summary source={summary['source']} lines={summary['lines']}{kinds} "
            f"leaks={summary['leaks']} test_recipients={summary['test_recipients']} "
            f"blind={'true' if summary['blind'] else 'false'}"
            + (f" too_long_lines={summary['too_long_lines']}"
               if summary.get("too_long_lines") else "") + "\n"
        )
    if summary.get("too_long_lines"):
        cap = f"{max_line >> 20} MiB" if max_line % (1 << 20) == 0 else f"{max_line} bytes"
        err.write(f"warning: {summary['too_long_lines']} line(s) longer than {cap} skipped "
                  "unread (garbage, e.g. NUL bytes left by an unclean shutdown; no mail log "
                  "line is that long)\n")
    if summary["blind"]:
        if summary["mta_lines"]:
            err.write(f"warning: no to= delivery lines among {summary['mta_lines']} sendmail "
                      f"lines: {LOGLEVEL_HINT}\n")
        else:
            err.write("warning: no sendmail/Postfix delivery lines at all: this scan saw "
                      "nothing it could judge\n")


async def _scan_cloudwatch(config: LeakWatchConfig, since: float, processor: LineProcessor,
                           report: ScanReport, clock: float) -> None:
    from daemon.logwatch.sources.cloudwatch import CloudWatchPoller, create_logs_client

    poller = CloudWatchPoller(config.cloudwatch)
    end_ms = int(clock * 1000)
    start_ms = end_ms - int(since * 1000)
    async with create_logs_client(config.cloudwatch) as client:
        poller.client = client
        events = await poller.query(client, start_ms, end_ms, config.cloudwatch.filter_pattern)
        lines = poller.take_new(events, start_ms)
        for line, stream in zip(lines, poller.last_streams, strict=True):
            for f in processor.feed(line, stream):
                if f.sender is None and config.cloudwatch.filter_pattern:
                    sender = await poller.lookup_sender(f.queue_id, end_ms)
                    if sender is not None:
                        processor.detector.senders.put(f.queue_id, sender)
                        f = Finding(f.queue_id, f.recipient, sender, f.stat, f.timestamp,
                                    processor.detector.is_allowed(sender))
                report.emit([f])


def _source_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the choice of input (--cloudwatch, --since), if anything."""
    if args.since is not None and not args.cloudwatch:
        return "--since only applies with --cloudwatch"
    if args.cloudwatch and args.since is None:
        return "--cloudwatch needs --since DURATION (e.g. 1h)"
    return None


def _cloudwatch_failure(exc: BaseException) -> str:
    from daemon.aws_errors import error_reason

    return (f"scan: CloudWatch query failed ({error_reason(exc)}): "
            f"{type(exc).__name__}: {exc}\n")


def _stdin() -> BinaryIO:
    """Standard input as bytes, each read returning what is there; left open after."""
    return open(sys.stdin.fileno(), "rb", buffering=0, closefd=False)


def _lines(fh: BinaryIO, max_line: int) -> LineReader:
    """The lines of a file or of standard input, a line longer than `max_line` skipped and
    counted (`too_long`), never held whole."""
    return LineReader(fh, max_line)


def run(args: argparse.Namespace, config: LeakWatchConfig,
        out: TextIO | None = None, err: TextIO | None = None, *,
        max_line: int = MAX_LINE_BYTES, clock: Callable[[], float] = time.time) -> int:
    """Scan once; return the exit status (0 clean, 1 leaks, 2 bad input/config, 3 blind).

    `max_line`: longer lines are counted and skipped (a test seam; the cap of every path).
    `clock`: now, for --queue's silence (and the end of a CloudWatch window)."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    if getattr(args, "queue", False) or getattr(args, "queue_id", None) is not None:
        return run_queue(args, config, out, err, max_line=max_line, clock=clock)
    detector = LeakDetector(config.domains, config.allowed_senders,
                            config.max_tracked_queue_ids,
                            scan_senders(config.max_tracked_queue_ids))
    processor = LineProcessor(detector)
    report = ScanReport(out, bool(args.json))
    started = time.monotonic()
    fast: FastScan | None = None
    reader: LineReader | None = None
    if (problem := _source_problem(args)) is not None:
        err.write(f"scan: {problem}\n")
        return EXIT_BAD_INPUT
    try:
        if args.cloudwatch:
            since = parse_duration(args.since)
            from daemon.logwatch.sources.cloudwatch import RETRYABLE

            try:
                asyncio.run(_scan_cloudwatch(config, since, processor, report, time.time()))
            except RETRYABLE as exc:
                err.write(_cloudwatch_failure(exc))
                return EXIT_BAD_INPUT
            source = "cloudwatch"
        elif args.file is not None and not args.counts:
            # The fast path (daemon/logwatch/fastscan.py): the same findings, the
            # per-kind counts only when they come for free (or with --counts).
            from daemon.logwatch.fastscan import scan_file

            fast = scan_file(Path(args.file), config, max_line=max_line)
            report.emit(fast.findings)
            source = str(args.file)
        elif args.file is not None:
            with Path(args.file).open("rb") as fh:
                reader = _lines(fh, max_line)
                scan_lines(reader.text(), processor, report)
            source = str(args.file)
        else:
            with _stdin() as stdin:
                reader = _lines(stdin, max_line)
                scan_lines(reader.text(), processor, report)
            source = "stdin"
    except ValueError as exc:
        err.write(f"scan: {exc}\n")
        return EXIT_BAD_INPUT
    except OSError as exc:
        name = getattr(exc, "filename", None) or args.file
        err.write(f"scan: cannot read {name}: {exc.strerror or exc}\n")
        return EXIT_BAD_INPUT
    out.flush()
    if fast is not None:
        summary = _fast_summary(fast, report, source, time.monotonic() - started)
    else:
        summary = _summary(processor, report, source, time.monotonic() - started,
                           reader.too_long if reader is not None else 0)
    if summary["lines"] and summary["mta_lines"] == 0:
        # Not a mail log at all: "no leak" would pass the wrong file as clean.
        err.write(_not_a_mail_log(summary["lines"], source, args.file))
        return EXIT_BAD_INPUT
    _print_summary(summary, bool(args.json), err, max_line)
    if report.leaks:
        return EXIT_LEAKS
    return EXIT_BLIND if _blind(summary) else EXIT_CLEAN


def _blind(summary: dict[str, Any]) -> bool:
    """Mail log lines but no delivery line: LogLevel too low, "no leak" means nothing.

    An empty input is not blind in this sense (no mail, no leak; a CloudWatch filter
    pattern that matched nothing); its summary still warns."""
    return bool(summary["blind"] and summary["mta_lines"])


# -- --queue and --queue-id (docs/queue-health.md) -------------------------------------------


class QueueScan:
    """One pass for `--queue` (every line feeds the queue tracker; leaks are only counted)
    or `--queue-id` (only that message's lines are parsed and printed, in order)."""

    def __init__(self, config: LeakWatchConfig, out: TextIO, as_json: bool,
                 queue_id: str | None) -> None:
        # The scan's clock is the input's own newest line: retention ages messages
        # relative to the end of what was read, as the daemon would have at that time.
        self.queue = QueueTracker(config.queue_retention, config.max_tracked_messages,
                                  keep_delays=False, silent_after=config.queue_silent_after)
        detector = LeakDetector(config.domains, config.allowed_senders,
                                config.max_tracked_queue_ids,
                                scan_senders(config.max_tracked_queue_ids))
        self.processor = LineProcessor(detector, queue=self.queue)
        self.report = ScanReport(out, as_json, print_leaks=False)
        self.out = out
        self.as_json = as_json
        self.queue_id = queue_id
        self.lines = 0  # --queue-id: lines read (the processor counts the others)
        self.matched = 0
        self.too_long = 0  # lines longer than max_line, skipped unread
        self.max_line = MAX_LINE_BYTES

    def feed(self, line: str, stream: str | None = None) -> None:
        line = line.rstrip("\r\n")
        if self.queue_id is None:
            found = self.processor.feed(line, stream)
            if found:
                self.report.emit(found)
            return
        self.lines += 1
        if self.queue_id not in line:
            return
        header = line_queue_header(line)
        if header is None or header[2] != self.queue_id:
            return  # the id in another place: a DSN's parent line, a remote's "queued as"
        self.matched += 1
        self.processor.feed(line, stream)
        timestamp, host, _ = header
        if self.as_json:
            entry: dict[str, Any] = {"type": "line", "timestamp": timestamp, "host": host}
            if stream is not None:
                entry["log_stream"] = stream
            entry["line"] = line
            self.out.write(json.dumps(entry) + "\n")
        else:
            self.out.write(line + "\n" if stream is None else f"[{stream}] {line}\n")


def message_lines(msg: Message, label: str, silence: dict[str, Any]) -> list[str]:
    """A message as text: one head line, then one indented line per recipient."""
    head = (f"{label} queue_id={msg.queue_id} sender={format_sender(msg.sender)} "
            f"first_seen={iso(msg.first_seen)} last_seen={iso(msg.last_seen)} "
            f"attempts={msg.attempts} hosts={','.join(msg.hosts) or '-'}")
    if msg.log_streams:
        head += f" log_streams={','.join(msg.log_streams)}"
    head += (f" tasks={','.join(msg.tasks) or '-'} "
             f"silent={'true' if silence['silent'] else 'false'} "
             f"since_last_line={silence['since_last_line']:.0f}")
    return [head, *(f"  to={address} result={r.result.value} attempts={r.attempts} "
                    f"stat={r.stat}" for address, r in msg.recipients.items())]


def silence(queue: QueueTracker, msg: Message, now: float) -> dict[str, Any]:
    """Whether a message is silent now, and the seconds since its last line."""
    since = max(0.0, now - msg.last_seen)
    return {"silent": queue.silent_for(msg, now) is not None,
            "since_last_line": round(since, 3)}


async def _fetch_cloudwatch(config: LeakWatchConfig, since: float, clock: float,
                            queue_id: str | None) -> tuple[list[str], list[str]]:
    """The window's lines and their log streams: every event for --queue (queue health
    needs every delivery line, whatever filter_pattern says), those naming the id for
    --queue-id."""
    from daemon.logwatch.sources.cloudwatch import CloudWatchPoller, create_logs_client

    poller = CloudWatchPoller(config.cloudwatch)
    end_ms = int(clock * 1000)
    start_ms = end_ms - int(since * 1000)
    async with create_logs_client(config.cloudwatch) as client:
        if queue_id is None:
            events = await poller.query(client, start_ms, end_ms, "")
        else:
            events = await poller.query_queue_id(client, queue_id, start_ms, end_ms)
    lines = poller.take_new(events, start_ms)
    return lines, poller.last_streams


def run_queue(args: argparse.Namespace, config: LeakWatchConfig, out: TextIO,
              err: TextIO, *, max_line: int = MAX_LINE_BYTES,
              clock: Callable[[], float] = time.time) -> int:
    """`scan --queue` / `scan --queue-id ID`; the exit status.

    Silence is judged at `clock()` (never before the input's newest line), as the daemon
    judges it at its clock: a deferred message of a log that goes on to now is silent
    once no line touched it for `queue_silent_after`."""
    as_json = bool(args.json)
    queue_id: str | None = args.queue_id
    if queue_id is not None and not _QUEUE_ID.fullmatch(queue_id):
        err.write(f"scan: --queue-id: not a sendmail or Postfix queue id: {queue_id!r}\n")
        return EXIT_BAD_INPUT
    if (problem := _source_problem(args)) is not None:
        err.write(f"scan: {problem}\n")
        return EXIT_BAD_INPUT
    scan = QueueScan(config, out, as_json, queue_id)
    started = time.monotonic()
    reader: LineReader | None = None
    try:
        if args.cloudwatch:
            since = parse_duration(args.since)
            from daemon.logwatch.sources.cloudwatch import RETRYABLE

            try:
                lines, streams = asyncio.run(
                    _fetch_cloudwatch(config, since, clock(), queue_id))
            except RETRYABLE as exc:
                err.write(_cloudwatch_failure(exc))
                return EXIT_BAD_INPUT
            for line, stream in zip(lines, streams, strict=True):
                scan.feed(line, stream)
            source = "cloudwatch"
        elif args.file is not None:
            with Path(args.file).open("rb") as fh:
                reader = _lines(fh, max_line)
                for line in reader.text():
                    scan.feed(line)
            source = str(args.file)
        else:
            with _stdin() as stdin:
                reader = _lines(stdin, max_line)
                for line in reader.text():
                    scan.feed(line)
            source = "stdin"
    except ValueError as exc:
        err.write(f"scan: {exc}\n")
        return EXIT_BAD_INPUT
    except OSError as exc:
        name = getattr(exc, "filename", None) or args.file
        err.write(f"scan: cannot read {name}: {exc.strerror or exc}\n")
        return EXIT_BAD_INPUT
    seconds = time.monotonic() - started
    scan.too_long = reader.too_long if reader is not None else 0
    scan.max_line = max_line
    now = max(clock(), scan.queue.newest or 0.0)
    if queue_id is not None:
        return _finish_history(scan, queue_id, source, seconds, err, now)
    return _finish_queue(scan, source, seconds, err, args.file, now)


def _not_a_mail_log(read: int, source: str, file: str | None) -> str:
    """The one line for input that holds no mail log line (exit 2)."""
    which = "the one line read is not" if read == 1 else f"none of the {read} lines read is"
    if file is not None and _is_gzip(Path(file)):
        return (f"scan: {source}: {which} a sendmail or Postfix log line; it is "
                f"gzip-compressed: pipe it in with zcat {file} | selfcheckd scan ...\n")
    return f"scan: {source}: {which} a sendmail or Postfix log line; is this the mail log?\n"


def _is_gzip(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            return fh.read(2) == b"\x1f\x8b"
    except OSError:
        return False


def _finish_queue(scan: QueueScan, source: str, seconds: float, err: TextIO,
                  file: str | None, now: float) -> int:
    summary = _summary(scan.processor, scan.report, source, seconds, scan.too_long)
    if summary["lines"] and not summary["mta_lines"]:
        err.write(_not_a_mail_log(summary["lines"], source, file))
        return EXIT_BAD_INPUT
    queue = scan.queue
    queue.expire()  # past the retention before the input's end: returned or gone
    deferred = queue.deferred_messages()
    silent = 0
    for msg in deferred:
        quiet = silence(queue, msg, now)
        silent += quiet["silent"]
        if scan.as_json:
            scan.out.write(json.dumps({"type": "deferred", **msg.as_dict(), **quiet}) + "\n")
        else:
            scan.out.write("\n".join(message_lines(msg, "DEFERRED", quiet)) + "\n")
    scan.out.flush()
    summary["deliveries"] = {r.value: queue.counts[r] for r in Result}
    summary["deferred_messages"] = len(deferred)
    summary["silent_messages"] = silent
    summary["handoffs"] = queue.handoffs
    summary["queue_errors"] = {k.value: n for k, n in queue.errors.items()}
    summary["tasks"] = queue.task_listing(now)
    _print_summary(summary, scan.as_json, err, scan.max_line)
    if not scan.as_json:
        counts = ",".join(f"{r}:{n}" for r, n in summary["deliveries"].items())
        errors = ",".join(f"{k}:{n}" for k, n in summary["queue_errors"].items())
        tasks = ",".join(t["task"] for t in summary["tasks"]) or "-"
        err.write(f"queue_summary deferred_messages={len(deferred)} silent_messages={silent} "
                  f"handoffs={queue.handoffs} deliveries={counts} queue_errors={errors} "
                  f"tasks={tasks}\n")
    if deferred:
        return EXIT_DEFERRED
    return EXIT_BLIND if _blind(summary) else EXIT_CLEAN


def _finish_history(scan: QueueScan, queue_id: str, source: str, seconds: float,
                    err: TextIO, now: float) -> int:
    scan.out.flush()
    msg = scan.queue.get(queue_id)
    deferred = msg is not None and msg.deferred > 0
    quiet = None if msg is None else silence(scan.queue, msg, now)
    if scan.as_json:
        err.write(json.dumps({
            "type": "summary", "source": source, "lines": scan.lines, "queue_id": queue_id,
            "matched": scan.matched, "deferred": deferred,
            "message": None if msg is None or quiet is None else {**msg.as_dict(), **quiet},
            "seconds": round(seconds, 3),
        }) + "\n")
    else:
        err.write(f"scan_summary source={source} lines={scan.lines} queue_id={queue_id} "
                  f"matched={scan.matched} deferred={'true' if deferred else 'false'}\n")
        if msg is not None and quiet is not None:
            err.write("\n".join(message_lines(msg, "MESSAGE", quiet)) + "\n")
    if not scan.matched:
        err.write(f"scan: no line for queue id {queue_id} in {source}\n")
        return EXIT_NOT_FOUND
    return EXIT_DEFERRED if deferred else EXIT_CLEAN
