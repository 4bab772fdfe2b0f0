"""What the drill needs from a cluster, a mode store and a log source: three small protocols.

The steps (daemon/drill/steps.py) speak only these, so the same steps run
against ECS (drivers/ecs.py), processes on this machine (drivers/local.py) and
the tests' in-memory cluster.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

# Every driver call reports itself (for the journal's "API calls made").
Recorder = Callable[[dict[str, Any]], None]


class DrillFailedError(Exception):
    """The queue did not behave (exit 1): a message missing, not delivered, delivered twice."""


class DrillAbortedError(Exception):
    """The environment stopped the drill (exit 3): no settle, an API unreachable, a timeout."""


class DrillRefusedError(Exception):
    """The drill must not run here (exit 2): prod, no harness, another drill running."""


class ExecUnavailableError(Exception):
    """This task cannot run a command (ECS Exec not enabled): use the log source instead."""


@dataclass(frozen=True)
class Steady:
    """A settled service: its running tasks, and how many it wants."""

    tasks: list[str]
    desired: int
    running: int


class Cluster(Protocol):
    """The smtp-out tasks sharing one queue."""

    name: str

    async def open(self, record: Recorder) -> None:
        """Connect (ECS) or start the tasks (local); before any other call."""

    async def close(self, interrupted: bool = False) -> None:
        """Release what `open` took (local: stop the tasks it started; quickly when
        `interrupted`)."""

    async def tasks(self) -> list[str]:
        """The ids of the running tasks."""

    def can_exec(self, task: str) -> bool:
        """True when `mailq`/`run_queue` work on `task` (else ExecUnavailableError)."""

    async def mailq(self, task: str) -> str:
        """The task's `mailq` output; DrillAbortedError if unreadable, else ExecUnavailableError."""

    async def run_queue(self, task: str) -> str:
        """Run the queue on `task` now (`sendmail -q -v`); its output once it ended."""

    async def stop_task(self, task: str, reason: str) -> None:
        """Stop `task`; the service (ECS, or the local driver) starts a replacement."""

    async def wait_steady(self, timeout: float, gone: str) -> Steady:
        """Wait until `gone` is no longer running and the service runs as many tasks as it
        wants, each ready; DrillAbortedError after `timeout` seconds."""


class ModeStore(Protocol):
    """Where the sinkhole's mode lives (SSM parameter, or a file)."""

    def describe(self) -> str:
        """`ssm:/cabal/sinkhole_mode` or `file:/path`."""

    async def read(self) -> str | None:
        """The current mode; None when it does not exist; DrillAbortedError if unreachable."""

    async def write(self, mode: str) -> None:
        """Set the mode; DrillAbortedError when unreachable."""

    async def close(self) -> None:
        """Release clients."""


@dataclass(frozen=True)
class LogLine:
    text: str
    task: str | None = None  # the task whose stream carried it, when the source knows


class LogSource(Protocol):
    """The smtp-out mail log (CloudWatch or a file), searched by a literal term."""

    per_task: bool  # True when each line says which task logged it (ECS log streams)

    def describe(self) -> str:
        """What is read (`cloudwatch:/ecs/cabal-smtp-out`, `file:/var/log/maillog`)."""

    async def open(self) -> None:
        """Reach the source (preflight); DrillAbortedError when unreachable."""

    async def close(self) -> None:
        """Release clients."""

    async def search(self, term: str, since: float) -> list[LogLine]:
        """Lines containing `term` logged at or after `since` (Unix time)."""
