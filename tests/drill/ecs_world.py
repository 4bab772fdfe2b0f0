"""An smtp-out service in moto's ECS, and what moto does not do, simulated around it.

moto's tasks do not run and its service starts no replacement: a proxy in front of
moto plays ECS' scheduler (after StopTask it runs a replacement task) and reports
ECS Exec as enabled (DescribeTasks' `enableExecuteCommand`, `runtimeId`). The
queue the tasks share lives in `FakeExec`, the test's ECS Exec: `mailq` prints it,
`sendmail -q` delivers what the sinkhole (moto's SSM parameter) accepts. Every line
a task logs goes to its awslogs stream in moto's CloudWatch Logs.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import boto3
from aiohttp import web

from tests.drill.fakes import DEFER_STATUS, Message, format_mailq

CLUSTER, SERVICE, CONTAINER = "cabal-mail", "cabal-smtp-out", "smtp-out"
PARAMETER = "/cabal/sinkhole_mode"
LOG_GROUP = "/ecs/cabal-smtp-out"


def task_id(arn: str) -> str:
    return arn.rpartition("/")[2]


@dataclass
class World:
    url: str
    ecs: Any
    ssm: Any
    logs: Any
    shared: bool = True
    replace: bool = True  # the "scheduler" starts a replacement after StopTask
    exec_enabled: bool = True
    log_retries: bool = False  # every task's queue runner logs a retry after events
    queues: dict[str, dict[str, Message]] = field(default_factory=dict)
    shared_queue: dict[str, Message] = field(default_factory=dict)
    delivered: list[Message] = field(default_factory=list)
    exec_calls: list[tuple[str, str]] = field(default_factory=list)
    stop_reasons: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._qids = itertools.count(200001)

    def running(self) -> list[str]:
        arns = self.ecs.list_tasks(cluster=CLUSTER, desiredStatus="RUNNING")["taskArns"]
        return sorted(task_id(a) for a in arns)

    def run_tasks(self, count: int) -> list[str]:
        resp = self.ecs.run_task(cluster=CLUSTER, taskDefinition="smtp-out", count=count,
                                 launchType="EC2", startedBy="ecs-svc/1")
        return [task_id(t["taskArn"]) for t in resp["tasks"]]

    def queue(self, task: str) -> dict[str, Message]:
        if task not in self.queues:
            self.queues[task] = self.shared_queue if self.shared else {}
        return self.queues[task]

    def mode(self) -> str:
        return str(self.ssm.get_parameter(Name=PARAMETER)["Parameter"]["Value"])

    def log(self, task: str, text: str) -> None:
        stream = f"smtp-out/{CONTAINER}/{task}"
        with suppress(self.logs.exceptions.ResourceAlreadyExistsException):
            self.logs.create_log_stream(logGroupName=LOG_GROUP, logStreamName=stream)
        self.logs.put_log_events(logGroupName=LOG_GROUP, logStreamName=stream, logEvents=[
            {"timestamp": int(time.time() * 1000), "message": text}])

    def attempt(self, task: str, msg: Message) -> None:
        """One delivery attempt of `msg` by `task` against the sinkhole's mode."""
        if self.mode() in ("accept", "accept-log"):
            self.queue(task).pop(msg.qid, None)
            self.delivered.append(msg)
            self.log(task, f"sendmail[7]: {msg.qid}: to=<{msg.recipient}>, mailer=smtp, "
                           "stat=Sent (2.0.0 Message accepted for discard)")
        else:
            msg.status = DEFER_STATUS
            self.log(task, f"sendmail[7]: {msg.qid}: to=<{msg.recipient}>, mailer=smtp, "
                           f"stat={DEFER_STATUS}")

    def retry_everywhere(self) -> None:
        """Each running task's queue runner tries what it sees (sendmail -q15m)."""
        for task in self.running():
            for msg in list(self.queue(task).values()):
                self.attempt(task, msg)

    def submit(self, sender: str, recipient: str) -> str:
        task = self.running()[0]
        msg = Message(qid=f"6BNJUQna{next(self._qids)}", sender=sender, recipient=recipient)
        self.queue(task)[msg.qid] = msg
        self.attempt(task, msg)
        if self.log_retries:
            self.retry_everywhere()
        return msg.qid

    async def send(self, _smtp: Any, _msg: Any, sender: str, recipient: str,
                   _timeout: float) -> str:
        qid = await asyncio.to_thread(self.submit, sender, recipient)
        return f"2.0.0 {qid} Message accepted for delivery"

    async def run(self, ecs: Any, cluster: str, task: str, container: str, command: str,
                  timeout: float) -> str:
        """The test's ECS Exec (the `Exec` seam)."""
        self.exec_calls.append((task, command))
        if command == "mailq":
            return format_mailq(self.queue(task))
        if command.startswith("sendmail -q"):
            for msg in list(self.queue(task).values()):
                await asyncio.to_thread(self.attempt, task, msg)
            return "Running /var/spool/mqueue/6BNJUQna (sequence 1 of 1)\n"
        raise AssertionError(f"unexpected command {command!r}")


