"""Queue health: delivery results, per-queue-id state, bounds, retention, restarts, metrics."""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from daemon.logwatch.config import LeakWatchConfig
from daemon.logwatch.detector import LeakDetector
from daemon.logwatch.parser import Delivery, parse_line, timestamp_to_epoch
from daemon.logwatch.pipeline import LineProcessor
from daemon.logwatch.queue import (
    DUPLICATE_WINDOW,
    MAX_RECIPIENTS,
    Message,
    QueueTracker,
    Result,
    classify,
    parse_delay,
)
from daemon.logwatch.watcher import LeakWatch
from daemon.metrics import Metrics
from daemon.state import parse_state
from tests.dated_logs import TimeShift
from tests.logwatch.harness import watching
from tests.waiting import until

FIXTURES = Path(__file__).parent / "fixtures"
LAB_SAMPLE = Path(__file__).parents[1] / "integration" / "data" / "real-maillog-sample.log"
CAPTURES = [FIXTURES / "sendmail_real.log", FIXTURES / "mixed.log", FIXTURES / "postfix.log",
            LAB_SAMPLE]
REAL = (FIXTURES / "sendmail_real.log").read_text()
DEFERRED_QID, DEFERRED_QID_2 = "6ANJUQna010773", "6ANJVrcF011285"
FIRST_SEEN = timestamp_to_epoch("2026-11-23T19:30:26.061129+00:00")


def to_line(ts: str, qid: str, rcpt: str, stat: str, *, dsn: str = "4.0.0",
            host: str = "vm", delay: str = "00:00:00") -> str:
    return (f"{ts} {host} sendmail[11000]: {qid}: to=<{rcpt}>, delay={delay}, "
            f"xdelay=00:00:00, mailer=smtp, pri=30237, relay=sinkhole.cabal.internal. "
            f"[127.0.0.2], dsn={dsn}, stat={stat}")


def tracker_for(lines: list[str], **kw: Any) -> tuple[QueueTracker, LineProcessor]:
    queue = QueueTracker(**kw)
    processor = LineProcessor(LeakDetector(["sinkhole.test"], []), queue=queue)
    for line in lines:
        processor.feed(line)
    return queue, processor


# -- an independent reading of the same lines ------------------------------------------------
_TO = re.compile(r"(?:sendmail|sm-mta|sm-msp-queue|postfix[\w/-]*)\[\d+\]: "
                 r"([0-9A-Za-z]+): to=(.*?), (?:\[more\], )?(?:ctladdr|delay|orig_to|relay)=")
_ADDRESS = re.compile(r'<(?:"[^"]*"|[^>])*>|[^,<>]+')
_RETURNED = re.compile(r"\]: ([0-9A-Za-z]+): (?:\w+: DSN: Cannot send message for "
                       r"|from=.*, status=expired, returned to sender)")


def independent_reading(text: str) -> tuple[Counter[str], set[str]]:
    """Results per recipient and deferred queue ids, read with plain regexes, in line order."""
    counts: Counter[str] = Counter()
    latest: dict[tuple[str, str], str] = {}
    for line in text.splitlines():
        returned = _RETURNED.search(line)
        if returned is not None:  # the whole message went back to its sender
            for key, result in latest.items():
                if key[0] == returned.group(1) and result in ("deferred", "queued"):
                    latest[key] = "bounced"
                    counts["bounced"] += 1
            continue
        m = _TO.search(line)
        if m is None:
            continue
        qid, listed = m.groups()
        rcpts = [a.strip("<> ") for a in _ADDRESS.findall(listed) if a.strip() != "[more]"]
        sendmail_stat = re.search(r", stat=(.*)$", line)
        postfix_status = re.search(r", status=(\w+)", line)
        dsn = re.search(r", dsn=(\d)\.", line)
        if sendmail_stat is not None:
            stat = sendmail_stat.group(1)
            result = ("sent" if stat.startswith("Sent") else
                      "deferred" if stat.startswith("Deferred") else
                      "queued" if stat == "queued" else
                      "bounced" if dsn is not None and dsn.group(1) == "5" else "other")
        else:
            status = postfix_status.group(1) if postfix_status else ""
            result = ("sent" if status == "sent" else "deferred" if status == "deferred" else
                      "bounced" if status in ("bounced", "expired")
                      or (dsn is not None and dsn.group(1) == "5") else "other")
        for rcpt in rcpts:
            counts[result] += 1
            latest[(qid, rcpt)] = result
    deferred = {qid for (qid, _), result in latest.items() if result == "deferred"}
    return counts, deferred


