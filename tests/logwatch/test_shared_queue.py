"""The shared queue per task: hand-offs, silent deferred messages, tasks logging, queue errors.

Lines are stamped relative to the (injected) clock, never at a fixed date; the real
error lines come from tests/integration/data/queue-errors/ (two real sendmail 8.17
daemons over one queue directory).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from daemon.app import Daemon
from daemon.config import ConfigError, load_config
from daemon.logwatch.config import LeakWatchConfig
from daemon.logwatch.detector import LeakDetector
from daemon.logwatch.pipeline import LineProcessor
from daemon.logwatch.queue import (
    MAX_EXAMPLE,
    MAX_ORIGINS,
    MAX_TASKS,
    RECENT_ERRORS,
    Message,
    QueueTracker,
)
from daemon.logwatch.queue_errors import ErrorKind, classify
from daemon.state import parse_state
from tests.logwatch.harness import run_scan, watching
from tests.logwatch.test_queue_scan import TASK_A, TASK_B, cloudwatch, put
from tests.test_daemon import get, samples
from tests.waiting import until

NOW = 2_000_000_000.0  # the injected clock; lines are placed relative to it
SAMPLES = Path(__file__).parents[1] / "integration" / "data" / "queue-errors"
QID, QID_2 = "6B7HIP17000034", "6B7HIS0r000035"
DEFER = "Deferred: 421 4.3.2 Service temporarily unavailable"
SENT = "Sent (2.0.0 Message accepted for discard)"


def ts(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat()


def to_line(at: float, host: str, qid: str = QID, stat: str = DEFER,
            rcpt: str = "nobody-1@sinkhole.test") -> str:
    dsn = "2.0.0" if stat.startswith("Sent") else "4.0.0"
    return (f"{ts(at)} {host} sendmail[34]: {qid}: to=<{rcpt}>, delay=00:00:00, "
            f"xdelay=00:00:00, mailer=smtp, pri=120094, relay=[127.0.0.1] [127.0.0.1], "
            f"dsn={dsn}, stat={stat}")


def from_line(at: float, host: str, qid: str = QID) -> str:
    return (f"{ts(at)} {host} sendmail[33]: {qid}: from=<qp-test-1@sub.example.com>, size=94, "
            f"class=0, nrcpts=1, proto=ESMTP, daemon=MTA, relay=localhost [127.0.0.1]")


def other_line(at: float, host: str, text: str = "gethostbyaddr(192.0.2.2) failed: 1") -> str:
    return f"{ts(at)} {host} sendmail[30]: {text}"


def fed(lines: list[str], streams: list[str | None] | None = None,
        **kw: Any) -> QueueTracker:
    queue = QueueTracker(clock=lambda: NOW, wall=lambda: NOW, **kw)
    processor = LineProcessor(LeakDetector(["sinkhole.test"], ["qp-test-*@*"]), queue=queue)
    for i, line in enumerate(lines):
        processor.feed(line, None if streams is None else streams[i])
    return queue


# -- hand-offs and tasks per message -----------------------------------------------------------


def test_a_retry_by_another_task_is_one_handoff_and_both_tasks_are_listed() -> None:
    """Deferred by task A, retried by task B: one hand-off; B's second retry is none; the
    message lists A then B, its first and last task."""
    t = NOW - 3600
    queue = fed([from_line(t, "smtp-out-1"), to_line(t + 1, "smtp-out-1"),
                 to_line(t + 900, "smtp-out-2"), to_line(t + 1800, "smtp-out-2")])
    assert queue.handoffs == 1
    msg = queue.get(QID)
    assert msg is not None
    assert (msg.tasks, msg.last_task) == (["smtp-out-1", "smtp-out-2"], "smtp-out-2")


def test_handoffs_count_each_change_of_task_while_deferred_and_not_after() -> None:
    """A -> B -> A while deferred is two hand-offs; a delivery by B after that is a third;
    lines after it no longer count (nothing is deferred)."""
    t = NOW - 7200
    queue = fed([to_line(t, "a"), to_line(t + 900, "b"), to_line(t + 1800, "a"),
                 to_line(t + 2700, "b", stat=SENT), to_line(t + 3600, "a", stat=SENT)])
    assert queue.handoffs == 3
    msg = queue.get(QID)
    assert msg is not None and msg.tasks == ["a", "b"] and msg.last_task == "a"


def test_a_first_attempt_elsewhere_or_a_message_never_deferred_is_no_handoff() -> None:
    """Queued on one task and tried first by another, or sent on the first try: no hand-off
    (nothing was deferred); the queue-add line alone is no attempt."""
    t = NOW - 600
    queue = fed([from_line(t, "a"), to_line(t, "a", stat="queued"),
                 to_line(t + 60, "b", stat=SENT),
                 from_line(t, "a", QID_2), to_line(t + 1, "b", QID_2, stat=SENT)])
    assert queue.handoffs == 0


def test_a_late_older_line_from_another_task_is_no_handoff() -> None:
    """A CloudWatch event ingested late (older than the message's newest line) neither counts
    as a hand-off nor becomes the last task."""
    t = NOW - 3600
    queue = fed([to_line(t, "a"), to_line(t + 900, "a"), to_line(t + 300, "b")])
    assert queue.handoffs == 0
    msg = queue.get(QID)
    assert msg is not None and msg.last_task == "a" and msg.tasks == ["a", "b"]


def test_from_cloudwatch_the_task_is_the_log_stream() -> None:
    """Lines with a log stream belong to that stream's task, whatever their host field."""
    t = NOW - 3600
    streams: list[str | None] = ["smtp-out/smtp-out/task-a", "smtp-out/smtp-out/task-b"]
    queue = fed([to_line(t, "ip-10-0-1-5"), to_line(t + 900, "ip-10-0-1-5")], streams)
    assert queue.handoffs == 1
    msg = queue.get(QID)
    assert msg is not None and msg.tasks == list(streams)
    assert msg.hosts == ["ip-10-0-1-5"]


def test_a_message_remembers_its_first_task_and_the_latest_ones() -> None:
    """More tasks than MAX_ORIGINS: the first stays, the oldest of the others go."""
    t = NOW - 86400
    queue = fed([to_line(t + i * 900, f"task-{i}") for i in range(MAX_ORIGINS + 4)])
    msg = queue.get(QID)
    assert msg is not None
    assert len(msg.tasks) == MAX_ORIGINS
    assert msg.tasks[0] == "task-0" and msg.tasks[-1] == f"task-{MAX_ORIGINS + 3}"
    assert "task-1" not in msg.tasks
    assert queue.handoffs == MAX_ORIGINS + 3


# -- silence -------------------------------------------------------------------------------------


def test_a_deferred_message_is_silent_once_no_line_touched_it_for_silent_after() -> None:
    """Silent strictly after queue_silent_after since its last line, with that age."""
    queue = fed([to_line(NOW - 2700, "a"), to_line(NOW - 2701, "a", QID_2)])
    assert [m.queue_id for m in queue.silent_messages()] == [QID_2]
    assert queue.silent_count() == 1
    assert queue.oldest_silent_age() == pytest.approx(2701, abs=0.01)
    msg = queue.get(QID)
    assert msg is not None and queue.silent_for(msg) is None
    assert queue.silent_count(now=NOW + 10) == 2


def test_a_retry_ends_silence_and_a_delivery_or_return_leaves_the_count() -> None:
    """Retried again: no longer silent. Sent, or returned to its sender: not deferred, so
    not silent however old its last line."""
    old = NOW - 3 * 3600
    queue = fed([to_line(old, "a"), to_line(NOW - 60, "b"),
                 to_line(old, "a", QID_2), to_line(old + 1, "a", QID_2, stat=SENT),
                 to_line(old, "a", "6B7HIZZZ000036"),
                 other_line(old + 2, "a", "6B7HIZZZ000036: 6B7HIZZZ000037: DSN: Cannot send "
                                          "message for 5 days")])
    assert queue.deferred_count() == 1
    assert queue.silent_count() == 0
    assert queue.oldest_silent_age() == 0.0


def test_silence_while_reading_a_backlog_is_judged_at_the_newest_line_read() -> None:
    """Half-way through a backlog, a message whose retry is further on is not silent yet:
    the verdict waits for the source to catch up."""
    queue = fed([to_line(NOW - 7200, "a"), to_line(NOW - 7100, "b", QID_2)])
    queue.reading_backlog = True
    assert queue.silent_count() == 0
    queue.reading_backlog = False
    assert queue.silent_count() == 2


# -- tasks logging ---------------------------------------------------------------------------


def test_tasks_logging_counts_every_mta_line_within_silent_after() -> None:
    """Any sendmail line is a sign of life (not only deliveries); a task quiet for longer than
    silent_after is listed but not logging; each lists the deferred messages it last touched."""
    queue = fed([other_line(NOW - 100, "a"), to_line(NOW - 5000, "b"),
                 to_line(NOW - 4000, "c", QID_2), other_line(NOW - 10, "c")])
    assert queue.tasks_logging() == 2
    listing = {t["task"]: t for t in queue.task_listing()}
    assert [t["task"] for t in queue.task_listing()] == ["c", "a", "b"]  # latest line first
    assert listing["a"]["logging"] and listing["c"]["logging"] and not listing["b"]["logging"]
    assert listing["b"]["deferred_last_touched"] == 1
    assert listing["c"]["deferred_last_touched"] == 1
    assert listing["a"]["deferred_last_touched"] == 0
    assert listing["c"]["seconds_since_last_line"] == pytest.approx(10, abs=0.01)


def test_the_tasks_remembered_are_bounded_and_saved() -> None:
    """At most MAX_TASKS tasks, the least recently heard forgotten first; they survive a
    save and a restore (so a restart does not empty mta_tasks_logging), judged at the
    newest saved line until the source reads to its end again."""
    lines = [other_line(NOW - 1000 + i, f"task-{i}") for i in range(MAX_TASKS + 10)]
    queue = fed(lines)
    assert len(queue.task_listing()) == MAX_TASKS
    assert queue.task_listing()[-1]["task"] == "task-10"
    saved = queue.task_state()
    again = QueueTracker(clock=lambda: NOW)
    again.restore([], [(t["task"], t["last_line"]) for t in saved])
    assert again.reference() == NOW - 1000 + MAX_TASKS + 9
    again.read_up_to = NOW  # the first read after the restart reached the end
    assert again.task_listing() == queue.task_listing()
    assert again.tasks_logging() == MAX_TASKS


def test_a_message_saved_before_tasks_were_kept_takes_its_streams_or_hosts() -> None:
    """A state file of the previous release (no tasks, no last_task) still loads."""
    saved = {"queue_id": QID, "sender": None, "first_seen": NOW - 100, "last_seen": NOW - 50,
             "hosts": ["a", "b"], "log_streams": [], "recipients": [
                 {"address": "x@sinkhole.test", "result": "deferred", "stat": DEFER,
                  "attempts": 2, "seen": NOW - 50}]}
    state = parse_state({"version": 2, "queue": {"messages": [saved]}})
    assert state.queue is not None
    msg = Message.from_state(state.queue.messages[0].model_dump())
    assert (msg.tasks, msg.last_task) == (["a", "b"], "b")


# -- the queue's own errors --------------------------------------------------------------------


def _sample_kinds(name: str) -> Counter[str]:
    return Counter(k.value for line in (SAMPLES / name).read_text().splitlines()
                   if (k := classify(line)) is not None)


def test_the_real_lock_lines_are_lock_errors() -> None:
    """tests/integration/data/queue-errors/lock.log: `queueup: locked` (LogLevel 20) and the
    leftover temp file (`cannot create ./tf...: File exists`), nothing else."""
    assert _sample_kinds("lock.log") == {"lock": 2}


def test_the_real_permission_lines_are_permission_errors_and_losing_is_other() -> None:
    """Cannot write the df file, cannot chdir, cannot rename: permission; the world-writable
    qf (`bogus queue file`) too; sendmail taking it out of the queue (`Losing`) is other."""
    assert _sample_kinds("permission.log") == {"permission": 4, "other": 1}


def test_the_real_space_lines_are_space_errors() -> None:
    """Out of disk space, ENOSPC on the control file, low on space (twice), rejecting new
    messages, and the read-only mount."""
    assert _sample_kinds("space.log") == {"space": 6}


@pytest.mark.parametrize(("line", "kind"), [
    ("postfix/cleanup[123]: warning: 4F9D21C2A: write queue file: No space left on device",
     "space"),
    ("postfix/smtpd[123]: warning: not enough free space in mail queue: 0 bytes < "
     "1.5*message size limit", "space"),
    ("postfix/master[1]: fatal: open lock file pid/master.pid: unable to set exclusive lock: "
     "Resource temporarily unavailable", "lock"),
    ("postfix/pickup[9]: warning: mail_queue_enter: create file maildrop/123.456: "
     "Permission denied", "permission"),
    ("postfix/qmgr[9]: warning: open active 4F9D21C2A: Permission denied", "permission"),
    ("postfix/qmgr[9]: warning: saving corrupt file \"4F9D21C2A\" from queue \"active\" to "
     "queue \"corrupt\"", "other"),
    ("sendmail[9]: 6B7H8a4l000035: SYSERR(root): savemail: cannot save rejected email "
     "anywhere", "other"),
    ("sendmail[9]: 6B7H8a4l000035: SYSERR(root): cannot flock(./qf6B7H8a4l000035, fd=5, "
     "type=2, omode=40002, euid=0): No locks available", "lock"),
    ("sm-mta[9]: 6B7H8a4l000035: Losing qf6B7H8a4l000035: savemail panic", "other"),
    ("postfix/smtp[9]: warning: hostname foo.example does not resolve to address 192.0.2.1",
     None),
    ("sendmail[9]: NOQUEUE: SYSERR(root): hash map \"Alias0\": unsafe map file "
     "/etc/mail/aliases.db: Permission denied", None),
    ("sendmail[9]: 6B7H8a4l000035: to=<a@sinkhole.test>, stat=Insufficient disk space; try "
     "again later", None),
    ("opendkim[9]: 6B7H8a4l000035: SYSERR(root): cannot rename(./tf1, ./qf1): Permission "
     "denied", None),
])
def test_queue_errors_of_sendmail_and_postfix_by_kind(line: str, kind: str | None) -> None:
    """Postfix's equivalents, lock errors of an NFS lock service, and lines that look close
    but are not about the queue (or not from the MTA)."""
    found = classify(f"{ts(NOW)} mx {line}")
    assert (found.value if found else None) == kind


def test_errors_are_counted_and_the_latest_lines_of_each_kind_kept() -> None:
    """Every real error line counts by kind; /status keeps the last RECENT_ERRORS of each,
    with their task and queue id, cut at MAX_EXAMPLE characters."""
    lines = [line for name in ("lock.log", "permission.log", "space.log")
             for line in (SAMPLES / name).read_text().splitlines()]
    long_one = other_line(NOW, "a", f"{QID}: SYSERR(root): cannot rename(./tf{QID}, ./qf{QID}"
                                    f"), uid=0: Operation not permitted " + "x" * 900)
    queue = fed([*lines, *[long_one] * (RECENT_ERRORS + 1)])
    assert {k.value: n for k, n in queue.errors.items()} == {
        "lock": 2, "permission": 4 + RECENT_ERRORS + 1, "space": 6, "other": 1}
    recent = queue.recent_error_lines()
    assert len(recent["permission"]) == RECENT_ERRORS
    assert recent["permission"][-1]["line"] == long_one[:MAX_EXAMPLE]
    assert recent["permission"][-1]["task"] == "a"
    assert recent["permission"][-1]["queue_id"] == QID
    assert recent["lock"][0]["task"] == "smtp-out-2"
    assert re.search(r"queueup: locked$", recent["lock"][0]["line"])


# -- in the running watcher --------------------------------------------------------------------


def file_config(log: Path, **extra: Any) -> dict[str, Any]:
    return {"source": "file", "file": {"path": str(log), "poll_interval": 0.02,
                                       "from_beginning": True}, **extra}


async def test_the_watcher_exports_silence_handoffs_tasks_and_errors(tmp_path: Path) -> None:
    """mta_deferred_silent_messages and its age follow the injected clock at scrape time; a
    hand-off, the tasks logging and the errors by kind (all four from 0) are exported, and
    /status lists the tasks, the silent message and the latest error line."""
    log = tmp_path / "maillog"
    wall = [NOW]
    log.write_text("\n".join([
        from_line(NOW - 1000, "smtp-out-1"), to_line(NOW - 999, "smtp-out-1"),
        to_line(NOW - 100, "smtp-out-2"),
        other_line(NOW - 50, "smtp-out-2", f"{QID}: queueup: locked"),
    ]) + "\n")
    async with watching(file_config(log, queue_silent_after=600), wall=lambda: wall[0]) as w:
        await until(lambda: w.value("mta_queue_errors_total", kind="lock") == 1)
        assert w.value("mta_queue_handoffs_total") == 1
        assert {k.value: w.value("mta_queue_errors_total", kind=k.value)
                for k in ErrorKind} == {"lock": 1, "permission": 0, "space": 0, "other": 0}
        assert w.value("mta_tasks_logging") == 1  # smtp-out-1 last logged 999 s ago
        assert w.value("mta_deferred_silent_messages") == 0
        wall[0] += 600  # no new line: 700 s since the last one, once the log is read again
        await until(lambda: w.value("mta_deferred_silent_messages") == 1)
        assert w.value("mta_oldest_silent_deferred_seconds") == pytest.approx(700, abs=0.01)
        assert w.value("mta_tasks_logging") == 0
        status = w.watch.queue_status()
        assert [m["queue_id"] for m in status["silent_messages"]] == [QID]
        assert status["silent_messages"][0]["last_task"] == "smtp-out-2"
        assert [(t["task"], t["deferred_last_touched"]) for t in status["tasks"]] == [
            ("smtp-out-2", 1), ("smtp-out-1", 0)]
        assert status["errors"]["recent"]["lock"][0]["task"] == "smtp-out-2"
        with log.open("a") as fh:  # retried: no longer silent
            fh.write(to_line(wall[0] - 1, "smtp-out-1") + "\n")
        await until(lambda: w.value("mta_queue_handoffs_total") == 2)
        assert w.value("mta_deferred_silent_messages") == 0
        assert w.value("mta_oldest_silent_deferred_seconds") == 0
    assert w.value("mta_deferred_silent_messages") == 0  # closed: reads 0
    assert w.value("mta_tasks_logging") == 0


async def test_a_source_that_cannot_be_read_makes_no_message_silent(tmp_path: Path) -> None:
    """Silence is judged up to the last read that reached the end of the log: while the file
    is gone (or CloudWatch unreachable) the lines not read are not taken for silence and no
    task stops logging; once it is read again, the verdict is at the clock."""
    log = tmp_path / "maillog"
    wall = [NOW]
    log.write_text(to_line(NOW - 100, "smtp-out-1") + "\n")
    async with watching(file_config(log, queue_silent_after=600), wall=lambda: wall[0]) as w:
        await until(lambda: w.value("mta_deferred_messages") == 1)
        log.rename(tmp_path / "maillog.gone")
        await until(lambda: w.value("leakwatch_errors_total", reason="file_missing") > 0)
        wall[0] += 3600
        await until(lambda: w.value("leakwatch_errors_total", reason="file_missing") > 1)
        assert w.value("mta_deferred_silent_messages") == 0
        assert w.value("mta_tasks_logging") == 1
        assert w.watch.queue_status()["judged_at"] == ts(NOW)
        (tmp_path / "maillog.gone").rename(log)
        await until(lambda: w.value("mta_deferred_silent_messages") == 1)
        assert w.value("mta_oldest_silent_deferred_seconds") == pytest.approx(3700, abs=0.01)
        assert w.value("mta_tasks_logging") == 0
        assert w.watch.queue_status()["judged_at"] == ts(wall[0])


def _backlog(start: float) -> list[str]:
    """Three hours of two tasks: messages retried and handed off, one left silent when its
    task stops, errors on the way."""
    lines = []
    for run in range(12):  # a queue run every 15 min from each task, alternating
        at = start + run * 900
        host = f"smtp-out-{1 + run % 2}"
        lines.append(to_line(at, host, QID))
        if run < 4:  # task 1 alone ran QID_2, and stopped after its fourth run
            lines.append(to_line(at + 1, "smtp-out-1", QID_2))
        lines.append(other_line(at + 2, host, "did not issue MAIL/EXPN/VRFY/ETRN"))
        if run % 5 == 0:
            lines.append(other_line(at + 3, host, f"{QID}: queueup: cannot create ./tf{QID}, "
                                                  "euid=0: File exists"))
    return lines


async def test_a_restart_in_the_middle_of_a_backlog_changes_no_verdict(tmp_path: Path) -> None:
    """A watcher stopped half-way through the log and restarted from its state file ends with
    the same silent messages, hand-offs, tasks and error counts as one that read it all."""
    lines = _backlog(NOW - 3 * 3600)
    whole, halves = tmp_path / "whole.log", tmp_path / "halves.log"
    whole.write_text("\n".join(lines) + "\n")
    half = len(lines) // 2
    halves.write_text("\n".join(lines[:half]) + "\n")
    options = {"queue_silent_after": 2700}

    async def verdict(w: Any) -> dict[str, Any]:
        status = w.watch.queue_status()
        return {"silent": [m["queue_id"] for m in status["silent_messages"]],
                "tasks": [(t["task"], t["logging"], t["deferred_last_touched"])
                          for t in status["tasks"]],
                "deferred": w.value("mta_deferred_messages"),
                "silent_count": w.value("mta_deferred_silent_messages"),
                "silent_age": w.value("mta_oldest_silent_deferred_seconds")}

    async with watching(file_config(whole, **options), wall=lambda: NOW) as w:
        await until(lambda: w.value("maillog_lines_total", kind="to") == 16)
        expected = await verdict(w)
        handoffs = w.value("mta_queue_handoffs_total")
        errors = w.value("mta_queue_errors_total", kind="lock")
    assert expected["silent"] == [QID_2] and handoffs == 11 and errors == 3

    config = file_config(halves, state_file=str(tmp_path / "state.json"), **options)
    async with watching(config, wall=lambda: NOW) as w:
        await until(lambda: w.value("maillog_lines_total", kind="to") > 0
                    and w.watch.saved_source is not None
                    and w.watch.saved_source["offset"] == halves.stat().st_size)
        first_handoffs = w.value("mta_queue_handoffs_total")
        first_errors = w.value("mta_queue_errors_total", kind="lock")
    with halves.open("a") as fh:
        fh.write("\n".join(lines[half:]) + "\n")
    async with watching(config, wall=lambda: NOW) as w:
        await until(lambda: w.watch.saved_source is not None
                    and w.watch.saved_source["offset"] == halves.stat().st_size
                    and w.value("maillog_lines_total", kind="to") > 0)
        assert await verdict(w) == expected
        assert first_handoffs + w.value("mta_queue_handoffs_total") == handoffs
        assert first_errors + w.value("mta_queue_errors_total", kind="lock") == errors


# -- scan --queue ------------------------------------------------------------------------------


def test_scan_queue_shows_tasks_and_silence_against_now(tmp_path: Path) -> None:
    """`scan --queue --json`: each deferred message with every task that logged it and
    whether it is silent now, with the seconds since its last line; the summary counts silent
    messages, hand-offs, errors and lists the tasks."""
    log = tmp_path / "maillog"
    log.write_text("\n".join(_backlog(NOW - 3 * 3600)) + "\n")
    code, out, err = run_scan(["--file", str(log), "--queue", "--json"], clock=lambda: NOW)
    assert code == 1
    messages = {m["queue_id"]: m for m in map(json.loads, out.splitlines())}
    assert messages[QID_2]["tasks"] == ["smtp-out-1"]
    assert messages[QID_2]["silent"] is True
    assert messages[QID_2]["since_last_line"] == pytest.approx(3 * 3600 - 3 * 900 - 1)
    assert messages[QID]["tasks"] == ["smtp-out-1", "smtp-out-2"]
    assert (messages[QID]["first_task"], messages[QID]["last_task"]) == ("smtp-out-1",
                                                                         "smtp-out-2")
    assert messages[QID]["silent"] is False
    summary = json.loads(err.splitlines()[0])
    assert (summary["silent_messages"], summary["handoffs"]) == (1, 11)
    assert summary["queue_errors"] == {"lock": 3, "permission": 0, "space": 0, "other": 0}
    assert [t["task"] for t in summary["tasks"]] == ["smtp-out-2", "smtp-out-1"]

    code, out, err = run_scan(["--file", str(log), "--queue"], clock=lambda: NOW)
    head = next(x for x in out.splitlines() if QID_2 in x)
    assert head.endswith(" tasks=smtp-out-1 silent=true since_last_line=8099")
    assert "queue_summary deferred_messages=2 silent_messages=1 handoffs=11 " in err


def test_scan_queue_reads_bsd_syslog_lines_as_well(tmp_path: Path) -> None:
    """A classic /var/log/maillog (BSD timestamps: local time, no year) stamped relative to
    now: the same tasks, hand-offs and silence as RFC 3339 lines."""
    now = time.time()

    def bsd(line: str, at: float) -> str:
        return time.strftime("%b %e %H:%M:%S", time.localtime(at)) + line[len(ts(at)):]

    lines = [bsd(from_line(now - 5000, "smtp-out-1"), now - 5000),
             bsd(to_line(now - 5000, "smtp-out-1"), now - 5000),
             bsd(to_line(now - 4100, "smtp-out-2"), now - 4100),
             bsd(to_line(now - 4000, "smtp-out-1", QID_2), now - 4000),
             bsd(to_line(now - 100, "smtp-out-2", QID_2), now - 100)]
    log = tmp_path / "maillog"
    log.write_text("\n".join(lines) + "\n")
    code, out, err = run_scan(["--file", str(log), "--queue", "--json"], clock=lambda: now)
    assert code == 1
    messages = {m["queue_id"]: m for m in map(json.loads, out.splitlines())}
    assert (messages[QID]["tasks"], messages[QID]["silent"]) == (
        ["smtp-out-1", "smtp-out-2"], True)
    assert messages[QID]["since_last_line"] == pytest.approx(4100, abs=1)
    assert messages[QID_2]["silent"] is False
    summary = json.loads(err.splitlines()[0])
    assert (summary["silent_messages"], summary["handoffs"]) == (1, 2)


def test_scan_queue_id_shows_the_tasks_and_silence_of_one_message(tmp_path: Path) -> None:
    """`scan --queue-id --json`: the summary's message has its tasks and silence; the lines
    include the error lines of that id (how a stuck runner shows)."""
    log = tmp_path / "maillog"
    log.write_text("\n".join(_backlog(NOW - 3 * 3600)) + "\n")
    code, out, err = run_scan(["--file", str(log), "--queue-id", QID, "--json"],
                              clock=lambda: NOW)
    assert code == 1
    entries = [json.loads(x) for x in out.splitlines()]
    assert sum("File exists" in e["line"] for e in entries) == 3
    message = json.loads(err.splitlines()[0])["message"]
    assert message["tasks"] == ["smtp-out-1", "smtp-out-2"] and message["silent"] is False


def test_queue_silent_after_must_be_shorter_than_the_retention(tmp_path: Path) -> None:
    """A silence window the retention forgets first could never fire: one line naming it."""
    path = tmp_path / "selfcheckd.toml"
    path.write_text('[leakwatch]\nsource = "stdin"\nqueue_retention = 3600\n'
                    'queue_silent_after = 3600\n')
    with pytest.raises(ConfigError) as err:
        load_config(path, {})
    assert err.value.problems == [
        "leakwatch.queue_silent_after: must be shorter than leakwatch.queue_retention "
        "(3600 s): a message is forgotten before it could be silent"]
    path.write_text('[leakwatch]\nsource = "stdin"\nqueue_silent_after = 600\n')
    leakwatch = load_config(path, {}).config.leakwatch
    assert leakwatch is not None and leakwatch.queue_silent_after == 600


# -- over CloudWatch, and through the daemon's endpoints ---------------------------------------


def _ms(at: float) -> int:
    return int(at * 1000)


async def test_over_cloudwatch_each_log_stream_is_a_task(moto_url: str) -> None:
    """From CloudWatch, with one host name in both streams (the stream decides): a retry in
    task B's stream of what task A deferred is a hand-off, a message nobody retried since is
    silent, task A that stopped logging is not counted; `scan --cloudwatch --queue` says the
    same as the daemon."""
    now = time.time()
    host = "ip-10-0-1-5"
    await put(moto_url, TASK_A,
              (_ms(now - 1500), from_line(now - 1500, host)),
              (_ms(now - 1499), to_line(now - 1499, host)),
              (_ms(now - 1000), to_line(now - 1000, host, QID_2)))
    await put(moto_url, TASK_B,
              (_ms(now - 1200), to_line(now - 1200, host)),
              (_ms(now - 60), to_line(now - 60, host, QID_2)))
    config = LeakWatchConfig(cloudwatch=cloudwatch(moto_url), queue_silent_after=600)
    async with watching(config, wall=lambda: now) as w:
        await until(lambda: w.value("mta_deliveries_total", result="deferred") == 4,
                    timeout=30)
        assert w.value("mta_queue_handoffs_total") == 2
        assert w.value("mta_deferred_silent_messages") == 1
        assert w.value("mta_oldest_silent_deferred_seconds") == pytest.approx(1200, abs=0.01)
        assert w.value("mta_tasks_logging") == 1
        status = w.watch.queue_status()
        assert [(m["queue_id"], m["last_task"]) for m in status["silent_messages"]] == [
            (QID, TASK_B)]
        assert [(t["task"], t["logging"], t["deferred_last_touched"])
                for t in status["tasks"]] == [(TASK_B, True, 2), (TASK_A, False, 0)]

    code, out, err = await asyncio.to_thread(
        run_scan, ["--cloudwatch", "--since", "1h", "--queue", "--json"], config,
        clock=lambda: now)
    assert code == 1
    messages = {m["queue_id"]: m for m in map(json.loads, out.splitlines())}
    assert (messages[QID]["tasks"], messages[QID]["silent"]) == ([TASK_A, TASK_B], True)
    assert messages[QID]["since_last_line"] == pytest.approx(1200, abs=0.01)
    assert (messages[QID_2]["tasks"], messages[QID_2]["silent"]) == ([TASK_A, TASK_B], False)
    summary = json.loads(err.splitlines()[0])
    assert (summary["silent_messages"], summary["handoffs"]) == (1, 2)
    assert [(t["task"], t["logging"]) for t in summary["tasks"]] == [
        (TASK_B, True), (TASK_A, False)]


async def test_the_daemon_shows_the_shared_queue_in_status_and_metrics(tmp_path: Path) -> None:
    """`selfcheckd run` with a [leakwatch] file source: GET /status has leakwatch.queue (silent
    messages, hand-offs, tasks, errors by kind with their latest line) and GET /metrics the
    five shared-queue series, every queue error kind from 0."""
    now = time.time()
    log = tmp_path / "maillog"
    log.write_text("\n".join([
        from_line(now - 3000, "smtp-out-1"), to_line(now - 2999, "smtp-out-1"),
        to_line(now - 2000, "smtp-out-2"),
        other_line(now - 30, "smtp-out-2", f"{QID_2}: queueup: cannot create ./tf{QID_2}, "
                                           "euid=0: File exists"),
    ]) + "\n")
    config_path = tmp_path / "selfcheckd.toml"
    config_path.write_text(
        '[server]\nlisten = "127.0.0.1:0"\n'
        f'[leakwatch]\nsource = "file"\nqueue_silent_after = 600\n'
        f'file = {{ path = "{log}", from_beginning = true, poll_interval = 0.05 }}\n')
    daemon = Daemon(load_config(config_path, {}))
    await daemon.start()
    try:
        await until(lambda: daemon.metrics.registry.get_sample_value(
            "mta_queue_errors_total", {"kind": "lock"}) == 1)
        code, body = await get(daemon.listen_port, "/status")
        assert code == 200
        queue = json.loads(body)["leakwatch"]["queue"]
        assert queue["silent_after"] == 600 and queue["handoffs"] == 1
        assert [(m["queue_id"], m["last_task"]) for m in queue["silent_messages"]] == [
            (QID, "smtp-out-2")]
        assert queue["silent_messages"][0]["seconds_since_last_line"] >= 2000
        assert [(t["task"], t["logging"], t["deferred_last_touched"])
                for t in queue["tasks"]] == [("smtp-out-2", True, 1), ("smtp-out-1", False, 0)]
        assert queue["errors"]["counts"] == {"lock": 1, "permission": 0, "space": 0,
                                             "other": 0}
        [lock] = queue["errors"]["recent"]["lock"]
        assert (lock["task"], lock["queue_id"]) == ("smtp-out-2", QID_2)
        assert lock["line"].endswith("File exists")

        m = samples((await get(daemon.listen_port, "/metrics"))[1])
        assert m[("mta_deferred_silent_messages", ())] == 1
        assert m[("mta_oldest_silent_deferred_seconds", ())] >= 2000
        assert m[("mta_queue_handoffs_total", ())] == 1
        assert m[("mta_tasks_logging", ())] == 1
        assert {kind: m[("mta_queue_errors_total", (("kind", kind),))]
                for kind in ("lock", "permission", "space", "other")} == {
            "lock": 1, "permission": 0, "space": 0, "other": 0}
    finally:
        await daemon.shutdown()
