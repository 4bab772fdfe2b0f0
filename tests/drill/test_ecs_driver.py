"""The ECS driver against moto's ECS, SSM and CloudWatch Logs, with the test's ECS Exec."""

from __future__ import annotations

import io
import json
import socket
from pathlib import Path
from typing import Any

import pytest

from daemon.config import Config
from daemon.drill.command import build_drill
from daemon.drill.drivers.ecs import EcsCluster
from daemon.drill.journal import Journal
from tests.drill.ecs_world import (
    CLUSTER,
    LOG_GROUP,
    PARAMETER,
    SERVICE,
    World,
    build_world,
    ecs_proxy,
)
from tests.drill.fakes import ManualClock


def config(proxy: str, tmp_path: Path, *, logs: bool = False, **drill: Any) -> Config:
    tree: dict[str, Any] = {
        "selfcheck": {"routes": [{
            "name": "default", "from": "probe@example.com", "to": "probe@example.com",
            "smtp": {"host": "127.0.0.1", "port": 2525, "security": "none"},
            "imap": {"host": "127.0.0.1", "security": "none"}}]},
        "drill": {"driver": "ecs", "environment": "stage",
                  "sender": "qp-test-drill@example.com", "mode_cache": 0,
                  "poll_interval": 1, "queue_timeout": 5, "retry_timeout": 30,
                  "settle_timeout": 60, "lock_file": str(tmp_path / "lock"),
                  "sinkhole": {"parameter": PARAMETER, "endpoint_url": proxy,
                               "region": "us-east-1"},
                  "ecs": {"cluster": CLUSTER, "service": SERVICE, "endpoint_url": proxy,
                          "region": "us-east-1", "request_timeout": 5}, **drill},
    }
    if logs:
        tree["leakwatch"] = {"source": "cloudwatch", "cloudwatch": {
            "log_groups": [LOG_GROUP], "endpoint_url": proxy, "region": "us-east-1",
            "request_timeout": 5}}
    return Config.model_validate(tree)


@pytest.fixture
async def world(moto_url: str) -> World:
    return build_world(moto_url)


async def run(world: World, proxy: str, tmp_path: Path, *, logs: bool = False,
              cluster: EcsCluster | None = None, **drill: Any) -> Journal:
    cfg = config(proxy, tmp_path, logs=logs, **drill)
    assert cfg.drill is not None and cfg.drill.ecs is not None
    cluster = cluster or EcsCluster(cfg.drill.ecs, exec_=world)
    clock = ManualClock()  # the drill's polls and waits; moto answers in real time
    made = build_drill(cfg, cluster=cluster, lines=io.StringIO(), send=world.send,
                       clock=clock, sleep=clock.sleep)
    return await made.run()


def step(journal: Journal, number: int) -> dict[str, Any]:
    return next(s for s in journal.as_dict()["steps"] if s["step"] == number)


async def test_ecs_drill_passes_and_parks_the_parameter(world: World, tmp_path: Path) -> None:
    """Against moto: StopTask with the drill's reason, a replacement recorded, the queue id
    on every task before and after, the SSM parameter back at defer; exit 0."""
    async with ecs_proxy(world) as proxy:
        journal = await run(world, proxy, tmp_path)
    assert journal.result == "passed", journal.error
    qid = journal.queue_id
    before, after = step(journal, 3)["evidence"]["tasks"], step(journal, 5)["evidence"]["tasks"]
    assert len(before) == 2 and all(e["listed"] == [qid] for e in before.values())
    replacement = step(journal, 4)["evidence"]["replacement"]
    assert len(replacement) == 1 and replacement[0] in after
    assert all(e["listed"] == [qid] and e["source"] == "mailq" for e in after.values())
    assert world.stop_reasons and "queue-persistence drill" in world.stop_reasons[0]
    calls = [c["call"] for s in journal.as_dict()["steps"] for c in s["evidence"].get("calls", [])]
    assert {"ecs:ListTasks", "ecs:StopTask", "ecs:DescribeServices", "ecs:ExecuteCommand",
            "ssm:PutParameter"} <= set(calls)
    assert world.mode() == "defer"
    assert [m.qid for m in world.delivered] == [qid]