@pytest.mark.parametrize("capture", CAPTURES, ids=lambda p: p.name)
def test_counts_and_deferred_ids_match_an_independent_reading(capture: Path) -> None:
    """Real sendmail and Postfix captures: per-result counts and deferred ids agree with regexes."""
    text = capture.read_text()
    expected_counts, expected_deferred = independent_reading(text)
    queue, _ = tracker_for(text.splitlines())
    assert {r.value: n for r, n in queue.counts.items() if n} == dict(expected_counts)
    assert {m.queue_id for m in queue.deferred_messages()} == expected_deferred


@pytest.mark.parametrize(("stat", "dsn", "result"), [
    ("Sent (2.0.0 Message accepted for discard)", "2.0.0", Result.SENT),
    ("Sent", None, Result.SENT),
    ("sent (250 2.0.0 Ok: queued as 4Y8KqV0abc)", "2.0.0", Result.SENT),  # Postfix
    ("Deferred: 421 4.3.2 Service temporarily unavailable", "4.0.0", Result.DEFERRED),
    ("Deferred", "5.1.2", Result.DEFERRED),  # real: Deferred wins over a 5.x.x dsn
    ("deferred (connect to x[192.0.2.99]:25: Connection timed out)", "4.4.1", Result.DEFERRED),
    ("queued", None, Result.QUEUED),
    ("User unknown", "5.1.1", Result.BOUNCED),
    ("bounced (Host or domain name not found)", "5.4.4", Result.BOUNCED),
    ("expired, returned to sender", "4.4.7", Result.BOUNCED),
    ("Service unavailable", "5.0.0", Result.BOUNCED),
    ("Please try again later", "4.7.0", Result.OTHER),
    ("quarantined", None, Result.OTHER),
    ("", None, Result.OTHER),
])
def test_classify_sendmail_and_postfix_results(stat: str, dsn: str | None, result: Result) -> None:
    """stat=/status= and dsn= map to sent, deferred, queued, bounced or other as specified."""
    assert classify(stat, dsn) is result


@pytest.mark.parametrize(("text", "seconds"), [
    ("00:00:08", 8.0), ("00:10:01", 601.0), ("2+01:00:00", 2 * 86400 + 3600.0),
    ("0.53", 0.53), ("1", 1.0), ("", None), (None, None), ("soon", None), ("1:2", None),
])
def test_delay_formats(text: str | None, seconds: float | None) -> None:
    """sendmail's [D+]HH:MM:SS and Postfix's decimal seconds; anything else is no delay."""
    assert parse_delay(text) == seconds


def test_real_sendmail_lines_give_each_message_its_latest_state() -> None:
    """Sender from from=, recipients with result and attempts, host from the syslog header."""
    queue, _ = tracker_for(REAL.splitlines())
    assert [m.queue_id for m in queue.deferred_messages()] == [DEFERRED_QID, DEFERRED_QID_2]
    first = queue.get(DEFERRED_QID)
    assert first is not None
    assert first.sender == "qp-test@sub.example.com"
    assert first.first_seen == FIRST_SEEN  # the from= line's timestamp
    assert first.hosts == ["vm"]
    [(address, rcpt)] = first.recipients.items()
    assert (address, rcpt.result, rcpt.attempts) == ("nobody-1@sinkhole.test", Result.DEFERRED, 1)
    queued = queue.get("6ANJUivJ010931")
    assert queued is not None and queued.recipients["nobody-6@sinkhole.test"].attempts == 0
    assert queue.counts == {Result.SENT: 3, Result.DEFERRED: 2, Result.QUEUED: 1,
                            Result.BOUNCED: 1, Result.OTHER: 0}


