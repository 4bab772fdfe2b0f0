"""The shared-queue watch against real sendmail tasks: hand-offs, silence, queue errors.

The leak watcher follows the cluster's mail log (every task's lines, each with its own
host name) as `selfcheckd run` follows /var/log/maillog; its wall clock is injected
where a verdict depends on time (silence), so no test waits 45 minutes.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from daemon.logwatch.config import LeakWatchConfig
from tests.logwatch.harness import run_scan, watching
from tests.waiting import until

from .cluster_lab import ClusterLab

SENDER = "qp-test-2026-05@sub.example.com"
LOG_WAIT = 30.0

LabFactory = Callable[..., ClusterLab]


def _follow(lab: ClusterLab, **extra: Any) -> dict[str, Any]:
    """The leak watcher on the cluster's mail log, from its first line."""
    return {"source": "file", "file": {"path": str(lab.collector.maillog), "poll_interval": 0.05,
                                       "from_beginning": True}, **extra}


async def test_a_message_deferred_by_one_task_and_retried_by_another_is_one_handoff(
    cluster_lab_factory: LabFactory, tmp_path: Path,
) -> None:
    """Task 1 defers it, task 2's queue run retries it over the shared queue: one hand-off,
    and the message lists both tasks; a replacement's retry while the watcher is stopped is
    the next hand-off once it restarts from its state file (the restart changes nothing)."""
    lab = await asyncio.to_thread(cluster_lab_factory, interval="1h")
    one, two = lab.tasks
    config = _follow(lab, state_file=str(tmp_path / "state.json"))
    async with watching(config) as w:
        qid = await asyncio.to_thread(lab.cluster.submit, one, SENDER, ["nobody-40@sinkhole.test"])
        await until(lambda: w.value("mta_deferred_messages") == 1, timeout=LOG_WAIT)
        await asyncio.to_thread(lab.settled, qid)
        assert w.value("mta_queue_handoffs_total") == 0

        await asyncio.to_thread(lab.cluster.queue_run, two)
        await until(lambda: w.value("mta_deliveries_total", result="deferred") == 2,
                    timeout=LOG_WAIT)
        assert w.value("mta_queue_handoffs_total") == 1
        msg = w.watch.queue.get(qid)
        assert msg is not None
        assert (msg.tasks, msg.last_task) == (["smtp-out-1", "smtp-out-2"], "smtp-out-2")
        assert w.value("mta_tasks_logging") == 2

    read = lab.attempts(qid)
    three = await asyncio.to_thread(lab.cluster.replace, one)
    await asyncio.to_thread(lab.settled, qid)
    await asyncio.to_thread(lab.cluster.queue_run, three)
    await asyncio.to_thread(lab.sync)
    new = lab.attempts(qid)[len(read):]
    assert new and {host for host, _ in new} == {"smtp-out-3"}
    async with watching(config) as w:
        await until(lambda: w.value("mta_deliveries_total", result="deferred") == len(new),
                    timeout=LOG_WAIT)
        assert w.value("mta_queue_handoffs_total") == 1  # and no line read twice
        msg = w.watch.queue.get(qid)
        assert msg is not None and msg.last_task == "smtp-out-3"
        assert msg.tasks == ["smtp-out-1", "smtp-out-2", "smtp-out-3"]
        assert w.value("mta_deferred_silent_messages") == 0


