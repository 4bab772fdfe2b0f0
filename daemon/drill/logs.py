"""The drill's log evidence: the smtp-out mail log that `[leakwatch]` already reads.

* CloudWatch (`[leakwatch.cloudwatch]`): FilterLogEvents with the term as a
  quoted filter pattern, from the drill's start; ECS's awslogs driver names each
  task's stream `<prefix>/<container>/<task id>`, so every line says which task
  logged it (`per_task`): the evidence for a task without ECS Exec.
* A file (`[leakwatch.file]`): the lines containing the term; the syslog HOST
  field is kept as the task (the local cluster's tasks log under their names).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from daemon.drill.driver import DrillAbortedError, LogLine, LogSource
from daemon.logwatch.config import CloudWatchSource, LeakWatchConfig
from daemon.logwatch.sources.cloudwatch import call_deadline, create_logs_client

MAX_LINES = 2000  # per search: the drill's recipient and queue id log a handful
MAX_FILE_BYTES = 64 * 1024 * 1024  # of a local mail log searched, from its end


class CloudWatchLogs:
    per_task = True

    def __init__(self, cfg: CloudWatchSource) -> None:
        self.cfg = cfg
        self._exit: contextlib.AsyncExitStack | None = None
        self._client: Any = None

    def describe(self) -> str:
        return "cloudwatch:" + ",".join(self.cfg.log_groups)

    async def open(self) -> None:
        self._exit = contextlib.AsyncExitStack()
        self._client = await self._exit.enter_async_context(create_logs_client(self.cfg))
        # Reachable and allowed: one cheap search over the last minute.
        await self.search("selfcheckd-drill-preflight", time.time() - 60)

    async def close(self) -> None:
        if self._exit is not None:
            exit_stack, self._exit, self._client = self._exit, None, None
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await exit_stack.aclose()

    async def search(self, term: str, since: float) -> list[LogLine]:
        if self._client is None:
            raise DrillAbortedError("CloudWatch Logs: not opened")
        out: list[LogLine] = []
        for group in self.cfg.log_groups:
            kwargs: dict[str, Any] = {"logGroupName": group, "filterPattern": f'"{term}"',
                                      "startTime": int(since * 1000), "interleaved": True}
            try:
                async with asyncio.timeout(call_deadline(self.cfg.request_timeout) * 2):
                    while len(out) < MAX_LINES:
                        resp = await self._client.filter_log_events(**kwargs)
                        for event in resp.get("events", []):
                            message = str(event.get("message", ""))
                            if term in message:  # moto matches loosely; be exact
                                out.append(LogLine(message.rstrip("\n"),
                                                   _task_of(str(event.get("logStreamName",
                                                                          "")))))
                        token = resp.get("nextToken")
                        if not token:
                            break
                        kwargs["nextToken"] = token
            except (BotoCoreError, ClientError, OSError, TimeoutError) as exc:
                raise DrillAbortedError(f"CloudWatch Logs {group}: {_error(exc)}") from None
        return out


def _task_of(stream: str) -> str | None:
    """`smtp-out/smtp-out/0123abcd...` -> the task id (the awslogs stream's last part)."""
    return stream.rpartition("/")[2] or None


def _error(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        return f"{err.get('Code', 'error')}: {err.get('Message', '')}"[:300]
    return "no answer in time" if isinstance(exc, TimeoutError) else \
        f"{type(exc).__name__}: {exc}"[:300]


class FileLogs:
    per_task = False

    def __init__(self, path: Path) -> None:
        self.path = path

    def describe(self) -> str:
        return f"file:{self.path}"

    async def open(self) -> None:
        try:
            await asyncio.to_thread(self.path.stat)
        except OSError as exc:
            raise DrillAbortedError(f"log source {self.path}: {exc.strerror or exc}") from None

    async def close(self) -> None:
        return None

    async def search(self, term: str, since: float) -> list[LogLine]:
        try:
            text = await asyncio.to_thread(_tail, self.path)
        except OSError as exc:
            raise DrillAbortedError(f"log source {self.path}: {exc.strerror or exc}") from None
        out = []
        for line in text.splitlines():
            if term in line:
                parts = line.split(maxsplit=2)
                out.append(LogLine(line, parts[1] if len(parts) > 2 else None))
                if len(out) >= MAX_LINES:
                    break
        return out


def _tail(path: Path) -> str:
    with path.open("rb") as fh:
        size = fh.seek(0, 2)
        fh.seek(max(0, size - MAX_FILE_BYTES))
        return fh.read().decode("utf-8", errors="replace")


def log_source(leakwatch: LeakWatchConfig | None) -> LogSource | None:
    """The [leakwatch] source as drill evidence; None for stdin or no [leakwatch]."""
    if leakwatch is None:
        return None
    if leakwatch.source == "cloudwatch":
        return CloudWatchLogs(leakwatch.cloudwatch)
    if leakwatch.source == "file":
        return FileLogs(leakwatch.file.path)
    return None
