"""`selfcheckd scan` one-shot contract: output, summary, exit status."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from daemon.logwatch import scan_command
from daemon.logwatch.config import LeakWatchConfig
from daemon.logwatch.scan_command import parse_duration
from tests.logwatch.harness import run_scan

FIXTURES = Path(__file__).parent / "fixtures"


def test_json_leaks_for_the_real_lines() -> None:
    """Every sinkhole recipient of the real lines is one JSON leak with sender and timestamp."""
    code, out, err = run_scan(["--file", str(FIXTURES / "sendmail_real.log"), "--json"])
    leaks = [json.loads(line) for line in out.splitlines()]
    assert code == 1
    assert [x["recipient"] for x in leaks] == [
        "nobody-1@sinkhole.test", "nobody-2@sinkhole.test", "nobody-3@sinkhole.test",
        "nobody-4@sinkhole.test", "nobody-9@sinkhole.test", "nobody-6@sinkhole.test",
        "nobody-8@sinkhole.test"]
    first = leaks[0]
    assert first == {
        "type": "leak", "queue_id": "6ANJUQna010773", "recipient": "nobody-1@sinkhole.test",
        "sender": "qp-test@sub.example.com",
        "stat": "Deferred: 421 4.3.2 Service temporarily unavailable",
        "timestamp": "2026-11-23T19:30:26.073041+00:00"}
    assert leaks[1]["sender"] is None  # no from= line for 6ANJUTfa010820
    summary = json.loads(err.splitlines()[0])
    assert summary["type"] == "summary"
    assert summary["leaks"] == 7
    assert (summary["lines"], summary["kinds"], summary["blind"]) == (8, None, False)


def test_counts_gives_the_per_kind_counts_and_the_same_leaks() -> None:
    """--counts parses every line for the summary's kinds; the leaks printed are the same."""
    fast = run_scan(["--file", str(FIXTURES / "sendmail_real.log"), "--json"])
    code, out, err = run_scan(["--file", str(FIXTURES / "sendmail_real.log"), "--json",
                            "--counts"])
    assert (code, out) == fast[:2]
    summary = json.loads(err.splitlines()[0])
    assert summary["kinds"] == {"from": 2, "to": 5, "other": 1, "unparsed": 0}
    assert summary["mta_lines"] == 8


def test_allowlist_makes_test_traffic_silent() -> None:
    """With the runbook sender allowlisted, its recipients are counted, not printed."""
    config = LeakWatchConfig(allowed_senders=["qp-test*@*"])
    code, out, err = run_scan(["--file", str(FIXTURES / "sendmail_real.log"), "--json"], config)
    recipients = [json.loads(line)["recipient"] for line in out.splitlines()]
    assert "nobody-1@sinkhole.test" not in recipients
    assert "nobody-6@sinkhole.test" not in recipients
    assert json.loads(err.splitlines()[0])["test_recipients"] == 2
    assert code == 1


def test_mixed_log_dedupes_retries_and_ignores_other_programs() -> None:
    """Retries report once; lookalike domains and other programs produce nothing."""
    code, out, _ = run_scan(["--file", str(FIXTURES / "mixed.log"), "--json"])
    leaks = [json.loads(line) for line in out.splitlines()]
    assert [(x["queue_id"], x["recipient"]) for x in leaks] == [
        ("6ANJUwxy012000", '"a,b"@sinkhole.test'),
        ("6ANJUwxy012000", "Nobody-14@SinkHole.TEST"),
        ("6ANJUwxy012000", "nobody-15@deep.sinkhole.test."),
        ("6ANJVbbb012401", "nobody-17@sinkhole.test"),
    ]
    assert leaks[0]["sender"] == "App@Example.COM"
    assert code == 1


def test_postfix_log_text_output() -> None:
    """Text mode prints one LEAK line per leak and a key=value summary on stderr."""
    code, out, err = run_scan(["--file", str(FIXTURES / "postfix.log")])
    assert code == 1
    assert out.splitlines() == [
        "LEAK Nov 23 19:40:02 queue_id=4Y8KqT1Zx3z9sWP recipient=Nobody-20@SinkHole.TEST. "
        "sender=app@example.com stat=deferred (connect to sinkhole.test[192.0.2.99]:25: "
        "Connection timed out)",
        "LEAK Nov 23 19:41:10 queue_id=3F2A1B2C3D recipient=x@relay.sinkhole.test "
        "sender=unknown stat=bounced (Host or domain name not found)",
    ]
    assert err.startswith("scan_summary source=")
    assert "leaks=2" in err


def test_clean_log_exits_zero(tmp_path: Path) -> None:
    """No sinkhole recipient: exit 0, nothing on stdout."""
    log = tmp_path / "maillog"
    log.write_text("2026-11-23T19:30:26Z h sendmail[1]: 6ANJUQna010773: to=<a@example.org>, "
                   "delay=00:00:00, stat=Sent\n")
    assert run_scan(["--file", str(log), "--json"])[:2] == (0, "")


