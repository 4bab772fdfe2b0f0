"""`scan --queue` and `scan --queue-id`: output shapes, exit codes, CloudWatch log streams."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from aiobotocore.session import get_session

from daemon.logwatch import scan_command
from daemon.logwatch.config import CloudWatchSource, LeakWatchConfig
from daemon.logwatch.parser import timestamp_to_epoch
from tests.logwatch.aws_fakes import Faults, fault_proxy
from tests.logwatch.harness import run_scan, watching
from tests.waiting import until

FIXTURES = Path(__file__).parent / "fixtures"
REAL = FIXTURES / "sendmail_real.log"
MIXED = FIXTURES / "mixed.log"
GROUP = "/ecs/cabal-smtp-out"
TASK_A, TASK_B = "smtp-out/smtp-out/task-a", "smtp-out/smtp-out/task-b"


def test_queue_lists_every_message_still_deferred_as_json() -> None:
    """--queue --json: one object per deferred message, oldest first; leaks are not printed."""
    last_line = timestamp_to_epoch("2026-11-23T19:31:53.567357+00:00")
    assert last_line is not None
    code, out, err = run_scan(["--file", str(REAL), "--queue", "--json"],
                              clock=lambda: last_line + 60)
    messages = [json.loads(line) for line in out.splitlines()]
    assert code == 1
    assert [m["queue_id"] for m in messages] == ["6ANJUQna010773", "6ANJVrcF011285"]
    assert messages[0] == {
        "type": "deferred", "queue_id": "6ANJUQna010773", "sender": "qp-test@sub.example.com",
        "recipients": [{"address": "nobody-1@sinkhole.test", "result": "deferred",
                        "stat": "Deferred: 421 4.3.2 Service temporarily unavailable",
                        "attempts": 1, "last_seen": "2026-11-23T19:30:26.073041+00:00"}],
        "attempts": 1, "first_seen": "2026-11-23T19:30:26.061129+00:00",
        "last_seen": "2026-11-23T19:30:26.073041+00:00", "hosts": ["vm"], "log_streams": [],
        "tasks": ["vm"], "first_task": "vm", "last_task": "vm", "silent": False,
        "since_last_line": 147.494}
    assert messages[1]["sender"] is None  # no from= line for it
    summary = json.loads(err.splitlines()[0])
    assert summary["deferred_messages"] == 2 and summary["leaks"] == 7
    assert summary["deliveries"] == {"sent": 3, "deferred": 2, "queued": 1, "bounced": 1,
                                     "other": 0}


def test_queue_text_names_every_recipient_with_its_last_stat() -> None:
    """Text mode: a DEFERRED line per message and one indented line per recipient."""
    code, out, err = run_scan(["--file", str(MIXED), "--queue"], clock=lambda: 0)
    assert code == 1
    lines = out.splitlines()
    assert lines[0].startswith("DEFERRED queue_id=6ANJUwxy012000 sender=App@Example.COM "
                               "first_seen=2026-11-23T19:30:50.000001+00:00 ")
    assert "attempts=2 hosts=ip-10-0-1-5" in lines[0]
    assert ("  to=Nobody-14@SinkHole.TEST result=deferred attempts=2 "
            "stat=Deferred: Connection refused by mx.example.org.") in lines
    assert '  to="a,b"@sinkhole.test result=sent attempts=1 stat=Sent (ok)' in lines
    assert ("queue_summary deferred_messages=1 silent_messages=0 handoffs=0 "
            "deliveries=sent:4,deferred:1,queued:3,") in err


def test_queue_exits_zero_when_nothing_is_deferred(tmp_path: Path) -> None:
    """Deferred, then sent on the next queue run: nothing is listed and the exit is 0."""
    log = tmp_path / "maillog"
    log.write_text(
        "2026-11-23T19:30:26Z h sendmail[1]: 6ANJUQna010773: to=<a@example.org>, "
        "delay=00:00:00, dsn=4.0.0, stat=Deferred: 421 later\n"
        "2026-11-23T20:00:26Z h sendmail[2]: 6ANJUQna010773: to=<a@example.org>, "
        "delay=00:30:00, dsn=2.0.0, stat=Sent (ok)\n")
    assert run_scan(["--file", str(log), "--queue", "--json"])[:2] == (0, "")


def test_queue_ages_out_relative_to_the_end_of_the_input(tmp_path: Path) -> None:
    """A message last seen more than queue_retention before the input's last line is gone."""
    log = tmp_path / "maillog"
    log.write_text(
        "2026-11-01T00:00:00Z h sendmail[1]: 6ANJUQna010773: to=<a@example.org>, "
        "delay=00:00:00, dsn=4.0.0, stat=Deferred: 421 later\n"
        "2026-11-10T00:00:00Z h sendmail[2]: 6ANJVrcF011285: to=<b@example.org>, "
        "delay=00:00:00, dsn=4.0.0, stat=Deferred: 421 later\n")
    code, out, _ = run_scan(["--file", str(log), "--queue", "--json"])
    assert code == 1
    assert [json.loads(x)["queue_id"] for x in out.splitlines()] == ["6ANJVrcF011285"]
    longer = LeakWatchConfig(queue_retention=30 * 86400)
    assert len(run_scan(["--file", str(log), "--queue", "--json"], longer)[1].splitlines()) == 2


