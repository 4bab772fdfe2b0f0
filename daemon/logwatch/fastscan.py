"""The fast path of `selfcheckd scan --file`: the reference's findings without parsing every line.

The reference (`scan_command.scan_lines`: `LineProcessor` + `LeakDetector` over every decoded
line) spends its time parsing the millions of lines that cannot be leaks. This module finds the
same leaks from the bytes:

1. **One streaming pass** in `chunk_size` reads (lines split across reads are joined). It counts
   newlines, lowercases each read (ASCII) and finds the configured domains in it; only the lines
   holding a domain are decoded and parsed with the real `parse_line`, and their deliveries fed,
   in file order, to a real `LeakDetector`. So recipients, case, trailing dots, subdomains,
   lookalikes and the once-per-(queue id, recipient) rule are the reference's own code.
2. **Senders** come from `from=` lines, which the pass skipped. For each finding the latest
   `QID: from=` line before its delivery line is looked for backwards from that line within
   `window` bytes (where it nearly always is; all windows together read at most a quarter of
   the file, so many ids with no from= line nearby do not cost more than the next step). The
   ids still unresolved (a sender far back, or none in the file: a retry after a rotation) get
   one backward search each when those would read little, else one forward pass that finds
   all of them at once: it takes the word before each `: from=` of a read with one
   `bytes.split` and parses only the lines of wanted ids; a long pass is split at a line start
   and its second half read by a forked child on the other CPU.
   The reference's sender map is a bounded LRU (`max_senders`; a scan's is large, see
   `detector.SCAN_SENDERS`): a sender counts only while fewer than that many other queue ids
   were added after it. That is checked exactly: bounds first (the bytes between over the
   shortest from= line, the lines between from the pass's newline counts, the `: from=`
   between, the distinct words before them), the queue ids between parsed only when no bound
   decides.
3. **Blindness**: the pass looks for `: to=` lines until one parses as a delivery. A log with
   none is blind; it has nothing to find, and it is scanned by the reference so that its summary
   (per-kind counts, MTA lines) is the reference's.

Why the candidates are a superset of the reference's: a recipient is a sinkhole one when
`domain.rstrip(".").lower()` is a configured domain D or ends with "." + D. For an ASCII D the
lowered text contains D, and the only non-ASCII characters whose `str.lower()` holds an ASCII
letter are U+0130 (lowers to "i" + U+0307, which cannot end in an ASCII D) and the Kelvin sign
U+212A (lowers to "k"): lines with a Kelvin sign are candidates too when D contains "k". Invalid
UTF-8 decodes to U+FFFD and never hides an ASCII byte. Non-ASCII or empty domains use the
reference path.

What the fast path does not give: the per-kind line counts (`LineCounts`) of a log that is not
blind. Counting them exactly needs every line parsed (that is the reference's cost), so
`FastScan.counts` is None then, unless `exact_counts=True` (which runs the reference).
`lines` and `blind` are always exact.

The file is streamed: memory holds one read, at most `max_line` bytes of an unfinished line,
and the findings. A line longer than `max_line` (4 MiB, the live follower's cap; a stretch of
NUL bytes left by an unclean shutdown is one such "line" of hundreds of MiB) is counted in
`too_long` and skipped by every path, the reference (`LineReader`) included, so findings stay
identical; it is never held whole. It must be seekable (the sender lookups read it again);
standard input from a pipe is not.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import os
import signal
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Literal

import structlog

from daemon.logwatch.detector import Finding, LeakDetector, normalize_domain, scan_senders
from daemon.logwatch.parser import Delivery, QueueAdd, parse_line
from daemon.logwatch.pipeline import LineCounts, LineProcessor

if TYPE_CHECKING:
    from daemon.logwatch.config import LeakWatchConfig

log = structlog.get_logger("daemon.scan")

# Reads of 1 MiB stay in the CPU's cache between lower() and find(); bigger is no faster.
DEFAULT_CHUNK = 1 << 20
# A line longer than this (without its newline) is counted and skipped, never held: the live
# file follower's cap (sources/file.py, max_batch_bytes). No mail log line comes near it.
MAX_LINE_BYTES = 4 << 20
# How far back from a delivery line its from= line is looked for before the ids still
# unresolved get a search without limit (see FORWARD_COST).
DEFAULT_WINDOW = 4 << 20
# Up to this many queue ids unresolved after the window get one backward search each; more
# get one forward pass for all (whose cost does not grow with their number) unless their
# backward searches would cost less (FORWARD_COST).
MAX_BACKWARD_SEARCHES = 3
# The window searches together read at most 1/WINDOW_SHARE of the bytes before the last
# finding; the ids left after that go to the search without limit.
WINDOW_SHARE = 4
# How many times more a byte costs in the forward pass than in a backward rfind.
FORWARD_COST = 7
# A forward pass this long is read by two processes (a fork costs a few milliseconds).
PARALLEL_FROM = 32 << 20
_BACK_FIRST_READ = 16 << 10
_BACK_MAX_READ = 4 << 20

_FROM = b": from="
_TO = b": to="
_KELVIN = "\u212a".encode()
# The shortest line parse_line takes for a from= line, newline included:
# "Jan  1 00:00:00 h sm-mta: QQQQQ: from=x\n". Fewer bytes than limit * this between a
# from= line and a delivery cannot hold `limit` other queue-adds.
MIN_QUEUE_ADD_BYTES = 40


@dataclass(frozen=True, slots=True)
class FastScan:
    """What a scan found: the reference's findings, in order, and the summary numbers."""

    findings: tuple[Finding, ...]  # leaks and test traffic (`expected`), as LeakDetector gives
    lines: int  # lines read, as the reference counts them (a last line without newline counts)
    blind: bool  # no delivery (to=) line at all
    # Per-kind counts and MTA lines, exact; None when the fast path skipped them (a log with
    # deliveries scanned without exact_counts).
    counts: LineCounts | None
    fast: bool  # False: the reference path produced this (see scan_file)
    too_long: int = 0  # lines longer than max_line, counted in `lines`, skipped unread

    @property
    def leaks(self) -> int:
        return sum(1 for f in self.findings if not f.expected)

    @property
    def test_recipients(self) -> int:
        return sum(1 for f in self.findings if f.expected)