@pytest.mark.parametrize("mode", [[], ["--counts"], ["--queue"]],
                         ids=["fast", "counts", "queue"])
def test_a_blind_log_exits_3_and_says_why(tmp_path: Path, mode: list[str]) -> None:
    """The real sendmail lines without their to= lines (LogLevel below 8): no leak could be
    seen, so exit 3, not the clean 0 a cron job would take for "no leak"; the summary says
    blind and how to fix it."""
    lines = (FIXTURES / "sendmail_real.log").read_text().splitlines(keepends=True)
    log = tmp_path / "maillog"
    log.write_text("".join(line for line in lines if ": to=" not in line))
    code, out, err = run_scan(["--file", str(log), "--json", *mode])
    assert (code, out) == (3, "")
    assert json.loads(err.splitlines()[0])["blind"] is True
    assert "LogLevel 9" in err


def test_a_log_with_deliveries_but_no_leak_stays_clean(tmp_path: Path) -> None:
    """Delivery lines and no sinkhole recipient: not blind, exit 0."""
    log = tmp_path / "maillog"
    log.write_text("2026-11-23T19:30:26Z h sendmail[1]: 6ANJUQna010773: to=<a@example.org>, "
                   "delay=00:00:00, mailer=smtp, stat=Sent\n")
    code, _out, err = run_scan(["--file", str(log)])
    assert code == 0 and "blind=false" in err


@pytest.mark.parametrize("text", [
    "GET /index.html HTTP/1.1 200\n" * 5,  # not syslog at all
    "2026-11-23T19:30:26Z h nginx[1]: upstream timed out\n" * 5,  # syslog, but no MTA
])
def test_a_file_that_is_no_mail_log_is_bad_input(tmp_path: Path, text: str) -> None:
    """Lines of which none is a sendmail/Postfix line: exit 2, one line with the count."""
    log = tmp_path / "access.log"
    log.write_text(text)
    code, out, err = run_scan(["--file", str(log), "--json"])
    assert (code, out) == (2, "")
    assert err == (f"scan: {log}: none of the 5 lines read is a sendmail or Postfix log "
                   "line; is this the mail log?\n")


@pytest.mark.parametrize("queue", [False, True])
def test_a_compressed_log_is_named_as_such(tmp_path: Path, queue: bool) -> None:
    """A rotated maillog.1.gz given as is: exit 2, and the line says how to read it."""
    log = tmp_path / "maillog.1.gz"
    log.write_bytes(gzip.compress(b"2026-11-23T19:30:26Z h sendmail[1]: x: from=<a@b>\n" * 50))
    code, out, err = run_scan(["--file", str(log), *(["--queue"] if queue else [])])
    assert (code, out) == (2, "")
    assert err.startswith(f"scan: {log}: ")
    assert err.endswith(f"gzip-compressed: pipe it in with zcat {log} | selfcheckd scan ...\n")


def test_an_empty_file_is_a_blind_scan_not_an_error(tmp_path: Path) -> None:
    """Nothing to read (a fresh log after rotation: no mail, no leak) stays exit 0, not the
    blind 3, with the warning that nothing was judged."""
    log = tmp_path / "maillog"
    log.write_text("")
    code, _out, err = run_scan(["--file", str(log)])
    assert code == 0 and "blind=true" in err


def test_missing_file_is_bad_input(tmp_path: Path) -> None:
    """An unreadable file exits 2 with one line naming it."""
    code, out, err = run_scan(["--file", str(tmp_path / "nope.log")])
    assert (code, out) == (2, "")
    assert err.count("\n") == 1
    assert "nope.log" in err


@pytest.mark.parametrize("argv", [["--cloudwatch"], ["--since", "1h"],
                                  ["--cloudwatch", "--since", "soon"]])
def test_bad_arguments_exit_two(argv: list[str]) -> None:
    """--cloudwatch without --since, --since without --cloudwatch, bad durations: exit 2."""
    code, out, err = run_scan(argv)
    assert (code, out) == (2, "")
    assert err.startswith("scan: ")


def test_undecodable_bytes_do_not_stop_the_scan(tmp_path: Path) -> None:
    """Invalid UTF-8 is replaced, and the lines after it are still scanned."""
    log = tmp_path / "maillog"
    log.write_bytes(b"\xff\xfe garbage\n2026-11-23T19:30:26Z h sendmail[1]: 6ANJUQna010773: "
                    b"to=<a@sinkhole.test>, stat=Sent\n")
    code, out, _ = run_scan(["--file", str(log), "--json"])
    assert code == 1
    assert json.loads(out)["recipient"] == "a@sinkhole.test"


def test_durations() -> None:
    """Durations accept s/m/h/d/w suffixes and plain seconds."""
    assert parse_duration("90") == 90
    assert parse_duration("15m") == 900
    assert parse_duration("2h") == 7200
    assert parse_duration("1d") == 86400
    with pytest.raises(ValueError, match="--since"):
        parse_duration("0")


