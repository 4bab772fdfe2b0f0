"""The sendmail lab produces the real maillog shapes the leak watcher must parse."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

from daemon.logwatch import scan_command
from daemon.logwatch.config import LeakWatchConfig
from tests.logwatch.harness import watching
from tests.logwatch.test_queue import independent_reading
from tests.waiting import until

from .leak_lab import LOG_WAIT, SendmailLab, sync_maillog
from .scenarios import ALLOWED_SENDER, UNKNOWN_SENDER, play_leak_scenarios
from .support import wait_until
from .test_scan_real_maillog import selfcheckd_command

SAMPLE = Path(__file__).parent / "data" / "real-maillog-sample.log"
REFRESH_SAMPLE = "SELFCHECKD_REFRESH_MAILLOG_SAMPLE"


def test_scenarios_produce_every_line_shape(sendmail_lab: SendmailLab) -> None:
    """Defer, queue-run accept, bounce+DSN, [more] continuations, quoted and mixed-case
    recipients and bare command-line addresses all appear in the real maillog."""
    played = play_leak_scenarios(sendmail_lab)
    text = played.full_text
    qids = played.queue_ids

    assert f"from=<{ALLOWED_SENDER}>" in text
    assert f"from=<{UNKNOWN_SENDER}>" in text
    assert f"from={UNKNOWN_SENDER}," in text  # command line: bare sender

    def logged(key: str, rest: str) -> bool:
        return re.search(rf"{qids[key]}: {rest}", text) is not None

    assert logged("unknown-cmdline", r"to=nobody-6@sinkhole\.test, .*stat=queued")
    assert logged(
        "unknown-deferred",
        r"to=<nobody-1@sinkhole\.test>, .*stat=Deferred: 421 4\.3\.2 Service temporarily unavail",
    )
    assert logged("unknown-deferred", r"to=<nobody-1@sinkhole\.test>, .*stat=Sent")
    assert logged("unknown-bounced", r"to=<nobody-9@sinkhole\.test>, .*stat=User unknown")
    assert logged("unknown-bounced", r"\w+: DSN: User unknown")
    many = [line for line in text.splitlines() if f"{qids['unknown-many']}: to=" in line]
    assert len(many) >= 2
    assert all(", [more], " in line for line in many[:-1])
    assert "<Nobody-14@SinkHole.TEST>" in text
    assert '<"a,b"@sinkhole.test>' in text
    # Every scenario ends delivered: the queue empties (sendmail unlinks after logging).
    wait_until(lambda: True if not sendmail_lab.sendmail.queue_ids() else None,
               timeout=LOG_WAIT, what="the lab queue to drain")

    if os.environ.get(REFRESH_SAMPLE) == "1":
        SAMPLE.write_text(text)


def test_sinkhole_modes_reach_sendmail(sendmail_lab: SendmailLab) -> None:
    """A deferred message stays queued until the sinkhole accepts and a queue run retries it."""
    sendmail_lab.set_mode("defer")
    qid = sendmail_lab.send(ALLOWED_SENDER, ["nobody-20@sinkhole.test"])
    assert qid in sendmail_lab.sendmail.queue_ids()
    sendmail_lab.set_mode("accept")
    sendmail_lab.queue_run()
    sendmail_lab.wait_for_log(rf"{qid}: to=<nobody-20@sinkhole\.test>, .*stat=Sent", what="Sent")
    # sendmail logs Sent, then removes the queue file: wait for that, bounded.
    wait_until(lambda: True if not sendmail_lab.sendmail.queue_ids() else None,
               timeout=LOG_WAIT, what=f"{qid} to leave the queue")
    assert any("nobody-20@sinkhole.test" in r.recipients for r in sendmail_lab.sinkhole.received())


def test_committed_sample_is_real_output() -> None:
    """The committed sample maillog is sendmail's own output (regenerate with
    SELFCHECKD_REFRESH_MAILLOG_SAMPLE=1)."""
    text = SAMPLE.read_text()
    assert "sendmail[" in text
    assert ", [more], " in text


# -- queue health: a real deferral, a real retry ------------------------------------------------


def _watch_config(lab: SendmailLab, state: Path | None = None) -> dict[str, Any]:
    """The leak watcher following the lab's maillog from its current end."""
    config: dict[str, Any] = {"source": "file",
                              "file": {"path": str(lab.maillog.path), "poll_interval": 0.05}}
    if state is not None:
        config["state_file"] = str(state)
    return config


def _scan_queue(lab: SendmailLab, tmp_path: Path, *args: str) -> tuple[int, list[dict[str, Any]]]:
    """`selfcheckd scan --file <this test's maillog> --json ARGS` as a user runs it."""
    maillog = tmp_path / "maillog-copy"
    maillog.write_text(lab.maillog_text())
    proc = subprocess.run(
        [*selfcheckd_command(), "scan", "--file", str(maillog), "--json", *args],
        capture_output=True, text=True, timeout=60, check=False,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})  # no SELFCHECKD_* config
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode, [json.loads(x) for x in proc.stdout.splitlines() if x.strip()]


