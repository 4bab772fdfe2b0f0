"""An in-memory cluster of sendmail-like tasks, a mode store and a clock for the drill engine.

The cluster models what the drill relies on: a submitted message is queued and
tried at once against the sinkhole's mode (deferred with 421 4.3.2 in defer);
`mailq` prints sendmail's format; a queue run delivers what the sinkhole now
accepts; a stopped task is replaced. With `shared=False` every task has its
own queue, so a replacement starts empty (the bug the drill exists to find).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any

from daemon.config import SmtpSettings
from daemon.drill.config import DrillConfig
from daemon.drill.driver import DrillAbortedError, ExecUnavailableError, LogLine, Recorder, Steady

DEFER_STATUS = "Deferred: 421 4.3.2 Service temporarily unavailable"


class ManualClock:
    """A clock whose sleep returns at once, having moved time forward."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def wall(self) -> float:
        return 1_800_000_000.0 + self.now

    async def sleep(self, delay: float) -> None:
        self.slept.append(delay)
        self.now += max(0.0, delay)
        await asyncio.sleep(0)


class FakeModes:
    """The sinkhole mode; `fail_from` makes every call after the n-th write fail."""

    def __init__(self, mode: str | None = "defer") -> None:
        self.mode = mode
        self.writes: list[str] = []
        self.failing = False
        self.fail_writes_after: int | None = None  # writes that succeed before failing
        self.failures_left: int | None = None  # failed calls before it answers again
        self.on_write: Callable[[str], None] | None = None
        # From this write on (1-based), every write hangs until cancelled (a blackholed
        # SSM endpoint); on_hang is told when one starts hanging.
        self.hang_from: int | None = None
        self.on_hang: Callable[[], None] | None = None
        self.calls = 0  # writes attempted

    def describe(self) -> str:
        return "ssm:/cabal/sinkhole_mode"

    def _fail(self) -> bool:
        if not self.failing:
            return False
        if self.failures_left is not None:
            if self.failures_left <= 0:
                self.failing = False
                return False
            self.failures_left -= 1
        return True

    async def read(self) -> str | None:
        if self._fail():
            raise DrillAbortedError("SSM GetParameter /cabal/sinkhole_mode: no answer in time")
        return self.mode

    async def write(self, mode: str) -> None:
        self.calls += 1
        if self.hang_from is not None and self.calls >= self.hang_from:
            if self.on_hang is not None:
                self.on_hang()
            await asyncio.Event().wait()
        if self.fail_writes_after is not None and len(self.writes) >= self.fail_writes_after:
            self.failing = True
            self.fail_writes_after = None
        if self._fail():
            raise DrillAbortedError("SSM PutParameter /cabal/sinkhole_mode: no answer in time")
        self.writes.append(mode)
        self.mode = mode
        if self.on_write is not None:
            self.on_write(mode)

    async def close(self) -> None:
        return None


@dataclass
class Message:
    qid: str
    sender: str
    recipient: str
    status: str | None = None