def test_stdin_is_the_default_source() -> None:
    """Without --file or --cloudwatch the scan reads standard input (run as a subprocess)."""
    import subprocess
    import sys

    code = ("import argparse, sys\n"
            "from daemon.logwatch import scan_command\n"
            "from daemon.logwatch.config import LeakWatchConfig\n"
            "p = argparse.ArgumentParser(); scan_command.add_arguments(p)\n"
            "sys.exit(scan_command.run(p.parse_args(['--json']), LeakWatchConfig()))\n")
    proc = subprocess.run([sys.executable, "-c", code], input=(FIXTURES / "postfix.log")
                          .read_bytes(), capture_output=True, timeout=60, check=False)
    assert proc.returncode == 1
    assert [json.loads(x)["queue_id"] for x in proc.stdout.splitlines()] == [
        "4Y8KqT1Zx3z9sWP", "3F2A1B2C3D"]
    assert json.loads(proc.stderr.splitlines()[0])["source"] == "stdin"


@pytest.mark.parametrize("counts", [[], ["--counts"]], ids=["fast", "reference"])
def test_a_sender_further_back_than_the_watchers_memory_is_still_found(
    tmp_path: Path, counts: list[str]
) -> None:
    """The running watcher forgets a sender after `max_tracked_queue_ids` other queue ids;
    a scan reads one file to its end and reports the from= line's sender however far back
    (here 150 other messages with the bound at 100), by either path."""
    lines = ["2026-11-23T19:30:00Z vm sendmail[1]: 6ANJU0aa000001: from=<app@example.com>, "
             "size=1"]
    lines += [f"2026-11-23T19:30:01Z vm sendmail[1]: 6ANJU1bb{i:06d}: from=<x@example.com>, "
              "size=1" for i in range(150)]
    lines.append("2026-11-23T19:30:02Z vm sendmail[2]: 6ANJU0aa000001: "
                 "to=<nobody@sinkhole.test>, delay=00:00:02, stat=Deferred: 421 later")
    log = tmp_path / "maillog"
    log.write_text("\n".join(lines) + "\n")
    code, out, _ = run_scan(["--file", str(log), "--json", *counts],
                         LeakWatchConfig(max_tracked_queue_ids=100))
    assert code == 1
    assert [json.loads(x)["sender"] for x in out.splitlines()] == ["app@example.com"]


def _log_with_garbage(region: bytes) -> str:
    """Leaks before, after and across a newline-free region (the from= line before it)."""
    def line(qid: str, body: str) -> str:
        return f"2026-11-23T19:30:26Z vm sendmail[1]: {qid}: {body}\n"
    head = (line("6ANJUQaa010001", "from=<before@example.com>, size=1")
            + line("6ANJUQaa010001", "to=<nobody-1@sinkhole.test>, stat=Deferred: 421")
            + line("6ANJUQcc010003", "from=<across@example.com>, size=1"))
    tail = (line("6ANJUQcc010003", "to=<nobody-3@sinkhole.test>, stat=Deferred: 421")
            + line("6ANJUQbb010002", "from=<after@example.com>, size=1")
            + line("6ANJUQbb010002", "to=<nobody-2@sinkhole.test>, stat=Deferred: 421"))
    return head + region.decode("latin-1") + "\n" + tail


@pytest.mark.parametrize("mode", [["--file"], ["--file", "--counts"], ["--file", "--queue"],
                                  ["stdin"], ["stdin", "--queue"]])
def test_a_line_past_the_cap_is_counted_and_skipped_on_every_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: list[str],
) -> None:
    """A 100 KiB newline-free region with a 4 KiB cap (4 MiB in use): every way of reading
    the log skips it, says so in the summary, and finds every leak and sender around it."""
    log = tmp_path / "maillog"
    log.write_bytes(_log_with_garbage(b"\0\xff" * (50 << 10)).encode("latin-1"))
    argv = [a for a in mode if a != "stdin"]
    if "stdin" in mode:
        monkeypatch.setattr(scan_command, "_stdin", lambda: log.open("rb", buffering=0))
    else:
        argv.append(str(log))
        argv.insert(1, argv.pop())  # --file PATH, then the rest
    code, out, err = run_scan([*argv, "--json"], max_line=4096)
    summary = json.loads(err.splitlines()[0])
    assert code == 1
    assert (summary["too_long_lines"], summary["lines"]) == (1, 7)
    assert "warning: 1 line(s) longer than 4096 bytes skipped unread" in err
    if "--queue" in mode:
        assert summary["deferred_messages"] == 3
    else:
        assert [(x["recipient"], x["sender"]) for x in map(json.loads, out.splitlines())] == [
            ("nobody-1@sinkhole.test", "before@example.com"),
            ("nobody-3@sinkhole.test", "across@example.com"),
            ("nobody-2@sinkhole.test", "after@example.com")]