async def test_queue_id_moves_from_deferred_to_sent(
    sendmail_lab: SendmailLab, tmp_path: Path
) -> None:
    """Sinkhole in defer then accept mode: the watcher's gauges and `scan --queue-id` show the
    same queue id deferred, then sent by the next queue run."""
    lab = sendmail_lab
    async with watching(_watch_config(lab)) as w:
        lab.set_mode("defer")
        qid = await asyncio.to_thread(lab.send, ALLOWED_SENDER, ["nobody-21@sinkhole.test"])
        await until(lambda: w.value("mta_deliveries_total", result="deferred") == 1, timeout=20)
        assert [m.queue_id for m in w.watch.queue.deferred_messages()] == [qid]
        assert w.value("mta_deferred_messages") == 1
        assert w.value("mta_oldest_deferred_seconds") > 0
        status, deferred = _scan_queue(lab, tmp_path, "--queue")
        assert status == 1
        assert [(m["queue_id"], m["sender"]) for m in deferred] == [(qid, ALLOWED_SENDER)]

        lab.set_mode("accept")
        await asyncio.to_thread(lab.queue_run)
        await until(lambda: w.value("mta_deliveries_total", result="sent") == 1, timeout=20)
        assert w.value("mta_deferred_messages") == 0
        assert w.value("mta_oldest_deferred_seconds") == 0
        assert w.value("mta_deliveries_total", result="deferred") == 1
        assert w.value("mta_delivery_delay_seconds_count") == 1
        message = w.watch.queue.get(qid)
        assert message is not None
        assert message.recipients["nobody-21@sinkhole.test"].attempts == 2

    status, history = _scan_queue(lab, tmp_path, "--queue-id", qid)
    assert status == 0
    stats = [re.search(r"stat=(\w+)", e["line"]) for e in history]
    assert [s.group(1) for s in stats if s] == ["Deferred", "Sent"]
    assert f"from=<{ALLOWED_SENDER}>" in history[0]["line"]
    assert all(e["host"] and e["timestamp"] for e in history)
    assert _scan_queue(lab, tmp_path, "--queue") == (0, [])


async def test_a_message_returned_after_its_queue_lifetime_is_bounced_not_deferred(
    sendmail_lab: SendmailLab, tmp_path: Path
) -> None:
    """A deferred message that sendmail returns to its sender (`DSN: Cannot send message
    for ...`, no `to=` line) stops being deferred and counts as bounced, live and in scan."""
    lab = sendmail_lab
    async with watching(_watch_config(lab)) as w:
        lab.set_mode("defer")
        qid = await asyncio.to_thread(lab.send, ALLOWED_SENDER, ["nobody-22@sinkhole.test"])
        await until(lambda: w.value("mta_deferred_messages") == 1, timeout=20)
        await asyncio.to_thread(lab.queue_return)
        await until(lambda: w.value("mta_deliveries_total", result="bounced") == 1, timeout=20)
        assert w.value("mta_deferred_messages") == 0
        assert w.value("mta_oldest_deferred_seconds") == 0
        message = w.watch.queue.get(qid)
        assert message is not None
        rcpt = message.recipients["nobody-22@sinkhole.test"]
        assert rcpt.stat.startswith("Cannot send message for")
    assert _scan_queue(lab, tmp_path, "--queue") == (0, [])
    status, history = _scan_queue(lab, tmp_path, "--queue-id", qid)
    assert status == 0
    assert "DSN: Cannot send message for" in history[-1]["line"]


async def test_a_watcher_restart_keeps_the_deferred_message_and_counts_only_new_lines(
    sendmail_lab: SendmailLab, tmp_path: Path
) -> None:
    """Stopped while sendmail holds a deferred message and restarted after the queue run
    delivered it: the new process counts only the Sent line and knows whose message it was."""
    lab = sendmail_lab
    config = _watch_config(lab, tmp_path / "state.json")
    async with watching(config) as w:
        lab.set_mode("defer")
        qid = await asyncio.to_thread(lab.send, ALLOWED_SENDER, ["nobody-22@sinkhole.test"])
        await until(lambda: w.value("mta_deferred_messages") == 1, timeout=20)

    lab.set_mode("accept")  # while the watcher is down
    await asyncio.to_thread(lab.queue_run)
    async with watching(config) as w:
        assert [m.queue_id for m in w.watch.queue.deferred_messages()] == [qid]  # restored
        await until(lambda: w.value("mta_deliveries_total", result="sent") == 1, timeout=20)
        assert w.value("mta_deliveries_total", result="deferred") == 0  # not read again
        assert w.value("mta_deferred_messages") == 0
        message = w.watch.queue.get(qid)
        assert message is not None and message.sender == ALLOWED_SENDER


def test_queue_counts_of_the_scenarios_match_an_independent_reading(
    sendmail_lab: SendmailLab, tmp_path: Path
) -> None:
    """Every lab scenario plus one message left deferred: `scan --queue`'s counts by result and
    its deferred ids agree with a plain-regex reading of the same real lines."""
    lab = sendmail_lab
    play_leak_scenarios(lab)
    lab.set_mode("defer")
    qid = lab.send(UNKNOWN_SENDER, ["nobody-23@sinkhole.test", "someone@elsewhere.example"])
    lab.set_mode("accept")
    sync_maillog(lab.maillog)
    text = lab.maillog_text()
    log = tmp_path / "maillog"
    log.write_text(text)
    parser = argparse.ArgumentParser()
    scan_command.add_arguments(parser)
    out, err = io.StringIO(), io.StringIO()
    status = scan_command.run(parser.parse_args(["--file", str(log), "--queue", "--json"]),
                              LeakWatchConfig(), out, err)
    counts, deferred = independent_reading(text)
    summary = json.loads(err.getvalue().splitlines()[0])
    assert status == 1
    assert {k: v for k, v in summary["deliveries"].items() if v} == dict(counts)
    assert {json.loads(x)["queue_id"] for x in out.getvalue().splitlines()} == deferred == {qid}
