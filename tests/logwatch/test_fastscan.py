"""The scan's fast path gives the reference's findings and summary numbers, on any input."""

from __future__ import annotations

import io
import os
import signal
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest
import structlog
import structlog.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.logwatch import fastscan
from daemon.logwatch.config import LeakWatchConfig
from daemon.logwatch.detector import Finding, LeakDetector
from daemon.logwatch.fastscan import (
    MIN_QUEUE_ADD_BYTES,
    FastScan,
    FastScanner,
    scan_file,
)
from daemon.logwatch.parser import QueueAdd, parse_line
from daemon.logwatch.pipeline import LineCounts, LineProcessor
from daemon.logwatch.scan_command import ScanReport, scan_lines

FIXTURES = Path(__file__).parent / "fixtures"
DOMAINS = ["sinkhole.test"]
ALLOWED = ["qp-test*@*"]
FarLookup = Literal["auto", "backward", "forward"]


@dataclass
class Reference:
    findings: list[Finding]
    lines: int
    counts: LineCounts


class _Collect(ScanReport):
    def __init__(self) -> None:
        super().__init__(io.StringIO(), as_json=True)
        self.found: list[Finding] = []

    def emit(self, findings: Iterable[Finding]) -> None:
        self.found.extend(findings)


def reference(data: bytes, domains: list[str] = DOMAINS, allowed: list[str] = ALLOWED,
              max_tracked: int = 100_000, max_senders: int | None = None) -> Reference:
    """What `scan --file` computes today: scan_command.scan_lines over the decoded file."""
    processor = LineProcessor(LeakDetector(domains, allowed, max_tracked, max_senders))
    report = _Collect()
    text = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", errors="replace", newline="\n")
    scan_lines(text, processor, report)
    c = processor.counts
    return Reference(report.found, c.from_ + c.to + c.other + c.unparsed, c)


def fast(data: bytes, domains: list[str] = DOMAINS, allowed: list[str] = ALLOWED,
         max_tracked: int = 100_000, chunk_size: int = 1 << 20, window: int = 4 << 20,
         far_lookup: FarLookup = "auto", exact_counts: bool = False,
         max_senders: int | None = None, parallel_from: int | None = None) -> FastScan:
    scanner = FastScanner(domains, allowed, max_tracked, chunk_size=chunk_size, window=window,
                          far_lookup=far_lookup, max_senders=max_senders)
    if parallel_from is not None:
        scanner.parallel_from = parallel_from
    with tempfile.TemporaryFile() as fh:
        fh.write(data)
        fh.flush()
        return scanner.scan(fh, exact_counts=exact_counts)


def assert_agree(data: bytes, **options: object) -> FastScan:
    """Fast path == reference: findings (all fields, in order), lines, blindness, counts."""
    ref_options = {k: v for k, v in options.items() if k in ("domains", "allowed",
                                                              "max_tracked", "max_senders")}
    ref = reference(data, **ref_options)  # type: ignore[arg-type]
    got = fast(data, **options)  # type: ignore[arg-type]
    assert list(got.findings) == ref.findings
    assert got.lines == ref.lines
    assert got.blind == (ref.counts.to == 0)
    if got.counts is not None:
        assert got.counts == ref.counts
    assert got.leaks == sum(1 for f in ref.findings if not f.expected)
    assert got.test_recipients == sum(1 for f in ref.findings if f.expected)
    return got


# -- line shapes (NOTES.md "Real sendmail 8.17 lines", the fixtures) -------------------------
QIDS = ["6ANJUQna010773", "6ANJUTfa010820", "X6ANJUQna010773", "4Y8KqT1Zx3z9sWP", "3F2A1B2C3D",
        "ABCDE"]
TIMESTAMPS = ["2026-11-23T19:30:26.061129+00:00", "2026-11-23T19:30:26Z", "Nov 23 19:40:02"]
MTA = ["sendmail[10773]", "sm-mta[12400]", "postfix/smtp[2205]", "postfix-out/qmgr[1022]",
       "sendmail"]