def test_a_retry_counts_again_but_the_message_follows_its_latest_line() -> None:
    """Deferred twice then sent: three deliveries counted, two attempts later not deferred."""
    lines = [to_line(f"2026-11-23T19:{m}:00+00:00", DEFERRED_QID, "a@example.org", stat,
                     dsn=dsn, delay=delay)
             for m, stat, dsn, delay in [("30", "Deferred: 421 try later", "4.0.0", "00:00:00"),
                                         ("40", "Deferred: 421 try later", "4.0.0", "00:10:00"),
                                         ("50", "Sent (ok)", "2.0.0", "00:20:00")]]
    queue, _ = tracker_for(lines[:2])
    assert queue.deferred_count() == 1
    for line in lines[2:]:
        queue.see_delivery(_delivery(line), line)
    assert queue.counts[Result.DEFERRED] == 2 and queue.counts[Result.SENT] == 1
    assert queue.deferred_count() == 0
    msg = queue.get(DEFERRED_QID)
    assert msg is not None and msg.recipients["a@example.org"].attempts == 3
    assert queue.take_delays() == [1200.0]
    assert queue.take_delays() == []


def _delivery(line: str) -> Delivery:
    record = parse_line(line)
    assert isinstance(record, Delivery)
    return record


def test_a_late_ingested_older_line_does_not_undo_a_newer_result() -> None:
    """CloudWatch may hand over an older Deferred line after the newer Sent: still not deferred."""
    sent = to_line("2026-11-23T19:50:00+00:00", DEFERRED_QID, "a@example.org", "Sent (ok)",
                   dsn="2.0.0", host="ip-10-0-2-7")
    late = to_line("2026-11-23T19:30:00+00:00", DEFERRED_QID, "a@example.org",
                   "Deferred: 421 try later", host="ip-10-0-1-5")
    queue, _ = tracker_for([sent, late])
    msg = queue.get(DEFERRED_QID)
    assert msg is not None
    assert queue.deferred_count() == 0
    assert msg.recipients["a@example.org"].attempts == 2
    assert msg.first_seen == timestamp_to_epoch("2026-11-23T19:30:00+00:00")
    assert msg.hosts == ["ip-10-0-2-7", "ip-10-0-1-5"]


def test_an_exact_repeat_of_a_recent_line_is_not_another_delivery() -> None:
    """A restarted tail -F re-sends its last lines: each is counted once, a real retry twice."""
    lines = REAL.splitlines()
    queue, _ = tracker_for(lines + lines[-3:])
    assert queue.counts[Result.DEFERRED] == 2 and queue.counts[Result.QUEUED] == 1
    assert queue.duplicates == 2  # the two to= lines among them (a from= line is no delivery)
    far = [to_line(f"2026-11-23T19:30:{i % 60:02d}.{i:06d}+00:00", f"6ANJ{i:04d}a{i:06d}",
                   "x@example.org", "Sent") for i in range(DUPLICATE_WINDOW + 1)]
    queue, _ = tracker_for([*far, far[0]])  # out of the window: counted again
    assert queue.counts[Result.SENT] == DUPLICATE_WINDOW + 2


def test_postfix_lines_track_sender_and_each_recipient() -> None:
    """Postfix: qmgr from= gives the sender, one smtp line per recipient, BSD timestamps."""
    queue, _ = tracker_for((FIXTURES / "postfix.log").read_text().splitlines())
    [msg] = queue.deferred_messages()
    assert msg.queue_id == "4Y8KqT1Zx3z9sWP"
    assert msg.sender == "app@example.com"
    assert {a: r.result for a, r in msg.recipients.items()} == {
        "Nobody-20@SinkHole.TEST.": Result.DEFERRED, "friend@example.org": Result.SENT}
    assert msg.hosts == ["mx"]
    bounced = queue.get("3F2A1B2C3D")
    assert bounced is not None and bounced.recipients["x@relay.sinkhole.test"].result \
        is Result.BOUNCED
    assert queue.take_delays() == [0.61]


