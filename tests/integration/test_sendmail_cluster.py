"""The shared-queue cluster behaves like Cabalmail's smtp-out tasks on one EFS spool."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from daemon.embedded.processes import wait_until

from .cluster_lab import LOG_WAIT, ClusterLab

SENDER = "qp-test-2026-05@sub.example.com"

LabFactory = Callable[..., ClusterLab]


def test_tasks_share_one_queue_and_log_under_their_own_host(
    cluster_lab_factory: LabFactory,
) -> None:
    """A message deferred by task 1 is in task 2's queue too; task 2's queue run retries it
    and delivers it once the sinkhole accepts, each line carrying the task's host name."""
    lab = cluster_lab_factory()
    one, two = lab.tasks
    qid = lab.cluster.submit(one, SENDER, ["nobody-1@sinkhole.test"])
    lab.wait_for_line(rf"{qid}: to=.*stat=Deferred")
    assert qid in lab.cluster.mailq(two)  # mailq run inside task 2
    assert one.queue_ids() == two.queue_ids() == [qid]

    lab.cluster.queue_run(two)
    lab.set_mode("accept")
    lab.cluster.queue_run(two)
    lab.wait_for_line(rf"{qid}: to=.*stat=Sent")
    assert lab.attempts(qid) == [
        ("smtp-out-1", "Deferred: 421 4.3.2 Service temporarily unavailable"),
        ("smtp-out-2", "Deferred: 421 4.3.2 Service temporarily unavailable"),
        ("smtp-out-2", "Sent (2.0.0 Message accepted for discard)"),
    ]
    # The queue-add line is task 1's; each task's stream holds only its own lines.
    lab.wait_for_line(rf"^\S+ smtp-out-1 sendmail\[\d+\]: {qid}: from=<{re.escape(SENDER)}>")
    wait_until(lambda: True if not one.queue_ids() else None, timeout=LOG_WAIT,
               what=f"{qid} to leave the shared queue")
    lab.sync()
    for task in (one, two):
        stream = (lab.collector.streams / f"{task.name}.log").read_text()
        hosts = {line.split()[1] for line in stream.splitlines()}
        assert hosts == {task.name}
        assert task.maillog.read_text() == stream  # the task's own /var/log/maillog


def test_a_replacement_task_runs_the_same_queue_under_a_new_name(
    cluster_lab_factory: LabFactory,
) -> None:
    """Stopping a task (SIGTERM to its group) leaves no process of it; its replacement has a
    new name and retries the message its predecessor deferred."""
    lab = cluster_lab_factory()
    one, _ = lab.tasks
    qid = lab.cluster.submit(one, SENDER, ["nobody-2@sinkhole.test"])
    lab.wait_for_line(rf"{qid}: to=.*stat=Deferred")
    pid = int((one.directory / "task.pid").read_text())

    three = lab.cluster.replace(one)
    assert one.exit_code == 0  # stopped, not crashed
    assert not Path(f"/proc/{pid}").exists()
    assert three.name == "smtp-out-3" and [t.name for t in lab.tasks] == ["smtp-out-2",
                                                                          "smtp-out-3"]
    assert qid in lab.cluster.mailq(three)
    lab.cluster.queue_run(three)
    lab.wait_for_line(rf"^\S+ smtp-out-3 sendmail\[\d+\]: {qid}: to=.*stat=Deferred")


def test_tasks_without_a_shared_queue_do_not_see_each_others_mail(
    cluster_lab_factory: LabFactory,
) -> None:
    """The negative case: with one queue directory per task, a message deferred by task 1
    is not in task 2's queue, and is gone for good when task 1 is replaced."""
    lab = cluster_lab_factory(shared_queue=False)
    one, two = lab.tasks
    qid = lab.cluster.submit(one, SENDER, ["nobody-3@sinkhole.test"])
    lab.wait_for_line(rf"{qid}: to=.*stat=Deferred")
    assert one.queue_ids() == [qid]
    assert two.queue_ids() == []
    assert qid not in lab.cluster.mailq(two)
    three = lab.cluster.replace(one)
    assert three.queue_ids() == []