NOT_MTA = ["opendkim[77]", "dovecot", "nginx[1]", "sendmailx[5]"]
SENDERS = ["<qp-test@sub.example.com>", "qp-test@sub.example.com", "<App@Example.COM>", "<>",
           '<"a,b"@example.com>', "<bounce@sinkhole.test>", "<QP-TEST-7@x.example>", "",
           "<unclosed@example.com"]
DOMAIN_VARIANTS = ["sinkhole.test", "SinkHole.TEST", "deep.sinkhole.test.", "sinkhole.test..",
                   "Relay.Sinkhole.Test", "notsinkhole.test", "sinkhole.testing",
                   "sinkhole.test.example.com", "example.org", "sin\u212ahole.test",
                   "S\u0130NKHOLE.test", "sinkhole\xad.test"]
LOCALS = ["nobody-1", "Nobody-14", '"a,b"', '"x>y"', "q", ""]


@st.composite
def recipient(draw: st.DrawFn) -> str:
    addr = f"{draw(st.sampled_from(LOCALS))}@{draw(st.sampled_from(DOMAIN_VARIANTS))}"
    return draw(st.sampled_from([f"<{addr}>", addr, "<>", "[more]", " "]))


@st.composite
def mail_line(draw: st.DrawFn) -> str:
    ts = draw(st.sampled_from(TIMESTAMPS))
    host = draw(st.sampled_from(["vm", "ip-10-0-1-5"]))
    prog = draw(st.sampled_from(MTA + MTA + NOT_MTA))
    qid = draw(st.sampled_from(QIDS))
    kind = draw(st.sampled_from(["from", "to", "to", "postfix_to", "other", "dsn"]))
    head = f"{ts} {host} {prog}: "
    if kind == "from":
        return f"{head}{qid}: from={draw(st.sampled_from(SENDERS))}, size=237, class=0, nrcpts=1"
    if kind in ("to", "postfix_to"):
        rcpts = ",".join(draw(st.lists(recipient(), min_size=1, max_size=4)))
        more = draw(st.sampled_from(["", " [more],"]))
        if kind == "postfix_to":
            return (f"{head}{qid}: to={rcpts}, relay=none, delay=0.53, dsn=4.4.1, "
                    "status=deferred (connect to sinkhole.test[192.0.2.99]:25: timed out)")
        stat = draw(st.sampled_from(["Sent (ok)", "Deferred: 421 4.3.2 at SINKHOLE.test",
                                     "queued", "User unknown"]))
        return (f"{head}{qid}: to={rcpts},{more} delay=00:00:00, mailer=smtp, pri=30237, "
                f"relay=sinkhole.cabal.internal. [127.0.0.2], stat={stat}")
    if kind == "dsn":
        return f"{head}{qid}: {qid}: DSN: User unknown"
    return f"{head}STARTTLS=client, relay=mx.sinkhole.test., version=TLSv1.3, verify=OK"


@st.composite
def noise(draw: st.DrawFn) -> bytes:
    which = draw(st.sampled_from(["text", "bytes", "long", "tail", "empty"]))
    if which == "text":
        return draw(st.text(max_size=60)).encode("utf-8", errors="surrogatepass")
    if which == "bytes":
        return draw(st.binary(max_size=60))
    if which == "long":
        return b"2026-11-23T19:30:26Z vm sendmail[1]: " + b"x" * draw(
            st.integers(200, 3000)) + b" sinkhole.test"
    if which == "tail":
        return b"tail: '/var/log/maillog' has been replaced;  following new file"
    return b""


@st.composite
def log_bytes(draw: st.DrawFn) -> bytes:
    parts: list[bytes] = []
    for _ in range(draw(st.integers(0, 40))):
        noisy = draw(st.integers(0, 5)) == 0
        line = draw(noise()) if noisy else draw(mail_line()).encode("utf-8")
        parts.append(line + draw(st.sampled_from([b"\n", b"\n", b"\r\n", b"\r\r\n"])))
    data = b"".join(parts)
    if draw(st.booleans()):
        data = data.rstrip(b"\n")  # a last line without newline
    return data


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=log_bytes(), chunk_size=st.integers(1, 400), window=st.integers(0, 600),
       max_tracked=st.integers(1, 4), max_senders=st.none() | st.integers(1, 6),
       far_lookup=st.sampled_from(["auto", "backward", "forward"]))