def test_the_count_bound_forgets_finished_messages_before_deferred_ones() -> None:
    """Past max_messages the least recently active finished message goes; deferred ones stay."""
    queue = QueueTracker(max_messages=3)
    lines = [to_line("2026-11-23T19:30:00+00:00", "6ANJAAAA000001", "d@x.org", "Deferred"),
             to_line("2026-11-23T19:30:01+00:00", "6ANJAAAA000002", "s@x.org", "Sent",
                     dsn="2.0.0"),
             to_line("2026-11-23T19:30:02+00:00", "6ANJAAAA000003", "s@x.org", "Sent",
                     dsn="2.0.0"),
             to_line("2026-11-23T19:30:03+00:00", "6ANJAAAA000004", "d@x.org", "Deferred"),
             to_line("2026-11-23T19:30:04+00:00", "6ANJAAAA000005", "d@x.org", "Deferred"),
             to_line("2026-11-23T19:30:05+00:00", "6ANJAAAA000006", "d@x.org", "Deferred")]
    for line in lines:
        queue.see_delivery(_delivery(line), line)
    assert queue.tracked_count() == 3
    assert queue.evicted == 3
    # Both sent ones went first; then, with only deferred ones left, the oldest of those.
    assert [m.queue_id for m in queue.deferred_messages()] == [
        "6ANJAAAA000004", "6ANJAAAA000005", "6ANJAAAA000006"]
    assert sum(queue.counts.values()) == 6  # the bound never loses a count


def test_recipients_per_message_are_bounded() -> None:
    """A message with more recipients than MAX_RECIPIENTS counts them all, remembers the first."""
    rcpts = ",".join(f"<r{i}@example.org>" for i in range(MAX_RECIPIENTS + 5))
    line = (f"2026-11-23T19:30:00+00:00 vm sendmail[1]: {DEFERRED_QID}: to={rcpts}, "
            "delay=00:00:00, mailer=smtp, dsn=2.0.0, stat=Sent")
    queue, _ = tracker_for([line])
    msg = queue.get(DEFERRED_QID)
    assert msg is not None and len(msg.recipients) == MAX_RECIPIENTS
    assert queue.counts[Result.SENT] == MAX_RECIPIENTS + 5


def test_retention_ages_out_messages_with_a_fake_clock() -> None:
    """A message with no line for `retention` seconds is forgotten, deferred or not."""
    now = [0.0]
    queue = QueueTracker(retention=6 * 86400, clock=lambda: now[0])
    old = to_line("2026-11-23T19:30:00+00:00", DEFERRED_QID, "a@x.org", "Deferred")
    new = to_line("2026-11-26T19:30:00+00:00", DEFERRED_QID_2, "b@x.org", "Deferred")
    for line in (old, new):
        queue.see_delivery(_delivery(line), line)
    start = timestamp_to_epoch("2026-11-23T19:30:00+00:00")
    assert start is not None
    now[0] = start + 6 * 86400 - 1
    assert queue.expire() == 0 and queue.deferred_count() == 2
    assert queue.oldest_deferred_age() == 6 * 86400 - 1
    now[0] = start + 6 * 86400 + 1
    assert queue.expire() == 1
    assert [m.queue_id for m in queue.deferred_messages()] == [DEFERRED_QID_2]
    assert queue.oldest_deferred_age() == 3 * 86400 + 1


def test_state_round_trips_through_the_state_file_model() -> None:
    """Saved messages validate as the state file's queue section and restore the same state."""
    queue, _ = tracker_for(REAL.splitlines())
    document = json.loads(json.dumps({"version": 2, "queue": {"messages": queue.state()}}))
    parsed = parse_state(document)
    assert parsed.queue is not None
    restored = QueueTracker()
    restored.restore(Message.from_state(m.model_dump()) for m in parsed.queue.messages)
    assert [m.as_dict() for m in restored.deferred_messages()] == [
        m.as_dict() for m in queue.deferred_messages()]
    assert restored.tracked_count() == queue.tracked_count()


@pytest.mark.parametrize("queue_section", [
    {"messages": [{"queue_id": "Q1"}]},
    {"messages": [{"queue_id": "Q1", "first_seen": 1, "last_seen": 1,
                   "recipients": [{"address": "a", "result": "lost", "stat": "",
                                   "attempts": 1, "seen": 1}]}]},
    {"messages": "none"},
])
def test_a_queue_section_of_the_wrong_shape_is_refused(queue_section: Any) -> None:
    """The queue section is validated like the others (the file is then quarantined)."""
    with pytest.raises(ValueError, match="queue"):
        parse_state({"version": 2, "queue": queue_section})


