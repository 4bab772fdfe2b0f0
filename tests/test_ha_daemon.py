"""Two daemons in one process, one lease (in memory): the leader does the work, the standby
serves /metrics, /healthz and /status only; hand-over at shutdown and after a partition.

The mail stack, the heartbeat receiver and the alert sink are real servers; the lease is
tests/ha_fakes.py's table (moto's DynamoDB is in tests/test_ha_processes.py, with real
`selfcheckd run` processes).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from daemon.app import Daemon
from daemon.config import Config, LoadedConfig
from daemon.embedded.stack import EmbeddedMailStack
from tests.ha_fakes import Faults, LeaseItem, MemoryLeaseTable
from tests.logwatch.receiver import Sink, alert_sink
from tests.logwatch.test_watcher import append, leak_line
from tests.test_daemon import Receiver, get
from tests.waiting import until

HA = {"lease_table": "selfcheckd-lease", "lease_duration": 3, "renew_every": 1}


def ha_tree(stack: EmbeddedMailStack, pulse: str, sink: str, log: Path,
            state: Path) -> dict[str, Any]:
    return {
        "selfcheck": {"interval": 1, "timeout": 5, "secret": "ha-secret",
                      "routes": [stack.route_table()]},
        "server": {"listen": "127.0.0.1:0"},
        "heartbeat": [{"name": "pulse", "url": pulse, "retries": 0}],
        "leakwatch": {"source": "file", "file": {"path": str(log), "poll_interval": 0.05},
                      "state_file": str(state), "allowed_senders": ["qp-test@*"],
                      "alert": {"url": sink, "backoff": 0.1}},
        "ha": HA,
        "shutdown_grace": 3,
    }


class Pair:
    def __init__(self, daemons: list[Daemon], tables: list[MemoryLeaseTable],
                 item: LeaseItem, sink: Sink, log: Path, tree: dict[str, Any]) -> None:
        self.tree = tree
        self.daemons = daemons
        self.tables = tables
        self.item = item
        self.sink = sink
        self.log = log

    def leaders(self) -> list[Daemon]:
        return [d for d in self.daemons if d.leading]

    def leader(self) -> Daemon:
        (only,) = self.leaders()
        return only

    def standby(self) -> Daemon:
        (only,) = [d for d in self.daemons if not d.leading and not d.stopping]
        return only

    def table_of(self, daemon: Daemon) -> MemoryLeaseTable:
        return self.tables[self.daemons.index(daemon)]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = await Receiver().start()
    yield r
    await r.stop()


@pytest.fixture
async def pair(mail_stack: EmbeddedMailStack, receiver: Receiver,
               tmp_path: Path) -> AsyncIterator[Pair]:
    log = tmp_path / "maillog"
    log.write_text("")
    item = LeaseItem()
    async with alert_sink() as sink:
        tree = ha_tree(mail_stack, receiver.url, sink.url, log, tmp_path / "state.json")
        config = Config.model_validate(tree)
        tables = [MemoryLeaseTable(item, Faults()) for _ in range(2)]
        daemons = [Daemon(LoadedConfig(config, None), lease_table=t, holder=f"task-{i}#1-ab")
                   for i, t in enumerate(tables)]
        for d in daemons:
            await d.start()
        p = Pair(daemons, tables, item, sink, log, tree)
        try:
            await until(lambda: len(p.leaders()) == 1, timeout=10)
            yield p
        finally:
            for d in daemons:
                await d.shutdown()


def value(daemon: Daemon, name: str, **labels: str) -> float | None:
    return daemon.metrics.registry.get_sample_value(name, labels)


async def test_only_the_leader_runs_checks_and_the_standby_says_it_is_standby(
        pair: Pair, receiver: Receiver) -> None:
    """The leader runs round trips and pulses; the standby serves /status, /healthz and
    /metrics, says standby and names the leader, and exports no route series."""
    leader, standby = pair.leader(), pair.standby()
    await until(lambda: value(leader, "selfcheck_runs_total", route="default",
                              result="success") or 0 >= 2, timeout=15)
    assert value(standby, "selfcheck_runs_total", route="default", result="success") is None
    assert value(standby, "selfcheck_interval_seconds", route="default") is None
    assert value(leader, "selfcheck_interval_seconds", route="default") == 1
    assert (value(leader, "selfcheckd_leader"), value(standby, "selfcheckd_leader")) == (1, 0)
    assert "scheduler" not in standby.supervisor.names()
    assert {"scheduler", "heartbeats", "leakwatch-source", "leakwatch-alerts",
            "lease", "leadership"} <= set(leader.supervisor.names())
    code, body = await get(standby.listen_port, "/status")
    status = json.loads(body)
    assert code == 200
    assert status["role"] == "standby"
    assert status["ha"]["leader"]["holder"] == leader.keeper.holder  # type: ignore[union-attr]
    assert status["ha"]["token"] is None
    assert status["leakwatch"] is None
    code, body = await get(standby.listen_port, "/healthz")
    assert code == 200
    code, body = await get(leader.listen_port, "/status")
    assert json.loads(body)["ha"]["token"] == 1


async def test_standby_answers_probe_with_503_naming_the_leader(
        mail_stack: EmbeddedMailStack, pair: Pair) -> None:
    """An on-demand /probe at the standby does not send mail: it points at the leader."""
    standby = pair.standby()
    standby.config.server.probe = True
    answer = await standby.probe("default")
    assert answer.status == 503
    assert answer.body["leader"] == pair.leader().keeper.holder  # type: ignore[union-attr]


async def test_shutdown_of_the_leader_hands_over_within_renew_every(pair: Pair) -> None:
    """SIGTERM's path: the leader stops, saves, releases; the standby leads within
    renew_every (plus the hand-over's own time), with token 2, and resumes the leak
    watcher's state: a leak written before the stop is alerted exactly once."""
    leader, standby = pair.leader(), pair.standby()
    # Read from the end at the first start (like tail -F): wait until it reads.
    await until(lambda: value(leader, "leakwatch_last_poll_success_timestamp_seconds"))
    append(pair.log, leak_line("HAaa0001000001", "before@sinkhole.test"))
    await until(lambda: len(pair.sink.accepted) == 1, timeout=10)
    started = time.monotonic()
    await leader.shutdown()
    await until(lambda: standby.leading, timeout=5)
    took = time.monotonic() - started
    assert took < 1 + 1.0
    assert standby.token == 2
    append(pair.log, leak_line("HAaa0002000002", "after@sinkhole.test"))
    await until(lambda: len(pair.sink.accepted) == 2, timeout=10)
    summaries = [b["summary"] for b in pair.sink.accepted]
    assert "before@sinkhole.test" in summaries[0]
    assert "after@sinkhole.test" in summaries[1]
    assert value(leader, "selfcheckd_lease_transitions_total", to="standby") == 1


async def test_a_partitioned_leader_halts_before_its_lease_expires(pair: Pair) -> None:
    """The leader's lease calls hang: it halts every component by its deadline, before the
    item's expiry; the standby takes over after the expiry; the ex-leader's route and leak
    series are gone (no alert rule fires on a standby's stale values)."""
    leader, standby = pair.leader(), pair.standby()
    await until(lambda: value(leader, "selfcheck_runs_total", route="default",
                              result="success"), timeout=15)
    pair.table_of(leader).faults.hang = True
    with capture_logs() as logs:
        await until(lambda: not leader.leading, timeout=5)
    halted_at = time.time()
    assert halted_at < pair.item.expires  # acted only while the lease was its own
    await until(lambda: standby.leading, timeout=8)
    assert time.time() >= pair.item.expires - 3 + 0.0  # after the old lease's expiry
    assert any(e["event"] == "ha_leader_work_halted" for e in logs)
    assert "scheduler" not in leader.supervisor.names()
    assert value(leader, "selfcheck_interval_seconds", route="default") is None
    assert value(leader, "selfcheck_last_success_timestamp_seconds", route="default") is None
    assert value(leader, "leakwatch_last_poll_success_timestamp_seconds") == 0
    assert value(leader, "selfcheckd_leader") == 0
    assert value(standby, "selfcheckd_leader") == 1


async def test_a_reload_on_the_standby_starts_nothing(pair: Pair, tmp_path: Path) -> None:
    """SIGHUP on a standby applies the config but starts no leader component."""
    standby = pair.standby()
    path = tmp_path / "reload.toml"
    cfg = json.loads(json.dumps(pair.tree))
    cfg["heartbeat"][0]["timeout"] = 3
    cfg["leakwatch"]["alert"]["timeout"] = 3
    path.write_text(_toml(cfg))
    standby.config_path = path
    assert await standby.reload() is True
    assert not {"scheduler", "heartbeats", "leakwatch-source"} & set(standby.supervisor.names())
    assert standby.leakwatch is None


def _toml(tree: dict[str, Any]) -> str:
    """A tiny TOML writer for the config tree (tables, lists of tables, scalars)."""
    def scalar(v: Any) -> str:
        return json.dumps(v)

    lines: list[str] = []

    def table(prefix: str, node: dict[str, Any]) -> None:
        subs = []
        for k, v in node.items():
            if v is None:
                continue
            if isinstance(v, dict) or (isinstance(v, list) and v and isinstance(v[0], dict)):
                subs.append((k, v))
            else:
                lines.append(f"{k} = {scalar(v)}")
        for k, v in subs:
            name = f"{prefix}.{k}" if prefix else k
            if isinstance(v, dict):
                lines.append(f"[{name}]")
                table(name, v)
            else:
                for entry in v:
                    lines.append(f"[[{name}]]")
                    table(name, entry)

    table("", tree)
    return "\n".join(lines) + "\n"


async def test_the_scheduled_drill_runs_only_on_the_leader(tmp_path: Path) -> None:
    """[drill] schedule is leader work: no drill component on a standby, one on the leader,
    removed (its series back to "no schedule") when the leader steps down."""
    from tests.drill.test_component import config as drill_config

    tree = drill_config(tmp_path).model_dump(by_alias=True, mode="json")
    tree["server"]["listen"] = "127.0.0.1:0"
    tree["ha"] = HA
    item = LeaseItem(exists=True, holder="other#1-00", token=5, expires=4_000_000_000.0)
    table = MemoryLeaseTable(item, Faults())
    daemon = Daemon(LoadedConfig(Config.model_validate(tree), None), lease_table=table,
                    holder="me#1-00")
    assert daemon.drill is None
    await daemon.start()
    try:
        await until(lambda: table.calls.count("acquire") >= 2)
        assert daemon.drill is None
        assert "drill" not in daemon.supervisor.names()
        item.holder = None  # the other task released the lease
        await until(lambda: "drill" in daemon.supervisor.names(), timeout=5)
        assert daemon.drill is not None
        await until(lambda: value(daemon, "selfcheck_drill_scheduled_since_timestamp_seconds"))
        table.faults.hang = True
        await until(lambda: not daemon.leading and daemon.drill is None, timeout=5)
        assert "drill" not in daemon.supervisor.names()
        assert value(daemon, "selfcheck_drill_scheduled_since_timestamp_seconds") == 0
    finally:
        await daemon.shutdown()


async def test_s3_down_at_takeover_runs_the_checks_and_reads_no_line_until_it_answers(
        mail_stack: EmbeddedMailStack, receiver: Receiver, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The new leader cannot read its S3 state: round trips and heartbeats run, the leak
    watcher reads nothing and saves nothing (degraded state_read, retried); once S3
    answers, it reads the state and alerts the leak written meanwhile."""
    import boto3  # type: ignore[import-untyped]

    from tests.ha_processes import Cutter
    from tests.logwatch.aws_fakes import AWS_ENV, moto_server

    for key, setting in AWS_ENV.items():
        monkeypatch.setenv(key, setting)
    server = moto_server()
    moto = next(server)
    host, _, port = moto.removeprefix("http://").partition(":")
    cutter = await Cutter((host, int(port))).start()
    s3 = boto3.client("s3", endpoint_url=moto, region_name="us-east-1")
    s3.create_bucket(Bucket="selfcheckd-state-ha")
    log = tmp_path / "maillog"
    log.write_text("")
    try:
        async with alert_sink() as sink:
            tree = ha_tree(mail_stack, receiver.url, sink.url, log, tmp_path / "unused")
            tree["leakwatch"]["state_file"] = "s3://selfcheckd-state-ha/leakwatch-state.json"
            tree["ha"] = {**HA, "endpoint_url": cutter.url, "region": "us-east-1"}
            cutter.cut()
            daemon = Daemon(LoadedConfig(Config.model_validate(tree), None),
                            lease_table=MemoryLeaseTable(LeaseItem(), Faults()),
                            holder="task-0#1-ab")
            await daemon.start()
            try:
                await until(lambda: daemon.leading and daemon.supervisor.degraded().get(
                    "leakwatch-state") is not None, timeout=20)
                assert daemon.supervisor.degraded()["leakwatch-state"] == (
                    "state_read", daemon.supervisor.states()["leakwatch-state"]["reason"])
                assert "leakwatch-source" not in daemon.supervisor.names()
                await until(lambda: value(daemon, "selfcheck_runs_total", route="default",
                                          result="success"), timeout=15)
                assert "Contents" not in s3.list_objects_v2(Bucket="selfcheckd-state-ha")
                cutter.heal()
                await until(lambda: "leakwatch-source" in daemon.supervisor.names(),
                            timeout=40)
                await until(lambda: value(
                    daemon, "leakwatch_last_poll_success_timestamp_seconds"), timeout=10)
                append(log, leak_line("HAaa0003000003", "meanwhile@sinkhole.test"))
                await until(lambda: len(sink.accepted) == 1, timeout=10)
                body = json.loads(s3.get_object(
                    Bucket="selfcheckd-state-ha", Key="leakwatch-state.json")["Body"].read())
                assert body["fence"] == {"holder": "task-0#1-ab", "token": 1}
            finally:
                await daemon.shutdown()
    finally:
        await cutter.close()
        next(server, None)


async def test_dns_checks_run_only_on_the_leader() -> None:
    """[[dns]] entries are leader work: no dns component on a standby, one on the leader,
    and a leader stepping down drops it and its entries' series."""
    from tests.conftest import refused_port

    tree = {"server": {"listen": "127.0.0.1:0"}, "ha": HA,
            "dns": [{"domain": "example.test", "nameservers": [f"127.0.0.1:{refused_port()}"],
                     "timeout": 0.2, "deadline": 1}]}
    item = LeaseItem(exists=True, holder="other#1-00", token=5, expires=4_000_000_000.0)
    table = MemoryLeaseTable(item, Faults())
    daemon = Daemon(LoadedConfig(Config.model_validate(tree), None), lease_table=table,
                    holder="me#1-00")
    assert daemon.dns is None
    await daemon.start()
    try:
        await until(lambda: table.calls.count("acquire") >= 2)
        assert "dns" not in daemon.supervisor.names()
        item.holder = None
        await until(lambda: "dns" in daemon.supervisor.names(), timeout=5)
        sample = daemon.metrics.registry.get_sample_value
        last_run = "selfcheck_dns_last_run_timestamp_seconds"
        await until(lambda: sample(last_run, {"name": "example.test"}), timeout=10)
        table.faults.hang = True
        await until(lambda: not daemon.leading and daemon.dns is None, timeout=5)
        await until(lambda: daemon.metrics.registry.get_sample_value("selfcheckd_leader") == 0)
        assert "dns" not in daemon.supervisor.names()
        assert sample(last_run, {"name": "example.test"}) is None
    finally:
        await daemon.shutdown()