def test_fast_path_agrees_with_the_reference(data: bytes, chunk_size: int, window: int,
                                             max_tracked: int, max_senders: int | None,
                                             far_lookup: FarLookup) -> None:
    """On arbitrary real-shaped lines plus noise, any chunk size, window and LRU bounds, the
    fast path's findings (senders, stat, timestamps, order), lines and blindness match."""
    assert_agree(data, chunk_size=chunk_size, window=window, max_tracked=max_tracked,
                 max_senders=max_senders, far_lookup=far_lookup)


@settings(max_examples=60, deadline=None)
@given(data=log_bytes(), chunk_size=st.integers(1, 400))
def test_two_domains_and_the_default_bounds_agree(data: bytes, chunk_size: int) -> None:
    """Several configured domains (one with a trailing dot and capitals) agree as well."""
    assert_agree(data, domains=["sinkhole.test", "Example.ORG."], chunk_size=chunk_size)


@settings(max_examples=60, deadline=None)
@given(data=log_bytes())
def test_exact_counts_are_the_reference_counts(data: bytes) -> None:
    """exact_counts=True returns the reference's per-kind counts for any input."""
    got = fast(data, exact_counts=True)
    ref = reference(data)
    assert got.counts == ref.counts and list(got.findings) == ref.findings and not got.fast


# -- examples ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sendmail_real.log", "mixed.log", "postfix.log"])
@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1 << 20])
def test_fixtures_agree_at_any_chunk_size(name: str, chunk_size: int) -> None:
    """The real sendmail lines, the mixed log and the Postfix log scan the same, reads of any
    size splitting lines anywhere."""
    got = assert_agree((FIXTURES / name).read_bytes(), chunk_size=chunk_size, window=50)
    assert got.fast and got.counts is None and got.findings


def test_mixed_log_variants_are_found_with_their_sender() -> None:
    """Quoted commas, mixed case, subdomain with trailing dot, bare addresses; lookalikes not."""
    got = fast((FIXTURES / "mixed.log").read_bytes(), chunk_size=16)
    assert [(f.queue_id, f.recipient, f.sender) for f in got.findings] == [
        ("6ANJUwxy012000", '"a,b"@sinkhole.test', "App@Example.COM"),
        ("6ANJUwxy012000", "Nobody-14@SinkHole.TEST", "App@Example.COM"),
        ("6ANJUwxy012000", "nobody-15@deep.sinkhole.test.", "App@Example.COM"),
        ("6ANJVbbb012401", "nobody-17@sinkhole.test", None),
    ]


def _line(qid: str, body: str, ts: str = "2026-11-23T19:30:26Z") -> str:
    return f"{ts} vm sendmail[1]: {qid}: {body}"


def _log(*lines: str) -> bytes:
    return ("\n".join(lines) + "\n").encode()


def test_sender_far_before_the_window_is_found() -> None:
    """A from= line far before its delivery (many windows back) still gives the sender."""
    filler = [_line(f"FILL{i:06d}", "to=<u@example.org>, stat=Sent") for i in range(20_000)]
    data = _log(_line("6ANJUQna010773", "from=<app@example.com>, size=1"), *filler,
                _line("6ANJUQna010773", "to=<nobody@sinkhole.test>, stat=Sent"))
    for far_lookup in ("auto", "backward", "forward"):
        got = assert_agree(data, window=1000, far_lookup=far_lookup)
        assert [f.sender for f in got.findings] == ["app@example.com"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=log_bytes(), chunk_size=st.integers(1, 400))
def test_a_forward_pass_split_across_two_processes_agrees(data: bytes, chunk_size: int) -> None:
    """The forward pass read half by a forked child (any split point, any read size) finds
    what one process finds: the reference's senders."""
    assert_agree(data, chunk_size=chunk_size, window=0, far_lookup="forward", parallel_from=0)