def scan_file(path: Path, config: LeakWatchConfig, *, exact_counts: bool = False,
              chunk_size: int = DEFAULT_CHUNK, window: int = DEFAULT_WINDOW,
              max_line: int = MAX_LINE_BYTES) -> FastScan:
    """Scan a mail log file for sinkhole leaks, as `scan --file` reports them.

    OSError (missing, unreadable, a directory) propagates as from `open`.
    """
    scanner = FastScanner(config.domains, config.allowed_senders,
                          config.max_tracked_queue_ids, chunk_size=chunk_size, window=window,
                          max_senders=scan_senders(config.max_tracked_queue_ids),
                          max_line=max_line)
    with Path(path).open("rb", buffering=0) as fh:
        return scanner.scan(fh, exact_counts=exact_counts)


@dataclass(slots=True)
class _Hit:
    """A from= line that parse_line reads as a queue-add: [start, newline) in the file."""

    start: int
    newline: int
    sender: str


@dataclass(slots=True)
class _Pending:
    """A finding whose sender is still to be resolved: its queue id and delivery line start."""

    finding: Finding
    at: int


class FastScanner:
    """The fast path over one seekable binary file; see the module docstring."""

    def __init__(self, domains: Iterable[str], allowed_senders: Iterable[str],
                 max_tracked: int = 100_000, *, chunk_size: int = DEFAULT_CHUNK,
                 window: int = DEFAULT_WINDOW,
                 far_lookup: Literal["auto", "backward", "forward"] = "auto",
                 max_senders: int | None = None, max_line: int = MAX_LINE_BYTES) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1, not {chunk_size}")
        if max_line < 1:
            raise ValueError(f"max_line must be at least 1, not {max_line}")
        self.domains = list(domains)
        self.allowed_senders = list(allowed_senders)
        self.max_tracked = max_tracked
        self.max_senders = max_tracked if max_senders is None else max_senders
        self.max_line = max_line
        # No read is longer than a line may be: a line wholly inside one read is then never
        # too long, and only the lines that span reads need their length checked.
        self.chunk_size = min(chunk_size, max_line)
        self.window = max(0, window)
        # How senders beyond the window are found: one search back per queue id, one forward
        # pass for all, or whichever reads less ("auto"). A test seam: results never differ.
        self.far_lookup = far_lookup
        # A forward pass over at least this many bytes is split across two processes.
        self.parallel_from = PARALLEL_FROM
        normalized = [normalize_domain(d) for d in self.domains]
        # Only ASCII, non-empty domains have a byte needle the reference cannot match around.
        self.supported = bool(normalized) and all(d and d.isascii() for d in normalized)
        self._needles = sorted({d.encode("ascii") for d in normalized}) if self.supported else []
        self._kelvin = any(b"k" in n for n in self._needles)

    def _detector(self) -> LeakDetector:
        return LeakDetector(self.domains, self.allowed_senders, self.max_tracked,
                            self.max_senders)

    # -- entry -----------------------------------------------------------------------
    def scan(self, fh: BinaryIO, *, exact_counts: bool = False) -> FastScan:
        """Scan from the start of `fh` (binary, seekable) to its end."""
        if exact_counts or not self.supported or not fh.seekable():
            return self.reference(fh)
        fd = fh.fileno()
        state = _Pass(self)
        state.run(fd)
        if not state.delivery_seen:
            # Nothing can be a leak; the reference gives the counts that explain the blindness.
            return self.reference(fh)
        findings = self._resolve(fd, state)
        return FastScan(tuple(findings), state.lines, blind=False, counts=None, fast=True,
                        too_long=state.too_long)

    def reference(self, fh: BinaryIO) -> FastScan:
        """The per-line reference path (what `scan_command.scan_lines` does), from the start."""
        if fh.seekable():
            fh.seek(0)
        processor = LineProcessor(self._detector())
        findings: list[Finding] = []
        feed = processor.feed
        reader = LineReader(fh, self.max_line, self.chunk_size)
        for line in reader.text():
            found = feed(line.rstrip("\r"))
            if found:
                findings.extend(found)
        c = processor.counts
        return FastScan(tuple(findings), c.from_ + c.to + c.other + c.unparsed + reader.too_long,
                        blind=c.to == 0, counts=c, fast=False, too_long=reader.too_long)

    # -- senders ---------------------------------------------------------------------
    def _resolve(self, fd: int, state: _Pass) -> list[Finding]:
        """Each finding with the sender the reference's detector had for it then."""
        senders: dict[tuple[str, int], str | None] = {}
        unresolved: dict[str, set[int]] = {}
        # Searching windows for many ids with no from= line nearby can read more than the
        # forward pass that will follow: past this many bytes, the rest wait for that pass.
        budget = max((p.at for p in state.pending), default=0) // WINDOW_SHARE
        spent = 0
        for p in state.pending:
            key = (p.finding.queue_id, p.at)
            if key in senders or p.at in unresolved.get(key[0], ()):
                continue
            if spent > budget:
                unresolved.setdefault(key[0], set()).add(p.at)
                continue
            floor = max(0, p.at - self.window)
            hit = self._search_back(fd, key[0], p.at, floor)
            spent += p.at - (floor if hit is None else hit.start)
            if hit is None:
                unresolved.setdefault(key[0], set()).add(p.at)
            else:
                senders[key] = self._sender_if_kept(fd, key[0], hit, p.at, state)
        if unresolved:
            last = max(max(ats) for ats in unresolved.values())
            # A backward search reads from its delivery line back to the from= line, or to
            # the start of the file when there is none (a retry after a rotation); the
            # forward pass reads everything before the last delivery once for all of them,
            # about seven times slower per byte than rfind.
            backward = sum(max(ats) for ats in unresolved.values())
            if self.far_lookup == "auto":
                use_backward = (len(unresolved) <= MAX_BACKWARD_SEARCHES
                                or backward <= FORWARD_COST * last)
            else:
                use_backward = self.far_lookup == "backward"
            if use_backward:
                for qid, ats in unresolved.items():
                    self._resolve_backward(fd, qid, ats, senders, state)
            else:
                hits = self._search_forward(fd, set(unresolved), last)
                for qid, ats in unresolved.items():
                    found = hits.get(qid, [])
                    ends = [h.newline for h in found]
                    for at in ats:
                        i = bisect.bisect_left(ends, at) - 1  # newline < at: the line is before
                        senders[(qid, at)] = (None if i < 0 else self._sender_if_kept(
                            fd, qid, found[i], at, state))
        detector = self._detector()
        out: list[Finding] = []
        for p in state.pending:
            sender = senders[(p.finding.queue_id, p.at)]
            out.append(replace(p.finding, sender=sender, expected=detector.is_allowed(sender)))
        return out

    def _resolve_backward(self, fd: int, qid: str, ats: set[int],
                          senders: dict[tuple[str, int], str | None], state: _Pass) -> None:
        """Search back from the latest delivery line of `qid` to the start of the file,
        giving each of its delivery lines the sender of the latest from= line before it."""
        todo = sorted(ats, reverse=True)
        cursor = todo[0]
        while todo:
            hit = self._search_back(fd, qid, cursor, 0)
            if hit is None:
                for at in todo:
                    senders[(qid, at)] = None
                return
            while todo and todo[0] > hit.newline:
                at = todo.pop(0)
                senders[(qid, at)] = self._sender_if_kept(fd, qid, hit, at, state)
            cursor = hit.start

    def _search_back(self, fd: int, qid: str, at: int, floor: int) -> _Hit | None:
        """The latest queue-add of `qid` in a line wholly within [floor, at); `at` starts a line."""
        needle = qid.encode("ascii") + _FROM
        for base, data, begin in _blocks_backward(fd, floor, at, self.max_line):
            end = len(data)
            while True:
                i = data.rfind(needle, begin, end)
                if i < 0:
                    break
                start = max(data.rfind(b"\n", begin, i) + 1, begin)
                newline = data.find(b"\n", i)
                if newline - start > self.max_line:  # skipped by every path
                    end = start
                    continue
                record = parse_line(_text(data[start:newline]))
                if isinstance(record, QueueAdd) and record.queue_id == qid:
                    return _Hit(base + start, base + newline, record.sender)
                end = start
        return None

    def _search_forward(self, fd: int, qids: set[str], until: int) -> dict[str, list[_Hit]]:
        """Every queue-add of the given ids in [0, until), in file order, in one pass.

        A long pass is split in two at a line start and the second half read by a forked
        child on another core (the machine's second CPU halves the wall time); if the
        child cannot run or fails, this process reads that half itself.
        """
        middle = _line_start_after(fd, until // 2) if until >= self.parallel_from else until
        size, cap = self.chunk_size, self.max_line
        if middle >= until or not hasattr(os, "fork"):
            return _queue_adds(fd, qids, 0, until, size, cap)
        child = _fork_reader(fd, qids, middle, until, size, cap)
        try:
            hits = _queue_adds(fd, qids, 0, middle, size, cap)
        except BaseException:
            if child is not None:
                _abandon(child)
            raise
        rest = _collect(child) if child is not None else None
        if rest is None:
            rest = _queue_adds(fd, qids, middle, until, size, cap)
        for qid, found in rest.items():
            hits.setdefault(qid, []).extend(found)
        return hits

    def _sender_if_kept(self, fd: int, qid: str, hit: _Hit, at: int,
                        state: _Pass) -> str | None:
        """hit.sender, unless the reference's LRU forgot `qid` before the line at `at`.

        The LRU drops a key once `max_senders` other keys were added after it. The lines
        between hold at most (bytes / MIN_QUEUE_ADD_BYTES), at most (lines) and at most
        (count of ": from=") queue-adds; only when all three bounds reach the limit are the
        distinct queue ids counted.
        """
        after = hit.newline + 1
        limit = self.max_senders
        if (at - after) // MIN_QUEUE_ADD_BYTES < limit:
            return hit.sender
        if state.lines_before(fd, at) - state.lines_before(fd, after) < limit:
            return hit.sender
        occurrences = 0
        for _, data in _blocks_forward(fd, after, at, self.chunk_size, self.max_line):
            occurrences += data.count(_FROM)
            if occurrences >= limit:
                break
        else:
            return hit.sender
        # An upper bound on the ids: the word before each ": from=", whatever the line.
        loose: set[bytes] = set()
        for _, data in _blocks_forward(fd, after, at, self.chunk_size, self.max_line):
            loose.update(_from_tokens(data))
        loose.discard(qid.encode("ascii"))
        if len(loose) < limit:
            return hit.sender
        others: set[str] = set()
        for _, data in _blocks_forward(fd, after, at, self.chunk_size, self.max_line):
            i = data.find(_FROM)
            while i >= 0:
                start = data.rfind(b"\n", 0, i) + 1
                newline = data.find(b"\n", i)
                record = parse_line(_text(data[start:newline]))
                if isinstance(record, QueueAdd) and record.queue_id != qid:
                    others.add(record.queue_id)
                    if len(others) >= limit:
                        return None
                i = data.find(_FROM, newline)
        return hit.sender


class _Pass:
    """The streaming pass: line count, candidate lines parsed in order, blindness."""

    def __init__(self, scanner: FastScanner) -> None:
        self.needles = scanner._needles
        self.kelvin = scanner._kelvin
        self.chunk_size = scanner.chunk_size
        self.max_line = scanner.max_line
        self.detector = scanner._detector()  # its sender map stays empty: resolved later
        self.lines = 0
        self.too_long = 0  # lines longer than max_line: counted, never parsed
        self.delivery_seen = False
        self.pending: list[_Pending] = []
        # (offset of a read, newlines before it): lines between two offsets without a pass.
        self.offsets: list[int] = []
        self.newlines: list[int] = []

    def lines_before(self, fd: int, at: int) -> int:
        """Newlines in the file before offset `at` (at most one read is read again)."""
        i = bisect.bisect_right(self.offsets, at) - 1
        if i < 0:
            return 0
        start = self.offsets[i]
        return self.newlines[i] + os.pread(fd, at - start, start).count(b"\n")

    def run(self, fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        size = self.chunk_size
        at = 0  # file offset of `chunk`
        carry: list[bytes] = []  # the unfinished line before `chunk`
        carry_len = 0
        skipping = False  # inside a line longer than max_line: nothing of it is kept
        while True:
            chunk = os.read(fd, size)
            if not chunk:
                break
            self.offsets.append(at)
            self.newlines.append(self.lines)
            self.lines += chunk.count(b"\n")
            first = chunk.find(b"\n")
            if first < 0:
                if not skipping:
                    carry.append(chunk)
                    carry_len += len(chunk)
                    if carry_len > self.max_line:
                        carry.clear()
                        skipping = True
                at += len(chunk)
                continue
            body = 0
            if skipping or carry_len + first > self.max_line:
                self.too_long += 1
                carry.clear()
                skipping = False
                body = first + 1
            elif carry:
                carry.append(chunk[:first + 1])
                line = b"".join(carry)
                self._block(line, 0, len(line), at - carry_len)
                carry.clear()
                body = first + 1
            last = chunk.rfind(b"\n") + 1
            if last > body:
                self._block(chunk, body, last, at)
            if last < len(chunk):
                carry.append(chunk[last:])
            carry_len = len(chunk) - last
            at += len(chunk)
        if skipping:
            self.lines += 1
            self.too_long += 1
        elif carry:
            self.lines += 1
            line = b"".join(carry)
            self._block(line + b"\n", 0, len(line) + 1, at - carry_len)

    def _block(self, data: bytes, begin: int, end: int, base: int) -> None:
        """Complete lines data[begin:end] (ending in a newline) at file offset base."""
        lowered = data.lower()
        starts: dict[int, int] = {}
        for needle in self.needles:
            _mark_lines(lowered, needle, data, begin, end, starts)
        if self.kelvin and not data.isascii():
            _mark_lines(data, _KELVIN, data, begin, end, starts)
        for start in sorted(starts):
            self._candidate(data[start:starts[start]], base + start)
        if not self.delivery_seen:
            self._look_for_delivery(data, begin, end)

    def _candidate(self, raw: bytes, at: int) -> None:
        record = parse_line(_text(raw))
        if isinstance(record, Delivery):
            self.delivery_seen = True
            for f in self.detector.see_delivery(record):
                self.pending.append(_Pending(f, at))

    def _look_for_delivery(self, data: bytes, begin: int, end: int) -> None:
        i = data.find(_TO, begin, end)
        while i >= 0:
            start = max(data.rfind(b"\n", begin, i) + 1, begin)
            newline = data.find(b"\n", i, end)
            if isinstance(parse_line(_text(data[start:newline])), Delivery):
                self.delivery_seen = True
                return
            i = data.find(_TO, newline + 1, end)


def _mark_lines(haystack: bytes, needle: bytes, data: bytes, begin: int, end: int,
                starts: dict[int, int]) -> None:
    """Record {line start: its newline} in `starts` for each line of data[begin:end] in
    which `haystack` (data or its lowered copy, same offsets) holds `needle`."""
    i = haystack.find(needle, begin, end)
    while i >= 0:
        start = max(data.rfind(b"\n", begin, i) + 1, begin)
        newline = data.find(b"\n", i, end)
        starts[start] = newline
        i = haystack.find(needle, newline + 1, end)


def _queue_adds(fd: int, qids: set[str], start: int, end: int, size: int,
                max_line: int = MAX_LINE_BYTES) -> dict[str, list[_Hit]]:
    """The queue-adds of `qids` in [start, end) (both line starts), in file order."""
    wanted = {q.encode("ascii") for q in qids}
    hits: dict[str, list[_Hit]] = {}
    for base, data in _blocks_forward(fd, start, end, size, max_line):
        for token in sorted(wanted.intersection(_from_tokens(data))):
            qid = token.decode("ascii")
            needle = token + _FROM
            i = data.find(needle)
            while i >= 0:
                line_start = data.rfind(b"\n", 0, i) + 1
                newline = data.find(b"\n", i)
                record = parse_line(_text(data[line_start:newline]))
                if isinstance(record, QueueAdd) and record.queue_id == qid:
                    hits.setdefault(qid, []).append(
                        _Hit(base + line_start, base + newline, record.sender))
                i = data.find(needle, newline)
    for found in hits.values():
        found.sort(key=lambda h: h.start)  # several ids in one read: file order again
    return hits


def _line_start_after(fd: int, at: int) -> int:
    """The first line start at or after `at` (the end of the file if none)."""
    if at == 0:
        return 0
    while True:
        data = os.pread(fd, 1 << 16, at - 1)
        if not data:
            return at
        newline = data.find(b"\n")
        if newline >= 0:
            return at + newline
        at += len(data)


@dataclass(slots=True)
class _Child:
    pid: int
    reader: int  # our end of the pipe it writes its hits to


def _fork_reader(fd: int, qids: set[str], start: int, end: int, size: int,
                 max_line: int = MAX_LINE_BYTES) -> _Child | None:
    """A forked child that reads [start, end) and writes its hits as JSON to a pipe."""
    try:
        reader, writer = os.pipe()
    except OSError as exc:
        _read_here("no pipe", exc)
        return None
    try:
        pid = os.fork()
    except OSError as exc:
        os.close(reader)
        os.close(writer)
        _read_here("no fork", exc)
        return None
    if pid == 0:  # the child: no cleanup handlers, no flushing of the parent's buffers
        status = 1
        try:
            os.close(reader)
            hits = _queue_adds(fd, qids, start, end, size, max_line)
            payload = json.dumps({q: [[h.start, h.newline, h.sender] for h in found]
                                  for q, found in hits.items()}).encode()
            with os.fdopen(writer, "wb") as out:
                out.write(payload)
            status = 0
        finally:
            os._exit(status)
    os.close(writer)
    return _Child(pid, reader)


def _collect(child: _Child) -> dict[str, list[_Hit]] | None:
    """The child's hits, or None when it failed (its half is then read again here).

    The payload is whole JSON only when the child finished: it writes it last. Its exit
    status confirms that unless SIGCHLD is ignored here (inherited from whoever started
    us), in which case the kernel reaps it and waitpid has nothing to report.
    """
    try:
        with os.fdopen(child.reader, "rb") as pipe:
            payload = pipe.read()
    except OSError as exc:
        _abandon(child, close=False)  # fdopen closed the pipe on its way out
        _read_here("pipe failed", exc)
        return None
    try:
        _, status = os.waitpid(child.pid, 0)
    except ChildProcessError:
        status = 0  # reaped already: the payload alone tells
    if not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 0:
        _read_here("child failed", f"wait status {status}")
        return None
    try:
        data = json.loads(payload)
        return {q: [_Hit(int(a), int(b), str(c)) for a, b, c in found]
                for q, found in data.items()}
    except (ValueError, TypeError, AttributeError) as exc:
        _read_here("bad answer", exc)
        return None


def _read_here(what: str, detail: object) -> None:
    """Say why the second half is read by this process after all: same findings, slower."""
    log.warning("scan_parallel_read_failed", reason=what, detail=str(detail),
                consequence="this process reads that half itself")


def _abandon(child: _Child, *, close: bool = True) -> None:
    """Stop a child whose answer is no longer wanted; close its pipe and reap it.

    Each step may find its work done (the child exited, the pipe was closed, the kernel
    reaped it): nothing is lost then, the scan goes on or its own error propagates.
    """
    with contextlib.suppress(ProcessLookupError):
        os.kill(child.pid, signal.SIGKILL)
    if close:
        with contextlib.suppress(OSError):
            os.close(child.reader)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(child.pid, 0)


def _from_tokens(data: bytes) -> list[bytes]:
    """The word before each `: from=` in `data`: every queue id with a queue-add line there,
    and perhaps some that parse_line would not take (a superset)."""
    parts = data.split(_FROM)
    parts.pop()
    return [part[part.rfind(b" ") + 1:] for part in parts]


def _text(raw: bytes) -> str:
    """A line as the reference feeds it: decoded like its TextIOWrapper, `\\r` stripped."""
    return raw.decode("utf-8", errors="replace").rstrip("\r\n")


def _blocks_forward(fd: int, start: int, end: int, size: int,
                    max_line: int = MAX_LINE_BYTES) -> Iterator[tuple[int, bytes]]:
    """(offset, data): the lines in [start, end) in reads of about `size`; both ends start lines.

    Every `data` holds whole lines, each ending in a newline. Lines longer than `max_line`
    are left out (never held whole); with `size` <= `max_line` only a line spanning reads
    can be one.
    """
    carry = b""
    skipping = False  # inside a line longer than max_line
    at = start
    while at < end:
        chunk = os.pread(fd, min(size, end - at), at)
        if not chunk:
            break
        at += len(chunk)
        if skipping or carry:
            first = chunk.find(b"\n")
            if first < 0:
                if not skipping and len(carry) + len(chunk) <= max_line:
                    carry += chunk
                else:
                    carry, skipping = b"", True
                continue
            if skipping or len(carry) + first > max_line:
                chunk, carry, skipping = chunk[first + 1:], b"", False
        data = carry + chunk if carry else chunk
        last = data.rfind(b"\n") + 1
        if last == 0:
            carry = data
            continue
        yield at - len(data), data[:last] if last < len(data) else data
        carry = data[last:]
    if carry and len(carry) <= max_line:  # `end` was no line start (the file shrank)
        yield at - len(carry), carry + b"\n"


def _blocks_backward(fd: int, floor: int, end: int,
                     max_line: int = MAX_LINE_BYTES) -> Iterator[tuple[int, bytes, int]]:
    """(offset, data, begin): reads going back from `end` (a line start) towards `floor`.

    data[begin:] holds whole lines; the partial line before `begin` is read again as the end
    of the next read. A line reaching below `floor` is never yielded whole (only when floor is
    0 is the first line of the file). A partial line grown past `max_line` is dropped and the
    rest of that line left out of later reads, so memory stays near `max_line` plus a read; a
    whole line longer than `max_line` may still be yielded (the caller skips it).
    """
    top = end  # the next read ends here: `hi` plus the partial line above it
    hi = end
    step = _BACK_FIRST_READ
    inside = False  # `top` is inside a line longer than max_line: cut its start off reads
    while hi > floor:
        lo = max(floor, hi - step)
        data = os.pread(fd, top - lo, lo)
        step = min(step * 2, _BACK_MAX_READ)
        if inside:
            last = data.rfind(b"\n") + 1
            if last == 0:  # all of this read is that line
                top = hi = lo
                continue
            data, inside = data[:last], False
        if lo == 0:
            yield lo, data, 0
            return
        cut = data.find(b"\n") + 1
        if cut:
            yield lo, data, cut
        hi = lo
        # data[:cut] (all of it without a newline) is the end of a line that starts lower:
        # read again with the next read, unless it is already too long.
        if (cut - 1 if cut else len(data)) > max_line:
            top, inside = lo, True
        elif cut:
            top = lo + cut


class LineReader:
    """The lines of a binary stream, split at b"\\n" only (a `\\r` before it is kept), as
    `for line in TextIOWrapper(...)` gives them without their newline; except that a line
    longer than `max_line` bytes is counted in `too_long` and skipped, never held whole:
    memory stays below `max_line` plus one read whatever the input.
    """

    def __init__(self, fh: BinaryIO, max_line: int = MAX_LINE_BYTES,
                 chunk_size: int = DEFAULT_CHUNK) -> None:
        self._read = fh.read
        self.max_line = max_line
        self.chunk_size = max(1, min(chunk_size, max_line))  # a read's inner lines fit
        self.too_long = 0

    def __iter__(self) -> Iterator[bytes]:
        for run in self._runs():
            yield from run.split(b"\n")

    def text(self) -> Iterator[str]:
        """The lines decoded as the reference reads a log: UTF-8, bad bytes replaced. A
        newline is never part of a UTF-8 sequence, so each read's whole lines are decoded
        at once, as TextIOWrapper does, with the same result as line by line."""
        for run in self._runs():
            yield from run.decode("utf-8", errors="replace").split("\n")

    def _runs(self) -> Iterator[bytes]:
        """Complete lines joined by b"\\n" (no final one): one read's, or one spanning reads."""
        carry: list[bytes] = []  # the unfinished line, while it is short enough to keep
        carry_len = 0
        skipping = False  # inside a line longer than max_line
        while chunk := self._read(self.chunk_size):
            first = chunk.find(b"\n")
            if first < 0:  # the line goes on
                if not skipping:
                    carry.append(chunk)
                    carry_len += len(chunk)
                    if carry_len > self.max_line:
                        carry.clear()
                        skipping = True
                continue
            if skipping or carry_len + first > self.max_line:
                self.too_long += 1
            elif carry:
                carry.append(chunk[:first])
                yield b"".join(carry)
            else:
                yield chunk[:first]
            carry.clear()
            skipping = False
            last = chunk.rfind(b"\n")
            if last > first:  # shorter than a read, so never too long
                yield chunk[first + 1:last]
            rest = chunk[last + 1:]
            if rest:
                carry.append(rest)
            carry_len = len(rest)
        if skipping:
            self.too_long += 1
        elif carry:
            yield b"".join(carry)