def test_queue_id_prints_the_whole_history_in_order() -> None:
    """--queue-id: every line of that id (any program), as written; the summary has its state."""
    code, out, err = run_scan(["--file", str(MIXED), "--queue-id", "6ANJUwxy012000", "--json"])
    entries = [json.loads(line) for line in out.splitlines()]
    assert code == 1  # Nobody-14 is still deferred
    assert [e["timestamp"] for e in entries] == [
        "2026-11-23T19:30:50.000001+00:00", "2026-11-23T19:30:51.000001+00:00",
        "2026-11-23T19:30:51.000002+00:00", "2026-11-23T19:40:51.000001+00:00"]
    assert all(set(e) == {"type", "timestamp", "host", "line"} for e in entries)
    assert {e["host"] for e in entries} == {"ip-10-0-1-5"}
    assert entries[-1]["line"].endswith("stat=Deferred: Connection refused by mx.example.org.")
    summary = json.loads(err.splitlines()[0])
    assert (summary["matched"], summary["deferred"]) == (4, True)
    assert summary["message"]["sender"] == "App@Example.COM"


def test_queue_id_includes_other_programs_but_not_lines_that_merely_name_it() -> None:
    """opendkim's line for the id belongs to it; the DSN parent line does not belong to the DSN."""
    code, out, _ = run_scan(["--file", str(MIXED), "--queue-id", "6ANJUQna010773"])
    assert code == 0  # found, and nothing deferred
    assert out.splitlines() == [
        "2026-11-23T19:29:00.000001+00:00 ip-10-0-1-5 opendkim[77]: 6ANJUQna010773: "
        "DKIM-Signature field added (s=mail, d=example.com)"]
    code, out, err = run_scan(["--file", str(REAL), "--queue-id", "6ANJUeoc010926"])
    assert (code, out) == (3, "")  # only named inside 6ANJUeoc010924's DSN line
    assert err.endswith(f"scan: no line for queue id 6ANJUeoc010926 in {REAL}\n")


def test_queue_id_of_a_delivered_message_exits_zero() -> None:
    """A message whose recipients were all sent exits 0; the text summary lists them."""
    code, out, err = run_scan(["--file", str(REAL), "--queue-id", "6ANJUTfa010820"])
    assert code == 0
    assert len(out.splitlines()) == 1
    assert "deferred=false" in err
    assert "  to=nobody-3@sinkhole.test result=sent attempts=1" in err


@pytest.mark.parametrize("argv", [
    ["--queue-id", "6ANJ UQna"],
    ["--queue-id", "x"],
    ["--queue", "--since", "1h"],
])
def test_queue_bad_arguments_exit_two(argv: list[str]) -> None:
    """A malformed queue id or --since without --cloudwatch is bad input."""
    code, out, err = run_scan(["--file", str(REAL), *argv])
    assert (code, out) == (2, "")
    assert err.startswith("scan: ")