def test_many_deliveries_without_a_from_line_in_a_parallel_forward_pass() -> None:
    """Retries after a rotation (no from= line) next to far senders, over a forward pass
    split between two processes: every sender as the reference has it."""
    filler = [_line(f"FILL{i:06d}", f"from=<f{i}@example.org>, size=1") for i in range(3000)]
    lines = [_line(f"6ANJU{i:04d}a010773", f"from=<app{i}@example.com>, size=1")
             for i in range(0, 40, 2)]
    lines += filler
    lines += [_line(f"6ANJU{i:04d}a010773", f"to=<n{i}@sinkhole.test>, stat=Deferred")
              for i in range(40)]
    got = assert_agree(_log(*lines), window=100, far_lookup="forward", parallel_from=0)
    assert [f.sender for f in got.findings] == [
        f"app{i}@example.com" if i % 2 == 0 else None for i in range(40)]


def test_a_failing_child_leaves_its_half_to_the_parent(monkeypatch: pytest.MonkeyPatch) -> None:
    """A forked reader that dies does not lose senders: its half is read again here."""
    parent = os.getpid()
    real = fastscan._queue_adds

    def dies_in_the_child(*args: Any) -> Any:
        if os.getpid() != parent:
            raise MemoryError("the child's half")
        return real(*args)

    monkeypatch.setattr(fastscan, "_queue_adds", dies_in_the_child)
    with structlog.testing.capture_logs() as logs:
        got = assert_agree(_far_senders_log(), window=0, far_lookup="forward", parallel_from=0)
    assert [f.sender for f in got.findings] == [f"app{i}@example.com" for i in range(20)]
    assert [(e["event"], e["reason"]) for e in logs] == [
        ("scan_parallel_read_failed", "child failed")]


def _far_senders_log() -> bytes:
    lines = [_line(f"6ANJU{i:04d}a010773", f"from=<app{i}@example.com>") for i in range(20)]
    lines += [_line(f"FILL{i:06d}", "to=<u@example.org>, stat=Sent") for i in range(200)]
    lines += [_line(f"6ANJU{i:04d}a010773", "to=<n@sinkhole.test>") for i in range(20)]
    return _log(*lines)


def test_the_forked_reader_works_with_sigchld_ignored() -> None:
    """Started with SIGCHLD ignored, the kernel reaps the child itself: its answer is
    still used (waitpid has nothing to report, the whole JSON payload says it finished)."""
    previous = signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    try:
        got = assert_agree(_far_senders_log(), window=0, far_lookup="forward",
                           parallel_from=0)
    finally:
        signal.signal(signal.SIGCHLD, previous)
    assert [f.sender for f in got.findings] == [f"app{i}@example.com" for i in range(20)]


