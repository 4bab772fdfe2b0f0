"""The ECS driver: the smtp-out service through aiobotocore, `mailq` through ECS Exec.

ListTasks (by service, RUNNING), DescribeTasks (is ECS Exec enabled? the
container's runtime id), StopTask (with the drill's reason), DescribeServices
(runningCount == desiredCount, one deployment) and ExecuteCommand. Every call
has a deadline. A task is named by its id (the last part of its ARN), as its
awslogs stream is.

ECS Exec returns a Session Manager session; speaking its stream protocol is
`Exec`'s job. The shipped one runs AWS's `session-manager-plugin` the way
`aws ecs execute-command` does (docs/drill.md says why not a Python library);
tests inject their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from daemon.drill.config import EcsDriver
from daemon.drill.driver import DrillAbortedError, ExecUnavailableError, Recorder, Steady

# Every AWS action the ECS driver calls (deploy/ecs/iam-drill-policy.json grants these).
IAM_ACTIONS = frozenset({"ecs:ListTasks", "ecs:DescribeTasks", "ecs:StopTask",
                         "ecs:DescribeServices", "ecs:ExecuteCommand"})

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]
SETTLE_POLL = 10.0  # DescribeServices while waiting for the service to settle
MAX_OUTPUT = 256 * 1024
SESSION_ENV = "AWS_SSM_START_SESSION_RESPONSE"  # the plugin reads the session from here


class Exec(Protocol):
    """Runs one command in a task's container over ECS Exec; its output."""

    async def run(self, ecs: Any, cluster: str, task: str, container: str, command: str,
                  timeout: float) -> str: ...


class SessionManagerPluginExec:
    """ExecuteCommand, then AWS's session-manager-plugin speaks the session's stream."""

    def __init__(self, plugin: str, region: str | None, ssm_endpoint: str | None) -> None:
        self.plugin = plugin
        self.region = region
        self.ssm_endpoint = ssm_endpoint

    async def run(self, ecs: Any, cluster: str, task: str, container: str, command: str,
                  timeout: float) -> str:
        path = shutil.which(self.plugin)
        if path is None:
            raise DrillAbortedError(
                f"ECS Exec needs {self.plugin!r} on PATH (AWS's Session Manager plugin; "
                "docs/drill.md), or a log source for the evidence")
        described = await ecs.describe_tasks(cluster=cluster, tasks=[task])
        runtime = next((c.get("runtimeId") for t in described.get("tasks", [])
                        for c in t.get("containers", []) if c.get("name") == container), None)
        resp = await ecs.execute_command(cluster=cluster, task=task, container=container,
                                         command=command, interactive=True)
        cluster_name = str(resp.get("clusterArn", cluster)).rpartition("/")[2]
        target = {"Target": f"ecs:{cluster_name}_{task.rpartition('/')[2]}_{runtime}"}
        region = self.region or ecs.meta.region_name
        endpoint = self.ssm_endpoint or f"https://ssm.{region}.amazonaws.com"
        env = {**os.environ, SESSION_ENV: json.dumps(resp["session"])}
        proc = await asyncio.create_subprocess_exec(
            path, SESSION_ENV, region, "StartSession", "", json.dumps(target), endpoint,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, env=env)
        try:
            async with asyncio.timeout(timeout):
                assert proc.stdout is not None
                kept = bytearray()  # all of it, at most MAX_OUTPUT kept
                while chunk := await proc.stdout.read(65536):
                    kept += chunk[: max(0, MAX_OUTPUT - len(kept))]
                await proc.wait()
                data = bytes(kept)
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await asyncio.shield(proc.wait())
        lines = data.decode("utf-8", errors="replace").replace("\r\n", "\n").splitlines()
        # The plugin's own lines around the command's output.
        output = [ln for ln in lines if not ln.startswith(
            ("Starting session with SessionId", "Exiting session with sessionId"))]
        if proc.returncode != 0:
            # The session itself failed (the command's own status never comes back: ECS
            # Exec does not return it): its text is no output of the command.
            said = next((ln.strip() for ln in reversed(output) if ln.strip()), "no output")
            raise DrillAbortedError(f"ECS Exec {command!r} on {task}: {self.plugin} exited "
                                    f"{proc.returncode}: {said[:300]}")
        return "\n".join(output) + "\n"