# -- in the watcher ----------------------------------------------------------------------------


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def append(path: Path, text: str) -> None:
    with path.open("a") as f:
        f.write(text)


def file_config(log: Path, **extra: Any) -> dict[str, Any]:
    return {"source": "file", "file": {"path": str(log), "poll_interval": 0.02,
                                       "from_beginning": True}, **extra}


async def test_watcher_exports_delivery_metrics_and_an_age_that_grows_between_reads(
    tmp_path: Path,
) -> None:
    """mta_* metrics from a followed file; the oldest deferred age is computed at scrape time."""
    log = tmp_path / "maillog"
    log.write_text(REAL)
    wall = [2_000_000_000.0]
    async with watching(file_config(log), wall=lambda: wall[0]) as w:
        await until(lambda: w.value("mta_deliveries_total", result="sent") == 3)
        assert {r.value: w.value("mta_deliveries_total", result=r.value) for r in Result} == {
            "sent": 3, "deferred": 2, "queued": 1, "bounced": 1, "other": 0}
        assert w.value("mta_delivery_delay_seconds_count") == 3
        assert w.value("mta_delivery_delay_seconds_sum") == 24.0  # delay=00:00:08, 3 recipients
        assert w.value("mta_delivery_delay_seconds_bucket", le="5.0") == 0
        assert w.value("mta_delivery_delay_seconds_bucket", le="30.0") == 3
        assert w.value("mta_deferred_messages") == 2
        assert w.value("mta_tracked_messages") == 5
        assert FIRST_SEEN is not None
        assert w.value("mta_oldest_deferred_seconds") == wall[0] - FIRST_SEEN
        wall[0] += 3600  # no new line: the age still grows
        assert w.value("mta_oldest_deferred_seconds") == wall[0] - FIRST_SEEN


async def test_skipped_delivery_lines_are_exported_by_reason(tmp_path: Path) -> None:
    """A to= line cut short and an exact repeat are not deliveries, but each shows in
    mta_delivery_lines_skipped_total, so a log that loses its stat= fields is visible."""
    log = tmp_path / "maillog"
    sent = to_line("2026-11-23T19:30:20+00:00", DEFERRED_QID, "a@example.com",
                   "Sent (ok)", dsn="2.0.0")
    cut = f"2026-11-23T19:30:26+00:00 vm sendmail[11000]: {DEFERRED_QID}: to=<trunc@exa"
    log.write_text(f"{sent}\n{sent}\n{cut}\n")
    async with watching(file_config(log)) as w:
        await until(lambda: w.value("mta_delivery_lines_skipped_total",
                                    reason="truncated") == 1)
        assert w.value("mta_delivery_lines_skipped_total", reason="duplicate") == 1
        assert w.value("mta_deliveries_total", result="sent") == 1


async def test_restart_in_the_middle_neither_recounts_nor_forgets_deferred(
    tmp_path: Path,
) -> None:
    """Stopped after a deferral and restarted from the state file: only new lines count, and
    the message still deferred is remembered while the one delivered meanwhile is not."""
    log, state = tmp_path / "maillog", tmp_path / "state.json"
    # The capture as if written half an hour ago (so the delivery appended below, 28 minutes
    # after its newest line, is in the past too): the watcher ages its queue on the real
    # clock, and as dated the capture fell out of the 6-day retention six days after it was taken.
    shift = TimeShift.to_now(REAL, ago=1800)
    recent = shift.apply(REAL)
    log.write_text(recent)
    config = file_config(log, state_file=str(state))
    async with watching(config) as w:
        await until(lambda: w.value("mta_deliveries_total", result="queued") == 1)
        assert w.value("mta_deferred_messages") == 2
    saved = json.loads(state.read_text())
    assert DEFERRED_QID in {m["queue_id"] for m in saved["queue"]["messages"]}
    assert saved["file"]["offset"] == len(recent.encode())  # saved with the position

    # Stopped meanwhile: sendmail's next queue run delivers the first message.
    append(log, to_line(shift.stamp("2026-11-23T20:00:26.000001+00:00"), DEFERRED_QID,
                        "nobody-1@sinkhole.test", "Sent (2.0.0 accepted)", dsn="2.0.0",
                        delay="00:30:00") + "\n")
    async with watching(config) as w:
        await until(lambda: w.value("mta_deliveries_total", result="sent") == 1)
        assert w.value("mta_deliveries_total", result="deferred") == 0  # not read again
        assert w.value("mta_deliveries_total", result="queued") == 0
        assert w.value("mta_deferred_messages") == 1
        assert [m.queue_id for m in w.watch.queue.deferred_messages()] == [DEFERRED_QID_2]
        delivered = w.watch.queue.get(DEFERRED_QID)
        assert delivered is not None
        assert delivered.sender == "qp-test@sub.example.com"  # remembered from the first run
        assert delivered.recipients["nobody-1@sinkhole.test"].attempts == 2