def test_an_error_in_the_parents_half_stops_and_reaps_the_child(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The parent's half failing leaves no zombie and no open pipe behind."""
    parent = os.getpid()
    real = fastscan._queue_adds

    def fails_in_the_parent(*args: Any) -> Any:
        if os.getpid() == parent:
            raise RuntimeError("the parent's half")
        return real(*args)

    children: list[Any] = []
    real_fork = fastscan._fork_reader

    def recorded(*args: Any) -> Any:
        child = real_fork(*args)
        children.append(child)
        return child

    monkeypatch.setattr(fastscan, "_queue_adds", fails_in_the_parent)
    monkeypatch.setattr(fastscan, "_fork_reader", recorded)
    fds = sorted(os.listdir("/proc/self/fd"))
    with pytest.raises(RuntimeError):
        fast(_far_senders_log(), window=0, far_lookup="forward", parallel_from=0)
    assert sorted(os.listdir("/proc/self/fd")) == fds
    (child,) = children
    with pytest.raises(ChildProcessError):
        os.waitpid(child.pid, os.WNOHANG)  # reaped already: no zombie


def test_sender_of_a_queue_id_that_only_ends_like_another() -> None:
    """`X6ANJUQna010773: from=` contains `6ANJUQna010773: from=` but is another message."""
    data = _log(_line("6ANJUQna010773", "from=<right@example.com>"),
                _line("X6ANJUQna010773", "from=<wrong@example.com>"),
                _line("6ANJUQna010773", "to=<a@sinkhole.test>, stat=Sent"))
    assert [f.sender for f in assert_agree(data).findings] == ["right@example.com"]


def test_no_from_line_gives_no_sender_and_the_null_sender_is_empty() -> None:
    """No from= line: sender None; `from=<>`: sender "" (a bounce), as the reference says."""
    data = _log(_line("AAAAAQna010773", "to=<a@sinkhole.test>, stat=Sent"),
                _line("BBBBBQna010773", "from=<>, size=1"),
                _line("BBBBBQna010773", "to=<b@sinkhole.test>, stat=Sent"))
    assert [f.sender for f in assert_agree(data, window=0).findings] == [None, ""]


def test_latest_from_line_before_the_delivery_wins() -> None:
    """A queue id added twice: each delivery gets the sender of the latest from= before it."""
    q = "6ANJUQna010773"
    data = _log(_line(q, "from=<first@example.com>"), _line(q, "to=<a@sinkhole.test>"),
                _line(q, "from=<qp-test@example.com>"), _line(q, "to=<b@sinkhole.test>"),
                _line(q, "to=<a@sinkhole.test>"))
    got = assert_agree(data, window=0, far_lookup="backward")
    assert [(f.recipient, f.sender, f.expected) for f in got.findings] == [
        ("a@sinkhole.test", "first@example.com", False),
        ("b@sinkhole.test", "qp-test@example.com", True)]


@pytest.mark.parametrize(("others", "sender"), [(1, "app@example.com"), (2, None)])
def test_bounded_sender_memory_is_honoured(others: int, sender: str | None) -> None:
    """With max_tracked=2, a sender is forgotten once two other queue ids were added after it,
    as the reference's LRU forgets it."""
    data = _log(_line("6ANJUQna010773", "from=<app@example.com>"),
                *[_line(f"OTHER{i}", "from=<x@example.com>") for i in range(others)],
                _line("OTHER0", "from=<x@example.com>"),  # a repeat adds no new id
                _line("6ANJUQna010773", "to=<a@sinkhole.test>"))
    got = assert_agree(data, max_tracked=2)
    assert [f.sender for f in got.findings] == [sender]


def test_kelvin_sign_domain_is_a_sinkhole_as_str_lower_says() -> None:
    """`sin\\u212ahole.test` lowers to sinkhole.test in Python, so the reference reports it."""
    data = _log(_line("6ANJUQna010773", "to=<a@SIN\u212aHOLE.test>, stat=Sent"))
    got = assert_agree(data)
    assert [f.recipient for f in got.findings] == ["a@SIN\u212aHOLE.test"]


def test_invalid_utf8_crlf_and_a_last_line_without_newline() -> None:
    """Undecodable bytes, CRLF endings and an unterminated last line read as the reference."""
    data = (b"\xff\xfe garbage\r\n" + _log(_line("6ANJUQna010773", "from=<\xe9@x>")).replace(
        b"\n", b"\r\n") + _line("6ANJUQna010773", "to=<\xff@sinkhole.test>").encode("latin-1"))
    got = assert_agree(data, chunk_size=5)
    assert got.lines == 3 and got.findings[0].recipient == "\ufffd@sinkhole.test"


def test_domain_split_across_reads() -> None:
    """A domain cut in two by the read boundary is still found, with every read size."""
    data = _log(_line("6ANJUQna010773", "to=<a@sinkhole.test>, stat=Sent"))
    for chunk_size in range(1, len(data) + 2):
        assert len(assert_agree(data, chunk_size=chunk_size).findings) == 1


def test_blind_log_is_scanned_by_the_reference() -> None:
    """No delivery line at all: blind, with the reference's exact per-kind counts."""
    data = _log(_line("6ANJUQna010773", "from=<a@sinkhole.test>"),
                "2026-11-23T19:30:26Z h sendmail[1]: STARTTLS=client, relay=x")
    got = assert_agree(data)
    assert got.blind and not got.fast
    assert got.counts is not None and got.counts.mta == 2


def test_empty_file_is_blind_with_no_lines() -> None:
    """An empty file: zero lines, blind, nothing found."""
    got = assert_agree(b"")
    assert (got.lines, got.blind, got.findings) == (0, True, ())


def test_non_ascii_domain_uses_the_reference() -> None:
    """A configured domain with non-ASCII letters has no byte needle: the reference scans."""
    data = _log(_line("6ANJUQna010773", "to=<a@BÜCHER.test>, stat=Sent"))
    got = assert_agree(data, domains=["bücher.test"])
    assert not got.fast and [f.recipient for f in got.findings] == ["a@BÜCHER.test"]


def test_scan_file_uses_the_config() -> None:
    """scan_file takes domains, allowlist and the LRU bound from [leakwatch]."""
    config = LeakWatchConfig(domains=["SinkHole.Test."], allowed_senders=["app@*"],
                             max_tracked_queue_ids=100)
    got = scan_file(FIXTURES / "sendmail_real.log", config, chunk_size=100)
    assert got.leaks == 7 and got.test_recipients == 0 and got.lines == 8


def test_shortest_queue_add_line() -> None:
    """MIN_QUEUE_ADD_BYTES is the length (newline included) of the shortest from= line
    parse_line takes; one character less in any field and it is none."""
    line = "Jan  1 00:00:00 h sm-mta: QQQQQ: from=x"
    assert isinstance(parse_line(line), QueueAdd)
    assert len(line) + 1 == MIN_QUEUE_ADD_BYTES
    for i in range(len(line)):
        assert not isinstance(parse_line(line[:i] + line[i + 1:]), QueueAdd)


def test_deliveries_without_leaks_stay_on_the_fast_path() -> None:
    """Delivery lines but no sinkhole recipient: not blind, no findings, the fast path."""
    data = _log(_line("6ANJUQna010773", "from=<a@example.com>"),
                _line("6ANJUQna010773", "to=<b@example.org>, stat=Sent"))
    got = assert_agree(data, chunk_size=10)
    assert (got.fast, got.blind, got.findings, got.lines) == (True, False, (), 2)


def test_a_pipe_is_scanned_by_the_reference() -> None:
    """A stream that cannot be read twice (standard input from a pipe) gets the reference."""
    data = (FIXTURES / "sendmail_real.log").read_bytes()
    read_end, write_end = os.pipe()
    os.write(write_end, data)
    os.close(write_end)
    with open(read_end, "rb", buffering=0) as fh:
        got = FastScanner(DOMAINS, ALLOWED).scan(fh)
    assert not got.fast and list(got.findings) == reference(data).findings


# -- lines longer than max_line (garbage after an unclean shutdown) ---------------------------
def capped_reference(data: bytes, max_line: int) -> tuple[Reference, int]:
    """The reference over the lines no longer than `max_line` bytes, and how many were not."""
    raw_lines = data.split(b"\n")
    last = raw_lines.pop()  # after the final newline: empty, or a last line without one
    kept: list[bytes] = []
    too_long = 0
    for raw in [*raw_lines, *([last] if last else [])]:
        if len(raw) > max_line:
            too_long += 1
        else:
            kept.append(raw + b"\n")
    return reference(b"".join(kept)), too_long


@st.composite
def log_with_garbage(draw: st.DrawFn) -> bytes:
    """Real-shaped lines with newline-free stretches (NUL or random bytes) between them."""
    parts = [draw(log_bytes())]
    for _ in range(draw(st.integers(1, 3))):
        size = draw(st.integers(1, 3000))
        fill = draw(st.sampled_from([b"\0", b"x", b"sinkhole.test: from=<a@b> "]))
        parts.append(fill * (size // len(fill) + 1))
        parts.append(draw(st.sampled_from([b"\n", b""])) + draw(log_bytes()))
    return b"\n".join(parts)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=log_with_garbage(), max_line=st.integers(80, 1500), chunk_size=st.integers(1, 400),
       window=st.integers(0, 600), far_lookup=st.sampled_from(["auto", "backward", "forward"]),
       parallel=st.booleans())
def test_lines_past_max_line_are_skipped_by_every_path_alike(
    data: bytes, max_line: int, chunk_size: int, window: int, far_lookup: FarLookup,
    parallel: bool,
) -> None:
    """A line longer than max_line is counted and skipped: the fast path (its pass, backward
    and forward sender searches, the forked reader) and the reference (LineReader) find
    exactly what the reference finds in the file without those lines."""
    ref, too_long = capped_reference(data, max_line)
    scanner = FastScanner(DOMAINS, ALLOWED, chunk_size=chunk_size, window=window,
                          far_lookup=far_lookup, max_line=max_line)
    if parallel:
        scanner.parallel_from = 0
    with tempfile.TemporaryFile() as fh:
        fh.write(data)
        fh.flush()
        for got in (scanner.scan(fh), scanner.scan(fh, exact_counts=True)):
            assert list(got.findings) == ref.findings
            assert (got.lines, got.too_long) == (ref.lines + too_long, too_long)
            assert got.blind == (ref.counts.to == 0)
            if got.counts is not None:
                assert got.counts == ref.counts


def test_line_reader_splits_like_the_text_reader_and_skips_long_lines() -> None:
    """LineReader: the lines TextIOWrapper gives (b"\\n" only, \\r kept), minus the long."""
    data = b"a\r\nbb\n" + b"x" * 10 + b"\n\nccc" + b"y" * 20
    reader = fastscan.LineReader(io.BytesIO(data), max_line=10, chunk_size=3)
    assert list(reader) == [b"a\r", b"bb", b"x" * 10, b""]
    assert reader.too_long == 1
    text = fastscan.LineReader(io.BytesIO(b"a\r\n\xff\xe2\x82\nz" + b"y" * 20 + b"\nq"),
                               max_line=10, chunk_size=4)
    assert list(text.text()) == ["a\r", "\ufffd\ufffd", "q"]
    assert text.too_long == 1


def _garbage_log(region: int) -> bytes:
    head = _log(_line("6ANJUQaa010001", "from=<before@example.com>, size=1"),
                _line("6ANJUQaa010001", "to=<nobody-1@sinkhole.test>, stat=Sent"),
                _line("6ANJUQcc010003", "from=<across@example.com>, size=1"))
    tail = _log(_line("6ANJUQcc010003", "to=<nobody-3@sinkhole.test>, stat=Sent"),
                _line("6ANJUQbb010002", "from=<after@example.com>, size=1"),
                _line("6ANJUQbb010002", "to=<nobody-2@sinkhole.test>, stat=Sent"))
    return head + b"\0" * region + b"\n" + tail


@pytest.mark.parametrize("path", ["fast, backward", "fast, forward", "reference"])
def test_memory_stays_bounded_over_a_newline_free_region(path: str) -> None:
    """A 24 MiB newline-free region with a 64 KiB cap: the scan allocates a few MiB at most
    (it held the whole region, several times over), and still finds every leak and sender."""
    import tracemalloc

    far: FarLookup = "forward" if "forward" in path else "backward"
    scanner = FastScanner(DOMAINS, ALLOWED, chunk_size=16 << 10, window=1 << 10,
                          far_lookup=far, max_line=64 << 10)
    with tempfile.TemporaryFile() as fh:
        fh.write(_garbage_log(24 << 20))
        fh.flush()
        tracemalloc.start()
        try:
            got = scanner.scan(fh, exact_counts=path == "reference")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert [(f.recipient, f.sender) for f in got.findings] == [
        ("nobody-1@sinkhole.test", "before@example.com"),
        ("nobody-3@sinkhole.test", "across@example.com"),
        ("nobody-2@sinkhole.test", "after@example.com")]
    assert got.too_long == 1
    assert peak < 10 << 20, f"{peak / 2**20:.1f} MiB"