async def test_ecs_unshared_queue_fails_at_step_3(moto_url: str, tmp_path: Path) -> None:
    """Tasks on ECS that do not share the queue: exit 1 at step 3, parameter back at defer."""
    world = build_world(moto_url, shared=False)
    async with ecs_proxy(world) as proxy:
        journal = await run(world, proxy, tmp_path)
    assert (journal.exit_code, journal.failed_step) == (1, "3 queued")
    assert world.mode() == "defer"


async def test_service_that_never_settles_aborts_with_exit_3(world: World,
                                                            tmp_path: Path) -> None:
    """No replacement within settle_timeout: aborted (exit 3), parameter back at defer,
    the wait driven by the injected clock."""
    world.replace = False
    clock = ManualClock()
    async with ecs_proxy(world) as proxy:
        cfg = config(proxy, tmp_path, settle_timeout=120)
        assert cfg.drill is not None and cfg.drill.ecs is not None
        cluster = EcsCluster(cfg.drill.ecs, exec_=world, clock=clock, sleep=clock.sleep)
        journal = await run(world, proxy, tmp_path, cluster=cluster, settle_timeout=120)
    assert (journal.exit_code, journal.failed_step) == (3, "4 replace")
    assert "not steady within 120 s" in (journal.error or "")
    assert 120 <= clock.now - 1000 <= 140
    assert world.mode() == "defer"


async def test_without_ecs_exec_the_log_streams_are_the_evidence(moto_url: str,
                                                                tmp_path: Path) -> None:
    """Tasks without ECS Exec: steps 3, 5 and 8 use each task's awslogs stream in moto's
    CloudWatch Logs (the replacement's own retry line included); the journal says so."""
    world = build_world(moto_url, exec_enabled=False, log_retries=True)
    async with ecs_proxy(world) as proxy:
        journal = await run(world, proxy, tmp_path, logs=True)
    assert journal.result == "passed", journal.error
    after = step(journal, 5)["evidence"]["tasks"]
    replacement = step(journal, 4)["evidence"]["replacement"][0]
    assert after[replacement]["source"] == "log"
    assert any(journal.queue_id in line and "Deferred" in line
               for line in after[replacement]["lines"])
    assert step(journal, 7)["evidence"]["trigger"] == "wait"
    assert step(journal, 8)["evidence"]["log"]["sent"]
    assert world.exec_calls == []
    assert world.mode() == "defer"


async def test_unreachable_ecs_aborts_and_still_parks(world: World, tmp_path: Path) -> None:
    """ECS unreachable at preflight (SSM fine): exit 3, and the cleanup parks in defer."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{closed.getsockname()[1]}"
    async with ecs_proxy(world) as proxy:
        cfg = config(proxy, tmp_path)
        assert cfg.drill is not None and cfg.drill.ecs is not None
        ecs_cfg = cfg.drill.ecs.model_copy(update={"endpoint_url": dead, "request_timeout": 1})
        journal = await run(world, proxy, tmp_path, cluster=EcsCluster(ecs_cfg, exec_=world))
    assert (journal.exit_code, journal.failed_step) == (3, "0 preflight")
    assert "ECS ListTasks" in (journal.error or "")
    assert journal.cleanup["ok"] is True and world.mode() == "defer"


FAKE_PLUGIN = """#!{python}
import json, os, select, sys
record = {{"argv": sys.argv[1:], "session": os.environ.get(sys.argv[1], "")}}
with open({record!r}, "a") as fh:
    fh.write(json.dumps(record) + "\\n")