def test_queue_and_queue_id_are_exclusive() -> None:
    """--queue and --queue-id cannot be combined."""
    parser = argparse.ArgumentParser()
    scan_command.add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--queue", "--queue-id", "6ANJUQna010773"])


def test_queue_on_a_file_that_is_no_mail_log_is_bad_input(tmp_path: Path) -> None:
    """--queue over lines of which none is an MTA line: exit 2, not "nothing deferred"."""
    log = tmp_path / "access.log"
    log.write_text("GET / HTTP/1.1 200\n" * 3)
    code, out, err = run_scan(["--file", str(log), "--queue"])
    assert (code, out) == (2, "")
    assert "is this the mail log?" in err


def test_queue_reads_standard_input() -> None:
    """Without --file, `selfcheckd scan --queue` reads standard input."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SELFCHECKD")}
    proc = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "scan", "--queue", "--json"],
        input=REAL.read_text(), capture_output=True, text=True, timeout=60, check=False,
        env=env)
    assert proc.returncode == 1, proc.stderr
    assert [json.loads(x)["queue_id"] for x in proc.stdout.splitlines()] == [
        "6ANJUQna010773", "6ANJVrcF011285"]


# -- CloudWatch: log streams and the queue-id query ---------------------------------------------


def _ts(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms / 1000)) + f".{ms % 1000:03d}+00:00"


async def put(url: str, stream: str, *events: tuple[int, str]) -> None:
    async with get_session().create_client(
        "logs", region_name="us-east-1", endpoint_url=url
    ) as client:
        if not (await client.describe_log_groups(logGroupNamePrefix=GROUP))["logGroups"]:
            await client.create_log_group(logGroupName=GROUP)
        streams = await client.describe_log_streams(logGroupName=GROUP,
                                                    logStreamNamePrefix=stream)
        if not streams["logStreams"]:
            await client.create_log_stream(logGroupName=GROUP, logStreamName=stream)
        await client.put_log_events(logGroupName=GROUP, logStreamName=stream,
                                    logEvents=[{"timestamp": ms, "message": m}
                                               for ms, m in events])


def cloudwatch(url: str) -> CloudWatchSource:
    return CloudWatchSource(log_groups=[GROUP], endpoint_url=url, region="us-east-1",
                            poll_interval=0.05, lookback=3600, request_timeout=5)


async def handed_over(url: str, t: int) -> None:
    """The runbook's message: deferred by task A, retried by its replacement B, then sent."""
    qid = "6ANJUQna010773"
    await put(url, TASK_A,
              (t, f"{_ts(t)} ip-10-0-1-5 sendmail[10773]: {qid}: from=<qp-test-2026-05@sub"
                  ".example.com>, size=237, class=0, nrcpts=1, msgid=<m@x>, relay=localhost"),
              (t + 10, f"{_ts(t + 10)} ip-10-0-1-5 sendmail[10775]: {qid}: "
                       "to=<nobody-1@sinkhole.test>, delay=00:00:00, mailer=smtp, dsn=4.0.0, "
                       "stat=Deferred: 421 4.3.2 Service temporarily unavailable"),
              (t + 20, f"{_ts(t + 20)} ip-10-0-1-5 sendmail[10776]: 6ANJUTfa010820: "
                       "to=<other@example.org>, delay=00:00:00, mailer=smtp, dsn=2.0.0, "
                       "stat=Sent (ok)"))
    await put(url, TASK_B,
              (t + 30_000, f"{_ts(t + 30_000)} ip-10-0-2-7 sendmail[20001]: {qid}: "
                           "to=<nobody-1@sinkhole.test>, delay=00:00:30, mailer=smtp, "
                           "dsn=4.0.0, stat=Deferred: 421 4.3.2 Service temporarily "
                           "unavailable"))


