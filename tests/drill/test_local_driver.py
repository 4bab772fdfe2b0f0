"""The local driver with real processes: shell commands standing in for sendmail tasks."""

from __future__ import annotations

import asyncio
from pathlib import Path

from daemon.drill.config import LocalDriver
from daemon.drill.drivers.local import LocalCluster

# Debian's `mailq -C CF`: exit 0 whether or not it could read CF (its `|| true`).
DEBIAN_MAILQ = ("if [ -e \"$1\" ]; then printf '/q is empty\\n\\t\\tTotal requests: 0\\n'; "
                "else echo \"$1: line 0: cannot open: No such file or directory\"; fi; exit 0")


async def test_a_task_is_steady_only_once_its_mailq_lists_a_queue(tmp_path: Path) -> None:
    """A start command that writes {task_dir}/sendmail.cf only after some preparation: while
    Debian's mailq (exit 0) says `cannot open`, the task is not steady; open() returns
    once every task's mailq answers with a queue listing."""
    go = tmp_path / "go"
    start = ["sh", "-c", 'while [ ! -e "$2" ]; do sleep 0.05; done; : > "$1/sendmail.cf"; '
             "exec sleep 60", "task", "{task_dir}", str(go)]
    cfg = LocalDriver(start=start, mailq=["sh", "-c", DEBIAN_MAILQ, "mailq",
                                          "{task_dir}/sendmail.cf"],
                      run_queue=["true"], replicas=2, work_dir=tmp_path / "work", stop_grace=1)
    polls: list[float] = []

    async def sleep(delay: float) -> None:  # the driver polled: now let the tasks get ready
        polls.append(delay)
        go.touch()
        await asyncio.sleep(0.05)

    cluster = LocalCluster(cfg, settle_timeout=30, sleep=sleep)
    await cluster.open(lambda _call: None)
    try:
        tasks = await cluster.tasks()
        assert len(tasks) == 2 and polls
        for task in tasks:
            assert "Total requests: 0" in await cluster.mailq(task)
    finally:
        await cluster.close()