async def test_a_state_file_without_a_queue_section_still_loads(tmp_path: Path) -> None:
    """A state file written before queue health resumes its position; the queue starts empty."""
    log, state = tmp_path / "maillog", tmp_path / "state.json"
    log.write_text(REAL)
    async with watching(file_config(log, state_file=str(state))) as w:
        await until(lambda: w.value("mta_deliveries_total", result="queued") == 1)
    document = json.loads(state.read_text())
    del document["queue"]
    state.write_text(json.dumps(document))
    append(log, to_line("2026-11-23T20:00:00+00:00", "6ANJWAAA000001", "n@x.org",
                        "Deferred: 421 later") + "\n")
    async with watching(file_config(log, state_file=str(state))) as w:
        await until(lambda: w.value("mta_deliveries_total", result="deferred") == 1)
        assert w.value("mta_deferred_messages") == 1
    assert not list(tmp_path.glob("state.json.corrupt-*"))  # noqa: ASYNC240


async def test_queue_ages_out_in_the_watcher_after_the_retention() -> None:
    """With a fake wall clock, a deferred message unseen for queue_retention leaves the gauges."""
    wall = [timestamp_to_epoch("2026-11-23T19:40:00+00:00") or 0.0]
    clock = [0.0]
    config = LeakWatchConfig.model_validate({"source": "stdin", "queue_retention": 3600})
    metrics = Metrics()
    watch = LeakWatch(config, metrics, clock=lambda: clock[0], wall=lambda: wall[0])
    await watch.handle_batch(REAL.splitlines())
    assert value(metrics, "mta_deferred_messages") == 2
    wall[0] += 3600
    clock[0] += 61
    await watch.handle_batch([])  # a read that found nothing still ages the queue
    assert value(metrics, "mta_deferred_messages") == 0
    assert value(metrics, "mta_oldest_deferred_seconds") == 0
    assert value(metrics, "mta_deliveries_total", result="deferred") == 2  # counts stay


async def test_a_reload_hands_the_queue_over_and_a_closed_watcher_reads_zero() -> None:
    """The new watcher takes the old one's messages; a watcher removed by a reload shows none."""
    config = LeakWatchConfig.model_validate({"source": "stdin"})
    metrics = Metrics()
    old = LeakWatch(config, metrics)
    # Read minutes after it was written (dated, it aged past the retention on the real clock).
    await old.handle_batch(TimeShift.to_now(REAL).apply(REAL).splitlines())
    new = LeakWatch(config, metrics)
    await new.open(handover=old.snapshot())
    assert [m.queue_id for m in new.queue.deferred_messages()] == [DEFERRED_QID, DEFERRED_QID_2]
    assert value(metrics, "mta_deferred_messages") == 2
    await new.close()
    assert value(metrics, "mta_deferred_messages") == 0
    assert value(metrics, "mta_oldest_deferred_seconds") == 0


@pytest.mark.parametrize(("key", "bad"), [
    ("queue_retention", 0), ("queue_retention", -1.0),
    ("max_tracked_messages", 99), ("max_tracked_messages", 100_001),
])
def test_queue_settings_are_validated(key: str, bad: float) -> None:
    """queue_retention must be positive; max_tracked_messages stays within 100..100 000."""
    assert LeakWatchConfig().queue_retention == 6 * 86400
    with pytest.raises(ValueError, match=key):
        LeakWatchConfig.model_validate({key: bad})