async def test_watcher_records_the_log_streams_that_logged_a_message(moto_url: str) -> None:
    """From CloudWatch, each message remembers both its hosts and its tasks' log streams."""
    await handed_over(moto_url, int(time.time() * 1000) - 120_000)
    async with watching(LeakWatchConfig(cloudwatch=cloudwatch(moto_url))) as w:
        await until(lambda: w.value("mta_deliveries_total", result="deferred") == 2, timeout=30)
        [msg] = w.watch.queue.deferred_messages()
    assert msg.queue_id == "6ANJUQna010773"
    assert msg.hosts == ["ip-10-0-1-5", "ip-10-0-2-7"]
    assert msg.log_streams == [TASK_A, TASK_B]
    assert msg.recipients["nobody-1@sinkhole.test"].attempts == 2


def test_scan_queue_id_over_cloudwatch_filters_on_the_id(moto_url: str) -> None:
    """--queue-id --cloudwatch asks for the id server-side and prints each line's log stream."""
    asyncio.run(handed_over(moto_url, int(time.time() * 1000) - 120_000))

    async def scan(argv: list[str]) -> tuple[int, str, Faults]:
        faults = Faults()
        async with fault_proxy(moto_url, faults) as proxy:
            out, err = io.StringIO(), io.StringIO()
            parser = argparse.ArgumentParser()
            scan_command.add_arguments(parser)
            code = await asyncio.to_thread(
                scan_command.run, parser.parse_args(argv),
                LeakWatchConfig(cloudwatch=cloudwatch(proxy)), out, err)
        return code, out.getvalue(), faults

    code, out, faults = asyncio.run(scan(
        ["--cloudwatch", "--since", "1h", "--queue-id", "6ANJUQna010773", "--json"]))
    entries: list[dict[str, Any]] = [json.loads(x) for x in out.splitlines()]
    assert code == 1
    assert faults.patterns == ['"6ANJUQna010773"']
    assert [(e["host"], e["log_stream"]) for e in entries] == [
        ("ip-10-0-1-5", TASK_A), ("ip-10-0-1-5", TASK_A), ("ip-10-0-2-7", TASK_B)]
    assert "from=<qp-test-2026-05@sub.example.com>" in entries[0]["line"]

    code, out, faults = asyncio.run(scan(["--cloudwatch", "--since", "1h", "--queue"]))
    assert code == 1
    assert faults.patterns == [""]  # every line: queue health needs all of them
    assert f"hosts=ip-10-0-1-5,ip-10-0-2-7 log_streams={TASK_A},{TASK_B} " \
        f"tasks={TASK_A},{TASK_B} silent=false " in out.splitlines()[0]


async def test_cloudwatch_restart_counts_only_new_events(moto_url: str, tmp_path: Path) -> None:
    """Restarted from its state file, the watcher re-queries the overlap window but counts only
    events it had not read, and still knows the message deferred before the restart."""
    t = int(time.time() * 1000) - 120_000
    await handed_over(moto_url, t)
    config = LeakWatchConfig(cloudwatch=cloudwatch(moto_url), state_file=tmp_path / "s.json")
    async with watching(config) as w:
        await until(lambda: w.value("mta_deliveries_total", result="deferred") == 2, timeout=30)
    await put(moto_url, TASK_B, (t + 60_000, f"{_ts(t + 60_000)} ip-10-0-2-7 sendmail[20002]: "
                                             "6ANJUQna010773: to=<nobody-1@sinkhole.test>, "
                                             "delay=00:01:00, mailer=smtp, dsn=2.0.0, "
                                             "stat=Sent (2.0.0 accepted)"))
    async with watching(config) as w:
        await until(lambda: w.value("mta_deliveries_total", result="sent") == 1, timeout=30)
        await asyncio.sleep(0.3)  # more polls of the same window: nothing counted twice
        assert w.value("mta_deliveries_total", result="sent") == 1
        assert w.value("mta_deliveries_total", result="deferred") == 0
        assert w.value("mta_deferred_messages") == 0
        msg = w.watch.queue.get("6ANJUQna010773")
        assert msg is not None and msg.recipients["nobody-1@sinkhole.test"].attempts == 3
        assert msg.sender == "qp-test-2026-05@sub.example.com"