async def test_without_a_shared_queue_a_stopped_tasks_message_goes_silent(
    cluster_lab_factory: LabFactory, tmp_path: Path,
) -> None:
    """The negative case: each task has its own queue. Task 1 defers a message and is
    replaced; the other tasks run their queues and never see it. Once queue_silent_after has
    passed (on the injected clock) it is silent, and `scan --queue-id` shows why: its last
    line is task 1's, and task 1 logs nothing any more."""
    lab = await asyncio.to_thread(cluster_lab_factory, shared_queue=False, interval="1h")
    one, two = lab.tasks
    skew = [0.0]  # seconds the injected wall clock is ahead of the real one
    config = _follow(lab, queue_silent_after=600)
    async with watching(config, wall=lambda: time.time() + skew[0]) as w:
        qid = await asyncio.to_thread(lab.cluster.submit, one, SENDER, ["nobody-41@sinkhole.test"])
        await until(lambda: w.value("mta_deferred_messages") == 1, timeout=LOG_WAIT)
        await asyncio.to_thread(lab.settled, qid)
        three = await asyncio.to_thread(lab.cluster.replace, one)
        for task in (two, three):
            await asyncio.to_thread(lab.cluster.queue_run, task)
        await asyncio.to_thread(lab.sync)
        await until(lambda: w.value("mta_tasks_logging") == 3, timeout=LOG_WAIT)
        assert w.value("mta_deferred_silent_messages") == 0

        skew[0] = 601.0  # ten minutes on: no task has retried it (judged at the next read)
        await until(lambda: w.value("mta_deferred_silent_messages") == 1, timeout=LOG_WAIT)
        assert w.value("mta_oldest_silent_deferred_seconds") > 601
        status = w.watch.queue_status()
        assert [(m["queue_id"], m["last_task"]) for m in status["silent_messages"]] == [
            (qid, "smtp-out-1")]
        assert w.value("mta_queue_handoffs_total") == 0

    log = tmp_path / "maillog"
    log.write_text(lab.text())
    scan_config = LeakWatchConfig(queue_silent_after=600)
    code, out, err = run_scan(["--file", str(log), "--queue-id", qid, "--json"], scan_config,
                              clock=lambda: time.time() + 601)
    assert code == 1
    hosts = [json.loads(x)["host"] for x in out.splitlines()]
    assert hosts and set(hosts) == {"smtp-out-1"}
    message = json.loads(err.splitlines()[0])["message"]
    assert message["silent"] is True and message["tasks"] == ["smtp-out-1"]
    code, out, err = run_scan(["--file", str(log), "--queue", "--json"], scan_config,
                              clock=lambda: time.time() + 601)
    summary = json.loads(err.splitlines()[0])
    assert summary["silent_messages"] == 1
    logging = {t["task"]: t["deferred_last_touched"] for t in summary["tasks"]}
    assert logging == {"smtp-out-1": 1, "smtp-out-2": 0, "smtp-out-3": 0}


async def test_permission_and_lock_errors_on_the_shared_queue_are_counted_by_kind(
    cluster_lab_factory: LabFactory,
) -> None:
    """Live: a queue directory chowned away from a root-squashed sendmail, and a queue runner
    reaching a message another task's runner holds, count as permission and lock errors;
    /status keeps the lines with their tasks."""
    lab = await asyncio.to_thread(cluster_lab_factory, dac_override=False, log_level=20,
                                  interval="1h")
    one, two = lab.tasks
    queue = lab.cluster.queue_dir
    async with watching(_follow(lab)) as w:
        qid = await asyncio.to_thread(lab.cluster.submit, one, SENDER, ["nobody-42@sinkhole.test"])
        await until(lambda: w.value("mta_deferred_messages") == 1, timeout=LOG_WAIT)
        await asyncio.to_thread(lab.settled, qid)
        assert w.value("mta_queue_errors_total", kind="permission") == 0

        os.chown(queue, 65534, 65534)
        try:
            await asyncio.to_thread(lab.cluster.queue_run, two, check=False)
        finally:
            os.chown(queue, 0, 0)
        await until(lambda: w.value("mta_queue_errors_total", kind="permission") == 1,
                    timeout=LOG_WAIT)
        recent = w.watch.queue_status()["errors"]["recent"]["permission"]
        assert recent[-1]["task"] == "smtp-out-2"
        assert "can not chdir(" in recent[-1]["line"]

        with lab.sinkhole.stalled():  # task 1's runner holds the message meanwhile
            holder = asyncio.create_task(asyncio.to_thread(lab.cluster.queue_run, one))
            await until(lambda: lab.sinkhole.waiting() == 1, timeout=LOG_WAIT)
            await asyncio.to_thread(lab.cluster.queue_run, two)
            lab.sinkhole.handler.stall.clear()
            await holder
        await until(lambda: w.value("mta_queue_errors_total", kind="lock") == 1,
                    timeout=LOG_WAIT)
        lock = w.watch.queue_status()["errors"]["recent"]["lock"][-1]
        assert (lock["task"], lock["queue_id"]) == ("smtp-out-2", qid)
        assert w.value("mta_queue_errors_total", kind="space") == 0
        assert w.value("mta_queue_errors_total", kind="other") == 0