print("\\nStarting session with SessionId: ecs-execute-command-0123", flush=True)
select.select([], [], [], 0.3)  # the stream arrives in pieces (no time.sleep: faketime)
print("/var/spool/mqueue is empty")
print("\\t\\tTotal requests: 0")
print("\\n\\nExiting session with sessionId: ecs-execute-command-0123.\\n")
"""


async def test_ecs_exec_speaks_through_the_session_manager_plugin(world: World,
                                                                 tmp_path: Path) -> None:
    """mailq over ECS Exec: ExecuteCommand, then session-manager-plugin run as the AWS CLI
    runs it (the session in its environment variable, never in argv; the target
    ecs:<cluster>_<task>_<runtime id>); the plugin's own lines are stripped."""
    import sys

    record = tmp_path / "plugin.jsonl"
    plugin = tmp_path / "session-manager-plugin"
    plugin.write_text(FAKE_PLUGIN.format(python=sys.executable, record=str(record)))
    plugin.chmod(0o755)
    async with ecs_proxy(world) as proxy:
        cfg = config(proxy, tmp_path)
        assert cfg.drill is not None and cfg.drill.ecs is not None
        ecs_cfg = cfg.drill.ecs.model_copy(update={"session_manager_plugin": str(plugin)})
        cluster = EcsCluster(ecs_cfg, ssm_endpoint="https://ssm.us-east-1.amazonaws.com")
        await cluster.open(lambda _call: None)
        try:
            task = (await cluster.tasks())[0]
            out = await cluster.mailq(task)
        finally:
            await cluster.close()
    assert "Starting session" not in out and "Exiting session" not in out
    assert "/var/spool/mqueue is empty" in out
    [call] = [json.loads(line) for line in record.read_text().splitlines()]
    env_name, region, action, profile, target, endpoint = call["argv"]
    assert (env_name, region, action, profile) == ("AWS_SSM_START_SESSION_RESPONSE",
                                                   "us-east-1", "StartSession", "")
    assert json.loads(target) == {"Target": f"ecs:{CLUSTER}_{task}_{task}-0123"}
    assert endpoint == "https://ssm.us-east-1.amazonaws.com"
    assert json.loads(call["session"])["tokenValue"] == "tok-SECRET"
    assert "tok-SECRET" not in " ".join(call["argv"])
    assert world.exec_calls == [(task, "mailq")]


FAILING_PLUGIN = """#!{python}
import sys
print("\\nStarting session with SessionId: ecs-execute-command-0123", flush=True)
print("Cannot perform start session: read tcp 10.0.0.5:55234->52.1.2.3:443: read: "
      "connection reset by peer", flush=True)
sys.exit(1)
"""


async def test_a_session_manager_plugin_that_fails_is_no_mailq_output(world: World,
                                                                     tmp_path: Path) -> None:
    """session-manager-plugin exiting non-zero (its session broke) is an exec that failed,
    named with what the plugin said; never its error text read as mailq's output (an
    empty queue: "not listed" at step 5, "gone" at step 8)."""
    import sys

    from daemon.drill.driver import DrillAbortedError

    plugin = tmp_path / "session-manager-plugin"
    plugin.write_text(FAILING_PLUGIN.format(python=sys.executable))
    plugin.chmod(0o755)
    async with ecs_proxy(world) as proxy:
        cfg = config(proxy, tmp_path)
        assert cfg.drill is not None and cfg.drill.ecs is not None
        ecs_cfg = cfg.drill.ecs.model_copy(update={"session_manager_plugin": str(plugin)})
        cluster = EcsCluster(ecs_cfg, ssm_endpoint="https://ssm.us-east-1.amazonaws.com")
        await cluster.open(lambda _call: None)
        try:
            task = (await cluster.tasks())[0]
            with pytest.raises(DrillAbortedError) as err:
                await cluster.mailq(task)
        finally:
            await cluster.close()
    assert "session-manager-plugin exited 1" in str(err.value)
    assert "connection reset by peer" in str(err.value)


async def test_exec_timeout_bounds_the_whole_ecs_exec(world: World, tmp_path: Path) -> None:
    """exec_timeout is one ECS Exec command, session included: an exec stuck before its
    plugin runs (ExecuteCommand hanging) still ends at it, as an unread task."""
    import asyncio

    from daemon.drill.driver import DrillAbortedError

    class StuckExec:
        async def run(self, *_args: Any) -> str:
            await asyncio.Event().wait()  # ExecuteCommand that never answers
            return ""

    async with ecs_proxy(world) as proxy:
        cfg = config(proxy, tmp_path)
        assert cfg.drill is not None and cfg.drill.ecs is not None
        ecs_cfg = cfg.drill.ecs.model_copy(update={"exec_timeout": 0.5})
        cluster = EcsCluster(ecs_cfg, exec_=StuckExec())
        await cluster.open(lambda _call: None)
        try:
            task = (await cluster.tasks())[0]
            async with asyncio.timeout(10):
                with pytest.raises(DrillAbortedError) as err:
                    await cluster.mailq(task)
        finally:
            await cluster.close()
    assert "no end within 0.5 s" in str(err.value)