def build_world(url: str, *, replicas: int = 2, **options: Any) -> World:
    kw = {"endpoint_url": url, "region_name": "us-east-1"}
    post = urllib.request.Request(  # noqa: S310 - moto on loopback; keep its tasks RUNNING
        url + "/moto-api/state-manager/set-transition", method="POST",
        data=json.dumps({"model_name": "ecs::task",
                         "transition": {"progression": "manual", "times": 10**9}}).encode())
    urllib.request.urlopen(post, timeout=10).close()  # noqa: S310
    ecs, ec2 = boto3.client("ecs", **kw), boto3.client("ec2", **kw)
    ssm, logs = boto3.client("ssm", **kw), boto3.client("logs", **kw)
    ssm.put_parameter(Name=PARAMETER, Value="defer", Type="String")
    logs.create_log_group(logGroupName=LOG_GROUP)
    ecs.create_cluster(clusterName=CLUSTER)
    ami = ec2.describe_images()["Images"][0]["ImageId"]
    instance = ec2.run_instances(ImageId=ami, MinCount=1, MaxCount=1,
                                 InstanceType="m5.large")["Instances"][0]
    ecs.register_container_instance(cluster=CLUSTER, instanceIdentityDocument=json.dumps(
        {"instanceId": instance["InstanceId"], "region": "us-east-1",
         "accountId": "123456789012"}))
    ecs.register_task_definition(family="smtp-out", containerDefinitions=[
        {"name": CONTAINER, "image": "smtp-out", "memory": 128}])
    ecs.create_service(cluster=CLUSTER, serviceName=SERVICE, taskDefinition="smtp-out",
                       desiredCount=replicas)
    ecs.update_service(cluster=CLUSTER, service=SERVICE, desiredCount=replicas)
    world = World(url, ecs, ssm, logs, **options)
    world.run_tasks(replicas)
    return world


@asynccontextmanager
async def ecs_proxy(world: World) -> AsyncIterator[str]:
    """moto behind a proxy that plays ECS' scheduler and its ECS Exec flags."""
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        target = request.headers.get("X-Amz-Target", "")
        if target.endswith(".ExecuteCommand"):  # moto has no ECS Exec: answer as ECS does
            asked = json.loads(body)
            world.exec_calls.append((task_id(asked["task"]), asked["command"]))
            return web.json_response({
                "clusterArn": f"arn:aws:ecs:us-east-1:123456789012:cluster/{CLUSTER}",
                "containerName": asked["container"], "interactive": True,
                "taskArn": asked["task"],
                "session": {"sessionId": "ecs-execute-command-0123", "tokenValue": "tok-SECRET",
                            "streamUrl": "wss://ssmmessages.us-east-1.amazonaws.com/v1/x"}},
                content_type="application/x-amz-json-1.1")
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() not in ("host", "content-length")}
        async with session.request(request.method, world.url + request.path_qs,
                                   headers=headers, data=body) as resp:
            data, status = await resp.read(), resp.status
        if target.endswith(".DescribeTasks") and status == 200:
            answer = json.loads(data)
            for task in answer.get("tasks", []):
                task["enableExecuteCommand"] = world.exec_enabled
                for container in task.get("containers", []):
                    container["runtimeId"] = f"{task_id(task['taskArn'])}-0123"
            data = json.dumps(answer).encode()
        if target.endswith(".StopTask") and status == 200:
            world.stop_reasons.append(json.loads(body).get("reason", ""))
            if world.replace:
                new = await asyncio.to_thread(world.run_tasks, 1)
                if world.log_retries:  # the replacement's queue runner starts at once
                    for msg in list(world.queue(new[0]).values()):
                        await asyncio.to_thread(world.attempt, new[0], msg)
        if target.endswith(".PutParameter") and world.log_retries and \
                json.loads(body).get("Value") == "accept":
            await asyncio.to_thread(world.retry_everywhere)
        return web.Response(body=data, status=status, content_type="application/x-amz-json-1.1")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()
        await session.close()