# -- messages returned to their sender, cut-short lines, years ------------------------------

def test_postfix_expiry_returns_the_message_and_counts_its_deferred_recipients_bounced() -> None:
    """Postfix logs expiry once per message (qmgr's `from=<...>, status=expired, returned to
    sender`): each recipient still deferred counts as bounced and the message is not deferred."""
    qid = "4ZexpA0001"
    lines = [
        f"2026-11-20T10:00:00+00:00 mx postfix/qmgr[900]: {qid}: from=<app@example.com>, "
        "size=1200, nrcpt=2 (queue active)",
        f"2026-11-20T10:00:01+00:00 mx postfix/smtp[901]: {qid}: to=<a@example.org>, "
        "relay=none, delay=1, dsn=4.4.1, status=deferred (connect to example.org: timed out)",
        f"2026-11-20T10:00:01+00:00 mx postfix/smtp[901]: {qid}: to=<b@example.org>, "
        "relay=example.org[192.0.2.1]:25, delay=1, dsn=2.0.0, status=sent (250 ok)",
        f"2026-11-25T10:00:00+00:00 mx postfix/qmgr[900]: {qid}: from=<app@example.com>, "
        "status=expired, returned to sender",
        f"2026-11-25T10:00:00+00:00 mx postfix/qmgr[900]: {qid}: removed",
    ]
    queue, _ = tracker_for(lines[:3])
    assert queue.deferred_count() == 1
    for line in lines[3:]:
        queue_line(queue, line)
    assert queue.deferred_count() == 0
    assert queue.counts == {Result.SENT: 1, Result.DEFERRED: 1, Result.QUEUED: 0,
                            Result.BOUNCED: 1, Result.OTHER: 0}
    msg = queue.get(qid)
    assert msg is not None
    assert [(a, r.result) for a, r in msg.recipients.items()] == [
        ("a@example.org", Result.BOUNCED), ("b@example.org", Result.SENT)]
    queue_line(queue, lines[3])  # seen again (a CloudWatch overlap): nothing more to return
    assert queue.counts[Result.BOUNCED] == 1


def test_sendmail_queue_return_bounces_the_deferred_recipients_but_a_delay_warning_does_not(
) -> None:
    """sendmail's `QID: NEWQID: DSN: Cannot send message for 5 days` returns the message;
    `DSN: Warning: could not send message for past 4 hours` only warns the sender."""
    t0 = "2026-11-20T10:00:00+00:00"
    warning = (f"2026-11-20T14:00:00+00:00 vm sendmail[11001]: {DEFERRED_QID}: "
               "6AKE0000011001: DSN: Warning: could not send message for past 4 hours")
    returned = (f"2026-11-25T10:00:00+00:00 vm sendmail[11002]: {DEFERRED_QID}: "
                "6APA0000011002: DSN: Cannot send message for 5 days")
    queue, _ = tracker_for([to_line(t0, DEFERRED_QID, "a@example.org", "Deferred: 421 later"),
                            warning])
    assert queue.deferred_count() == 1
    queue, _ = tracker_for([to_line(t0, DEFERRED_QID, "a@example.org", "Deferred: 421 later"),
                            warning, returned])
    assert queue.deferred_count() == 0
    msg = queue.get(DEFERRED_QID)
    assert msg is not None
    rcpt = msg.recipients["a@example.org"]
    assert (rcpt.result, rcpt.stat) == (Result.BOUNCED, "Cannot send message for 5 days")
    assert queue.counts[Result.BOUNCED] == 1 and queue.counts[Result.DEFERRED] == 1


def test_a_to_line_cut_short_before_its_stat_is_not_a_delivery() -> None:
    """A `to=` line without `stat=` (truncated in transit) has no result to count."""
    cut = f"2026-11-23T19:30:26+00:00 vm sendmail[11000]: {DEFERRED_QID}: to=<trunc@exa"
    queue, processor = tracker_for([cut])
    assert sum(queue.counts.values()) == 0 and queue.truncated == 1
    assert processor.counts.to == 1  # still a to= line in maillog_lines_total