class EcsCluster:
    """The smtp-out service of an ECS cluster."""

    def __init__(self, cfg: EcsDriver, *, exec_: Exec | None = None,
                 ssm_endpoint: str | None = None, clock: Clock = time.monotonic,
                 sleep: Sleep = asyncio.sleep, settle_poll: float = SETTLE_POLL) -> None:
        self.cfg = cfg
        self.name = f"ECS service {cfg.service} in {cfg.cluster}"
        self.exec = exec_ or SessionManagerPluginExec(cfg.session_manager_plugin, cfg.region,
                                                      ssm_endpoint)
        self.clock = clock
        self.sleep = sleep
        self.settle_poll = settle_poll
        self._exit: contextlib.AsyncExitStack | None = None
        self._ecs: Any = None
        self._record: Recorder = lambda _call: None
        self._exec_enabled: dict[str, bool] = {}

    async def open(self, record: Recorder) -> None:
        self._record = record
        config = AioConfig(retries={"mode": "standard", "max_attempts": 3},
                           connect_timeout=min(self.cfg.request_timeout, 10.0),
                           read_timeout=self.cfg.request_timeout)
        self._exit = contextlib.AsyncExitStack()
        self._ecs = await self._exit.enter_async_context(get_session().create_client(
            "ecs", region_name=self.cfg.region, endpoint_url=self.cfg.endpoint_url,
            config=config))

    async def close(self, interrupted: bool = False) -> None:
        if self._exit is not None:
            exit_stack, self._exit, self._ecs = self._exit, None, None
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await exit_stack.aclose()

    async def _call(self, operation: str, **kwargs: Any) -> Any:
        self._record({"call": f"ecs:{_pascal(operation)}",
                      **{k: v for k, v in kwargs.items() if k != "tasks" or len(v) < 20}})
        try:
            async with asyncio.timeout(self.cfg.request_timeout * 3 + 10):
                return await getattr(self._ecs, operation)(**kwargs)
        except (BotoCoreError, ClientError, OSError, TimeoutError) as exc:
            raise DrillAbortedError(f"ECS {_pascal(operation)}: {_error(exc)}") from None

    async def tasks(self) -> list[str]:
        arns: list[str] = []
        kwargs: dict[str, Any] = {"cluster": self.cfg.cluster, "serviceName": self.cfg.service,
                                  "desiredStatus": "RUNNING"}
        while True:
            resp = await self._call("list_tasks", **kwargs)
            arns += resp.get("taskArns", [])
            if not resp.get("nextToken"):
                break
            kwargs["nextToken"] = resp["nextToken"]
        if not arns:
            return []
        running: list[str] = []
        for i in range(0, len(arns), 100):  # DescribeTasks takes at most 100
            resp = await self._call("describe_tasks", cluster=self.cfg.cluster,
                                    tasks=arns[i:i + 100])
            for task in resp.get("tasks", []):
                if task.get("lastStatus") not in (None, "RUNNING"):
                    continue
                task_id = str(task["taskArn"]).rpartition("/")[2]
                self._exec_enabled[task_id] = bool(task.get("enableExecuteCommand"))
                running.append(task_id)
        return sorted(running)

    def can_exec(self, task: str) -> bool:
        return self._exec_enabled.get(task, False)

    async def _exec(self, task: str, command: str) -> str:
        if not self.can_exec(task):
            raise ExecUnavailableError(task)
        self._record({"call": "ecs:ExecuteCommand", "task": task,
                      "container": self.cfg.container, "command": command})
        try:
            # exec_timeout is the whole command, ExecuteCommand and the session included.
            async with asyncio.timeout(self.cfg.exec_timeout):
                return await self.exec.run(self._ecs, self.cfg.cluster, task,
                                           self.cfg.container, command, self.cfg.exec_timeout)
        except TimeoutError:
            raise DrillAbortedError(f"ECS Exec {command!r} on {task}: no end within "
                                    f"{self.cfg.exec_timeout:g} s") from None
        except (BotoCoreError, ClientError, OSError) as exc:
            raise DrillAbortedError(f"ECS Exec {command!r} on {task}: {_error(exc)}") from None

    async def mailq(self, task: str) -> str:
        return await self._exec(task, self.cfg.mailq_command)

    async def run_queue(self, task: str) -> str:
        return await self._exec(task, self.cfg.run_queue_command)

    async def stop_task(self, task: str, reason: str) -> None:
        await self._call("stop_task", cluster=self.cfg.cluster, task=task, reason=reason[:255])

    async def wait_steady(self, timeout: float, gone: str) -> Steady:
        """As `aws ecs wait services-stable`, and `gone` no longer among the running tasks."""
        deadline = self.clock() + timeout
        seen = "no answer"
        while True:
            resp = await self._call("describe_services", cluster=self.cfg.cluster,
                                    services=[self.cfg.service])
            services = resp.get("services", [])
            if not services:
                raise DrillAbortedError(f"ECS service {self.cfg.service} not found in "
                                        f"{self.cfg.cluster}")
            svc = services[0]
            desired, running = int(svc.get("desiredCount", 0)), int(svc.get("runningCount", 0))
            deployments = len(svc.get("deployments", [])) or 1
            tasks = await self.tasks()
            seen = f"runningCount {running}, desiredCount {desired}, {len(tasks)} task(s) " \
                   f"listed, {deployments} deployment(s)"
            if running == desired == len(tasks) and deployments == 1 and gone not in tasks:
                return Steady(tasks=tasks, desired=desired, running=running)
            if self.clock() >= deadline:
                raise DrillAbortedError(f"{self.name} not steady within {timeout:g} s "
                                        f"({seen})")
            await self.sleep(self.settle_poll)


def _pascal(operation: str) -> str:
    return "".join(part.capitalize() for part in operation.split("_"))


def _error(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        return f"{err.get('Code', 'error')}: {err.get('Message', '')}"[:300]
    return "no answer in time" if isinstance(exc, TimeoutError) else \
        f"{type(exc).__name__}: {exc}"[:300]