@dataclass
class FakeCluster:
    modes: FakeModes
    replicas: int = 2
    shared: bool = True
    exec_enabled: bool = True
    lose_queue_on_replacement: bool = False
    name: str = "fake"
    delivered: list[Message] = field(default_factory=list)
    log: list[LogLine] = field(default_factory=list)
    calls: list[tuple[str, str]] = field(default_factory=list)
    hooks: dict[str, Callable[[], None]] = field(default_factory=dict)
    # What a task's mailq prints instead of its queue (Debian's mailq exits 0 on errors).
    mailq_says: dict[str, str] = field(default_factory=dict)
    closed: bool = False

    def __post_init__(self) -> None:
        self._ids = itertools.count(1)
        self._qids = itertools.count(100001)
        self.shared_queue: dict[str, Message] = {}
        self.queues: dict[str, dict[str, Message]] = {}
        for _ in range(self.replicas):
            self._start_task()

    def _start_task(self, empty: bool = False) -> str:
        task = f"task-{next(self._ids)}"
        self.queues[task] = {} if (empty or not self.shared) else self.shared_queue
        return task

    def _hook(self, name: str) -> None:
        hook = self.hooks.pop(name, None)
        if hook is not None:
            hook()

    # -- what the drill's send reaches ---------------------------------------------------

    def submit(self, sender: str, recipient: str) -> str:
        task = sorted(self.queues)[0]
        msg = Message(qid=f"6ANJUQna{next(self._qids)}", sender=sender, recipient=recipient)
        self.queues[task][msg.qid] = msg
        self._attempt(task, msg)
        return msg.qid

    def _attempt(self, task: str, msg: Message) -> None:
        mode = self.modes.mode
        if mode in ("accept", "accept-log"):
            self.queues[task].pop(msg.qid, None)
            self.delivered.append(msg)
            self.log.append(LogLine(f"sendmail[1]: {msg.qid}: to=<{msg.recipient}>, "
                                    "stat=Sent (2.0.0 Message accepted for discard)", task))
        else:
            msg.status = DEFER_STATUS
            self.log.append(LogLine(f"sendmail[1]: {msg.qid}: to=<{msg.recipient}>, "
                                    f"stat={DEFER_STATUS}", task))

    async def send(self, _smtp: SmtpSettings, msg: EmailMessage, sender: str, recipient: str,
                   _timeout: float) -> str:
        self._hook("send")
        qid = self.submit(sender, recipient)
        return f"2.0.0 {qid} Message accepted for delivery"

    # -- the Cluster protocol ------------------------------------------------------------

    async def open(self, record: Recorder) -> None:
        self.record = record

    async def close(self, interrupted: bool = False) -> None:
        self.closed = True

    async def tasks(self) -> list[str]:
        return sorted(self.queues)

    def can_exec(self, task: str) -> bool:
        return self.exec_enabled

    async def mailq(self, task: str) -> str:
        self.calls.append(("mailq", task))
        self._hook(f"mailq:{len([c for c in self.calls if c[0] == 'mailq'])}")
        await asyncio.sleep(0)
        if not self.exec_enabled:
            raise ExecUnavailableError(task)
        if task in self.mailq_says:
            return self.mailq_says[task]
        return format_mailq(self.queues[task])

    async def run_queue(self, task: str) -> str:
        self.calls.append(("run_queue", task))
        self._hook("run_queue")
        ran = list(self.queues[task].values())
        for msg in ran:
            self._attempt(task, msg)
        return "".join(f"Running /var/spool/mqueue/{msg.qid} (sequence {i} of {len(ran)})\n"
                       for i, msg in enumerate(ran, 1))

    async def stop_task(self, task: str, reason: str) -> None:
        self.calls.append(("stop_task", task))
        self._hook("stop_task")
        del self.queues[task]
        self._start_task(empty=self.lose_queue_on_replacement)

    async def wait_steady(self, timeout: float, gone: str) -> Steady:
        self._hook("wait_steady")
        await asyncio.sleep(0)
        tasks = sorted(self.queues)
        return Steady(tasks=tasks, desired=self.replicas, running=len(tasks))


def format_mailq(queue: dict[str, Message]) -> str:
    """`mailq` as sendmail 8.17 prints it."""
    if not queue:
        return "/var/spool/mqueue is empty\n\t\tTotal requests: 0\n"
    lines = [f"\t\t/var/spool/mqueue ({len(queue)} request)",
             "-----Q-ID----- --Size-- -----Q-Time----- "
             "------------Sender/Recipient-----------"]
    for msg in queue.values():
        lines.append(f"{msg.qid}      237 Mon Nov 23 19:30 <{msg.sender}>")
        if msg.status:
            lines.append(f"                 ({msg.status})")
        lines.append(f"\t\t\t\t\t <{msg.recipient}>")
    lines.append(f"\t\tTotal requests: {len(queue)}")
    return "\n".join(lines) + "\n"


class FakeLogs:
    """The cluster's log as a per-task log source (ECS log streams)."""

    per_task = True

    def __init__(self, cluster: FakeCluster) -> None:
        self.cluster = cluster

    def describe(self) -> str:
        return "cloudwatch:/ecs/cabal-smtp-out"

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def search(self, term: str, since: float) -> list[LogLine]:
        return [line for line in self.cluster.log if term in line.text]


def drill_config(**overrides: Any) -> DrillConfig:
    base: dict[str, Any] = {
        "driver": "ecs", "environment": "stage", "sender": "qp-test-drill@example.com",
        "mode_cache": 30, "settle_timeout": 300, "queue_timeout": 60, "retry_timeout": 600,
        "poll_interval": 2, "cleanup_timeout": 120,
    }
    base.update(overrides)
    return DrillConfig.model_validate(base)


SMTP = SmtpSettings.model_validate({"host": "127.0.0.1", "port": 2525, "security": "none"})
