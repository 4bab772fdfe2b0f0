"""What real sendmail 8.17 logs when the shared queue itself goes wrong, provoked on the cluster.

Each test provokes one of the situations Cabalmail's soak watches for, on two real
sendmail daemons over one queue directory, and checks the lines sendmail wrote. With
SELFCHECKD_REFRESH_QUEUE_ERRORS=1 each test also saves its window of the cluster's log as
tests/integration/data/queue-errors/<name>.log (the fixtures the queue-error parser is
built and unit-tested against; see the README there). Each test also checks that
`scan --queue` counts them by kind.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from daemon.embedded.processes import binary, wait_until
from daemon.embedded.sendmail_config import SubmitRefused
from tests.logwatch.harness import run_scan

from .cluster_lab import LOG_WAIT, ClusterLab

SENDER = "qp-test-2026-05@sub.example.com"
SAMPLES = Path(__file__).parent / "data" / "queue-errors"
REFRESH = "SELFCHECKD_REFRESH_QUEUE_ERRORS"

LabFactory = Callable[..., ClusterLab]


def _finish(lab: ClusterLab, name: str, since: int, tmp_path: Path) -> dict[str, int]:
    """Save the window (when asked); what `scan --queue` counts in it by kind."""
    lab.sync()
    text = lab.text(since)
    if os.environ.get(REFRESH) == "1":
        (SAMPLES / f"{name}.log").write_text(text)
    log = tmp_path / f"{name}.log"
    log.write_text(text)
    _, _, err = run_scan(["--file", str(log), "--queue", "--json"])
    counts: dict[str, int] = json.loads(err.splitlines()[0])["queue_errors"]
    return counts


def _deferred(lab: ClusterLab, recipient: str) -> str:
    """Submit one message to the first task; wait for its deferral and the rewrite of its
    queue file; its queue id."""
    qid = lab.cluster.submit(lab.tasks[0], SENDER, [recipient])
    lab.wait_for_line(rf"{qid}: to=.*stat=Deferred")
    lab.settled(qid)
    return qid


@contextmanager
def _chattr(path: Path, flag: str) -> Iterator[None]:
    """An ext4 attribute on the queue directory (`a`: no rename or unlink in it)."""
    subprocess.run([binary("chattr"), f"+{flag}", str(path)], check=True)
    try:
        yield
    finally:
        subprocess.run([binary("chattr"), f"-{flag}", str(path)], check=True)


def test_two_queue_runners_on_one_message_and_a_leftover_temp_file(
    cluster_lab_factory: LabFactory, tmp_path: Path,
) -> None:
    """A runner that reaches a message another task's runner holds logs `queueup: locked`
    (LogLevel 20 and up only); a runner that cannot write the message's temp file because
    one is left over logs `queueup: cannot create ./tf...: File exists` (any LogLevel)."""
    lab = cluster_lab_factory(log_level=20, interval="1h")
    one, two = lab.tasks
    qid = _deferred(lab, "nobody-30@sinkhole.test")
    since = lab.offset()
    with lab.sinkhole.stalled():
        holder = threading.Thread(target=lab.cluster.queue_run, args=(one,))
        holder.start()
        try:  # task 1's runner is in the middle of delivering it: it holds the qf lock
            wait_until(lambda: True if lab.sinkhole.waiting() else None, timeout=LOG_WAIT,
                       what="task 1's runner to reach the sinkhole")
            out = lab.cluster.queue_run(two)
        finally:
            lab.sinkhole.handler.stall.clear()
            holder.join(timeout=LOG_WAIT)
    assert f"{qid}: locked" in out  # what `sendmail -q -v` says about it
    lab.wait_for_line(rf"^\S+ smtp-out-2 sendmail\[\d+\]: {qid}: queueup: locked$", since=since)

    # A temp file of a runner killed mid-write (a task SIGKILLed after its stop timeout)
    # stays behind on the shared queue; the next runner cannot rewrite the message.
    leftover = one.queue_dir / f"tf{qid}"
    leftover.write_text("")
    try:
        lab.cluster.exec(two, ["timeout", "8", binary("sendmail"), "-C", str(two.cf),
                               f"-qI{qid}", "-OMinQueueAge=0"], check=False)
        lab.wait_for_line(rf"{qid}: queueup: cannot create \./tf{qid}, euid=0: File exists$",
                          since=since)
    finally:
        leftover.unlink(missing_ok=True)
    counts = _finish(lab, "lock", since, tmp_path)
    assert counts["lock"] >= 2 and counts["permission"] == counts["space"] == 0


def test_a_queue_directory_with_the_wrong_owner_mode_or_attributes(
    cluster_lab_factory: LabFactory, tmp_path: Path,
) -> None:
    """The "perms desynced" signal: with the queue directory owned by another user, a new
    message cannot be written and a queue run cannot enter the queue; where files cannot be
    renamed the rewritten queue file is lost; a world-writable qf is quarantined."""
    lab = cluster_lab_factory(dac_override=False, interval="1h")
    one, two = lab.tasks
    queue = lab.cluster.queue_dir
    qid = _deferred(lab, "nobody-31@sinkhole.test")
    since = lab.offset()

    os.chown(queue, 65534, 65534)  # nobody: what an access point's owner drifting does
    try:
        with pytest.raises(SubmitRefused, match=r"421 .*collect: Cannot write .*Permission"):
            lab.cluster.submit(one, SENDER, ["nobody-32@sinkhole.test"])
        lab.cluster.queue_run(two, check=False)
    finally:
        os.chown(queue, 0, 0)
    lab.wait_for_line(r"SYSERR\(root\): collect: Cannot write \./df\w+ \(bfcommit, uid=0, "
                      r"gid=0\): Permission denied$", since=since)
    lab.wait_for_line(rf"NOQUEUE: SYSERR\(root\): can not chdir\({re.escape(str(queue))}/\): "
                      r"Permission denied$", since=since)

    with _chattr(queue, "a"):
        lab.cluster.queue_run(two, check=False)
    lab.wait_for_line(rf"{qid}: SYSERR\(root\): cannot rename\(\./tf{qid}, \./qf{qid}\), "
                      r"uid=0: Operation not permitted$", since=since)
    (queue / f"tf{qid}").unlink(missing_ok=True)  # what the failed rename left

    (queue / f"qf{qid}").chmod(0o666)
    lab.cluster.queue_run(two, check=False)
    lab.wait_for_line(rf"{qid}: bogus queue file, uid=0, gid=0, mode=100666$", since=since)
    lab.wait_for_line(rf"{qid}: Losing \./qf{qid}: bogus file uid/gid in mqueue$", since=since)
    assert (queue / f"Qf{qid}").exists() and not (queue / f"qf{qid}").exists()
    counts = _finish(lab, "permission", since, tmp_path)
    assert counts["permission"] >= 4 and counts["other"] >= 1
    assert counts["lock"] == counts["space"] == 0


def test_a_full_or_read_only_queue_directory(
    cluster_lab_factory: LabFactory, tmp_path: Path,
) -> None:
    """A full queue filesystem refuses new mail and the rewrite of a deferred message; a
    task started on it refuses mail for low space; a task whose queue mount is read-only
    cannot open a queue file."""
    lab = cluster_lab_factory(queue_size="1m", interval="1h")
    one, two = lab.tasks
    queue = lab.cluster.queue_dir
    qid = _deferred(lab, "nobody-33@sinkhole.test")
    since = lab.offset()
    _fill(queue / "filler")
    with pytest.raises(SubmitRefused, match=r"421 4\.3\.1 Out of disk space for temp file"):
        lab.cluster.submit(one, SENDER, ["nobody-34@sinkhole.test"])
    lab.wait_for_line(r"SYSERR\(root\): Out of disk space for temp file$", since=since)
    lab.cluster.queue_run(two, check=False)
    lab.wait_for_line(rf"{qid}: SYSERR\(root\): Error writing control file \./tf{qid}: "
                      r"No space left on device$", since=since)
    (queue / f"tf{qid}").unlink(missing_ok=True)

    three = lab.cluster.start_task()  # sendmail reads the free space at start
    lab.wait_for_line(rf"^\S+ {three.name} sendmail\[\d+\]: \w+: low on space \(SMTP-DAEMON "
                      rf"needs 0 bytes \+ 100 blocks in {re.escape(str(queue))}\), max avail: 0$",
                      since=since)
    lab.wait_for_line(rf"^\S+ {three.name} sendmail\[\d+\]: rejecting new messages: min free: "
                      r"100$", since=since)
    (queue / "filler").unlink()

    # Task 2's view of the queue turns read-only (its mount, not the others').
    lab.cluster.exec(two, [binary("mount"), "--bind", str(queue), str(queue)])
    lab.cluster.exec(two, [binary("mount"), "-o", "remount,bind,ro", str(queue)])
    lab.cluster.queue_run(two, check=False)
    lab.wait_for_line(rf"^\S+ smtp-out-2 sendmail\[\d+\]: {qid}: SYSERR\(root\): readqf: "
                      rf"no control file \./qf{qid}: Read-only file system$", since=since)
    counts = _finish(lab, "space", since, tmp_path)
    assert counts["space"] >= 5 and counts["permission"] == counts["lock"] == 0


def _fill(path: Path) -> None:
    """Write to `path` until its filesystem is full."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 65536)
    except OSError as exc:
        if exc.errno != 28:  # ENOSPC: full, as wanted
            raise
    finally:
        os.close(fd)