@pytest.mark.parametrize(("wall", "stamps", "first", "last"), [
    # A capture running days past the clock stays in this year.
    ((2026, 11, 25, 16), ["Nov 24 10:00:00", "Nov 26 10:00:01", "Nov 29 10:00:02"],
     (2026, 11, 24), (2026, 11, 29)),
    # A December line read in January is last year's; the January line after it, this year's.
    ((2027, 1, 2, 12), ["Dec 31 23:59:00", "Jan  1 00:01:00"], (2026, 12, 31), (2027, 1, 1)),
], ids=["past-the-clock", "new-year"])
def test_bsd_timestamps_of_a_capture_stay_in_one_year(
    wall: tuple[int, ...], stamps: list[str], first: tuple[int, ...], last: tuple[int, ...]
) -> None:
    """Old-style timestamps have no year: deferred on every line but the last, sent on the
    last, the message ends not deferred, its first and last lines on the right dates."""
    now = time.mktime((*wall, 0, 0, 0, 0, -1))
    stats = ["Deferred: 421 later"] * (len(stamps) - 1) + ["Sent (ok)"]
    queue, _ = tracker_for([to_line(ts, "6AOA0000000001", "a@example.org", stat)
                            for ts, stat in zip(stamps, stats, strict=True)],
                           wall=lambda: now)
    msg = queue.get("6AOA0000000001")
    assert msg is not None and queue.deferred_count() == 0
    assert time.localtime(msg.first_seen)[:3] == first
    assert time.localtime(msg.last_seen)[:3] == last


def queue_line(queue: QueueTracker, line: str) -> None:
    """Feed one line to a tracker through a processor, as the watcher does."""
    LineProcessor(LeakDetector(["sinkhole.test"], []), queue=queue).feed(line)


def test_a_first_line_on_feb_29_read_in_a_common_year_is_the_last_leap_years() -> None:
    """Feb 29 has no date in 2026: the first line goes to 2024, the next ones follow it."""
    now = time.mktime((2026, 11, 25, 16, 0, 0, 0, 0, -1))
    queue, _ = tracker_for([
        to_line("Feb 29 23:59:58", "6AOA0000000003", "a@example.org", "Deferred: later"),
        to_line("Mar  1 00:00:05", "6AOA0000000004", "b@example.org", "Deferred: later"),
    ], wall=lambda: now)
    firsts = [time.localtime(m.first_seen)[:3] for m in queue.deferred_messages()]
    assert firsts == [(2024, 2, 29), (2024, 3, 1)]


def test_a_quoted_sender_holding_status_expired_is_no_expiry() -> None:
    """Only qmgr's line that ends `status=expired, returned to sender` returns a message."""
    qid = "4ZexpB0002"
    queue, _ = tracker_for([
        f"2026-11-20T10:00:01+00:00 mx postfix/smtp[901]: {qid}: to=<a@example.org>, "
        "relay=none, delay=1, dsn=4.4.1, status=deferred (connect to example.org: timed out)",
        f"2026-11-20T11:00:00+00:00 mx postfix/qmgr[900]: {qid}: "
        'from=<"ops, status=expired, returned to sender"@example.com>, size=1200, '
        "nrcpt=1 (queue active)",
    ])
    assert queue.deferred_count() == 1 and queue.counts[Result.BOUNCED] == 0


def test_after_a_long_stop_the_clock_places_the_first_bsd_line_not_the_saved_state() -> None:
    """A state saved in June 2025 does not pull a February 2026 line back into 2025."""
    saved = QueueTracker(wall=lambda: time.mktime((2025, 6, 1, 12, 0, 0, 0, 0, -1)))
    LineProcessor(LeakDetector(["sinkhole.test"], []), queue=saved).feed(
        to_line("Jun  1 11:00:00", "6AOA0000000005", "a@example.org", "Sent (ok)"))
    now = time.mktime((2026, 2, 10, 13, 0, 0, 0, 0, -1))
    restored = QueueTracker(wall=lambda: now)
    restored.restore(Message.from_state(m) for m in saved.state())
    queue_line(restored, to_line("Feb 10 12:00:00", "6AOA0000000006", "b@example.org",
                                 "Deferred: later"))
    (msg,) = restored.deferred_messages()
    assert time.localtime(msg.first_seen)[:3] == (2026, 2, 10)
