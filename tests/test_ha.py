"""The lease state machine (daemon/ha.py) under a fake clock: take, renew, step down, release.

Each keeper runs under a real Supervisor; time is a FakeClock shared by all of
them (the monotonic clock) plus a wall clock per keeper that may be skewed.
The table is tests/ha_fakes.py's in-memory one with DynamoDB's conditions;
tests/test_ha_dynamodb.py runs the same calls against moto's DynamoDB.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from structlog.testing import capture_logs

from daemon.config import HaConfig
from daemon.ha import Leadership, LeaseKeeper, holder_id
from daemon.metrics import Metrics
from daemon.supervisor import Supervisor
from tests.fake_time import FakeClock
from tests.ha_fakes import Faults, LeaseItem, MemoryLeaseTable, Wall

CFG = HaConfig(lease_table="selfcheckd-lease", lease_duration=15, renew_every=5)


@dataclass
class Node:
    keeper: LeaseKeeper
    table: MemoryLeaseTable
    wall: Wall
    metrics: Metrics
    supervisor: Supervisor
    work: RecordingWork | None = None

    def value(self, name: str, **labels: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, labels)


@dataclass
class RecordingWork:
    """A LeaderWork that records each start and stop (and can be slow to start)."""

    clock: FakeClock
    events: list[tuple[str, float, Any]] = field(default_factory=list)
    start_takes: float = 0.0
    started: asyncio.Event = field(default_factory=asyncio.Event)

    async def start_leading(self, token: int) -> None:
        self.events.append(("start", self.clock.now, token))
        if self.start_takes:
            await self.clock.sleep(self.start_takes)
        self.started.set()

    async def stop_leading(self, why: str, *, holding: bool) -> None:
        self.events.append(("stop", self.clock.now, holding))


class Cluster:
    """Keepers sharing one lease item and one fake monotonic clock."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.item = LeaseItem()
        self.nodes: list[Node] = []
        self._tasks: list[asyncio.Task[None]] = []

    async def add(self, name: str, *, skew: float = 0.0, cfg: HaConfig = CFG,
                  work: RecordingWork | None = None) -> Node:
        metrics = Metrics()
        sup = Supervisor(metrics, clock=self.clock, wall=self.clock, sleep=self.clock.sleep)
        wall = Wall(self.clock, skew)
        table = MemoryLeaseTable(self.item, Faults())
        keeper = LeaseKeeper(cfg, table, f"{name}#1-abcd", metrics, clock=self.clock,
                             wall=wall, sleep=self.clock.sleep)
        sup.start(keeper)
        if work is not None:
            sup.start(Leadership(keeper, work, metrics))
        self._tasks.append(asyncio.create_task(sup.run()))
        await sup.started()
        await self.clock.settle()
        node = Node(keeper, table, wall, metrics, sup, work)
        self.nodes.append(node)
        return node

    def leaders(self) -> list[Node]:
        return [n for n in self.nodes if n.keeper.leading() is not None]

    async def run_for(self, seconds: float, step: float = 0.05,
                      check: Callable[[], None] | None = None) -> None:
        """Advance in small steps, checking `check` (an invariant) after each."""
        end = self.clock.now + seconds
        while self.clock.now < end:
            await self.clock.advance(step)
            if check is not None:
                check()

    async def until(self, predicate: Callable[[], bool], limit: float, step: float = 0.05,
                    check: Callable[[], None] | None = None) -> float:
        """Advance until `predicate()`; the fake seconds it took."""
        start = self.clock.now
        while not predicate():
            assert self.clock.now - start <= limit, f"not within {limit} fake s"
            await self.clock.advance(step)
            if check is not None:
                check()
        return self.clock.now - start

    async def close(self) -> None:
        for node in self.nodes:
            node.supervisor.stop()
        await asyncio.wait_for(asyncio.gather(*self._tasks), 5)


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    c = Cluster(FakeClock())
    yield c
    await c.close()


def at_most_one_leader(c: Cluster) -> Callable[[], None]:
    def check() -> None:
        leaders = c.leaders()
        assert len(leaders) <= 1, [n.keeper.holder for n in leaders]
    return check


async def test_first_keeper_takes_the_lease_with_token_one(cluster: Cluster) -> None:
    """An absent lease is taken at once; the token starts at 1 and the item names us."""
    a = await cluster.add("a")
    assert a.keeper.leading() == 1
    assert cluster.item.holder == a.keeper.holder
    assert cluster.item.expires == pytest.approx(a.wall() + 15, abs=0.01)


async def test_a_held_lease_is_not_taken_and_the_standby_knows_who_holds_it(
        cluster: Cluster) -> None:
    """While the leader renews, the standby's attempts fail every renew_every; /status names
    the leader."""
    a = await cluster.add("a")
    b = await cluster.add("b")
    await cluster.run_for(60, check=at_most_one_leader(cluster))
    assert a.keeper.leading() == 1
    assert b.keeper.leading() is None
    assert b.keeper.leader is not None
    assert b.keeper.leader.holder == a.keeper.holder
    assert b.keeper.status()["role"] == "standby"
    # Every 5 s: 12 attempts in 60 s (plus the first), none an error.
    assert 12 <= b.table.calls.count("acquire") <= 14
    assert 11 <= a.table.calls.count("renew") <= 13
    assert b.value("selfcheckd_lease_errors_total", reason="connection") == 0


async def test_leader_stops_acting_before_its_lease_can_expire(cluster: Cluster) -> None:
    """Renewals that hang (a partition): leading() ends lease_duration - renew_every after the
    last good renewal's send time, renew_every before the expiry written in the item."""
    a = await cluster.add("a")
    await cluster.run_for(7)  # renewed at 5 s
    sent_wall = a.wall() - 2.0  # the renewal at +5 s
    a.table.faults.hang = True
    lost_after = await cluster.until(lambda: a.keeper.leading() is None, limit=20, step=0.01)
    # Stopped acting 10 s after the last good renewal's send time (at +5 s), 3 s from now.
    assert lost_after == pytest.approx(8.0, abs=0.05)
    assert cluster.item.expires == pytest.approx(sent_wall + 15, abs=0.05)
    assert cluster.item.expires - a.wall() == pytest.approx(5.0, abs=0.05)


async def test_failed_renewals_are_retried_before_the_deadline(cluster: Cluster) -> None:
    """Four failed renewals (at 5, 6, 7 and 8 s: retried every renew_every / 5, not backing
    off past valid_until at 10 s), then one that works: the leader never stopped leading."""
    a = await cluster.add("a")
    await cluster.run_for(4.9)
    a.table.faults.fail = 4
    held = []
    await cluster.run_for(15, check=lambda: held.append(a.keeper.leading() == 1))
    assert all(held)
    assert a.value("selfcheckd_lease_errors_total", reason="connection") == 4
    assert a.keeper.last_error is None


async def test_standby_takes_over_once_the_leaders_lease_expired_and_never_overlaps(
        cluster: Cluster) -> None:
    """The leader cut off: it stops acting first; the standby takes the lease right after
    the expiry it last saw (not up to renew_every later), with token 2."""
    a = await cluster.add("a")
    b = await cluster.add("b")
    await cluster.run_for(6, check=at_most_one_leader(cluster))
    a.table.faults.hang = True
    expiry = cluster.item.expires
    took = await cluster.until(lambda: b.keeper.leading() is not None, limit=40, step=0.01,
                               check=at_most_one_leader(cluster))
    assert took <= 15  # the last renewal was at +5 s, the cut at +6 s
    assert b.wall() == pytest.approx(expiry + 0.05, abs=0.03)
    assert b.keeper.leading() == 2
    assert a.keeper.leading() is None


async def test_a_clock_ahead_by_less_than_the_margin_never_makes_two_leaders(
        cluster: Cluster) -> None:
    """The standby's wall clock runs 4 s ahead (under renew_every = 5 s): it sees the expiry
    early, still only after the partitioned leader stopped acting."""
    a = await cluster.add("a")
    b = await cluster.add("b", skew=4.0)
    await cluster.run_for(6)
    a.table.faults.hang = True
    await cluster.until(lambda: b.keeper.leading() is not None, limit=40, step=0.01,
                        check=at_most_one_leader(cluster))


async def test_a_renewal_refused_means_stepping_down_at_once(cluster: Cluster) -> None:
    """Someone else holds the lease now (our renewal's condition failed): leading() is None
    right after that answer, not at the deadline."""
    a = await cluster.add("a")
    await cluster.run_for(1)
    cluster.item.holder, cluster.item.token = "intruder#9-0000", 7
    await cluster.until(lambda: a.keeper.leading() is None, limit=6, step=0.05)
    assert a.keeper.leader is not None
    assert a.keeper.leader.holder == "intruder#9-0000"


async def test_release_hands_over_within_renew_every_and_keeps_the_token_counter(
        cluster: Cluster) -> None:
    """SIGTERM's release: the item keeps its token, the standby takes it at its next attempt
    (within renew_every) with token 2."""
    a = await cluster.add("a")
    b = await cluster.add("b")
    await cluster.run_for(3)
    released = asyncio.create_task(a.keeper.release(timeout=5))
    await cluster.clock.settle()
    assert await released is True
    assert cluster.item.holder is None
    assert cluster.item.token == 1
    took = await cluster.until(lambda: b.keeper.leading() is not None, limit=10)
    assert took <= 5.0
    assert b.keeper.leading() == 2


async def test_a_renewal_applied_but_unanswered_is_adopted_as_a_new_term(
        cluster: Cluster) -> None:
    """Renewals applied with their answers lost until the deadline: the leader steps down,
    then finds the lease still in its name, renews it and leads again (same token, new term)
    instead of leaving nobody in charge until it expires."""
    a = await cluster.add("a")
    await cluster.run_for(1)
    # Every renewal before valid_until (at 5 s, then every renew_every / 5: 6, 7, 8, 9 s).
    a.table.faults.applied_then_lost = 5
    with capture_logs() as logs:
        await cluster.until(lambda: a.keeper.term == 2, limit=15, step=0.05)
    assert a.keeper.leading() == 1
    events = [e["event"] for e in logs]
    assert events.index("ha_lease_lost") < events.index("ha_lease_acquired")
    assert cluster.item.token == 1


async def test_leadership_starts_the_work_on_a_win_and_stops_it_before_the_deadline(
        cluster: Cluster) -> None:
    """The work starts when the lease is won and is stopped by the time leading() ends,
    even while the renewal call hangs."""
    work = RecordingWork(cluster.clock)
    a = await cluster.add("a", work=work)
    await cluster.until(lambda: work.events != [], limit=1)
    assert work.events[0][0] == "start"
    assert a.value("selfcheckd_leader") == 1
    a.table.faults.hang = True
    deadline = a.keeper.valid_until
    await cluster.until(lambda: len(work.events) == 2, limit=20, step=0.01)
    stop = work.events[1]
    assert stop[0] == "stop"
    assert stop[1] <= deadline + 0.011
    assert stop[2] is False  # not holding: a file store must not be written now
    assert a.value("selfcheckd_leader") == 0
    assert a.value("selfcheckd_lease_transitions_total", to="leader") == 1
    assert a.value("selfcheckd_lease_transitions_total", to="standby") == 1


async def test_a_start_cut_short_by_losing_the_lease_is_cancelled_then_stopped(
        cluster: Cluster) -> None:
    """The work takes long to start and the lease is lost meanwhile: the start is cancelled
    and the stop still runs (what started is stopped)."""
    work = RecordingWork(cluster.clock, start_takes=30.0)
    a = await cluster.add("a", work=work)
    await cluster.until(lambda: work.events != [], limit=1)
    a.table.faults.hang = True
    await cluster.until(lambda: [e[0] for e in work.events] == ["start", "stop"], limit=20)
    assert not work.started.is_set()


async def test_two_keepers_starting_in_the_same_instant_make_one_leader(
        cluster: Cluster) -> None:
    """Both try at once: the conditional write lets exactly one in."""
    item = cluster.item
    nodes = await asyncio.gather(cluster.add("a"), cluster.add("b"))
    await cluster.run_for(20, check=at_most_one_leader(cluster))
    assert len(cluster.leaders()) == 1
    assert [w for w in item.writes if w[0] == "acquire"] == [
        ("acquire", cluster.leaders()[0].keeper.holder, 1)]
    assert {n.keeper.holder for n in nodes} == {"a#1-abcd", "b#1-abcd"}


async def test_errors_are_counted_by_reason_and_shown(cluster: Cluster) -> None:
    """A standby whose calls fail counts each, says why (degraded, /status) and stays alive;
    an answer (the lease is taken: no error) ends the episode."""
    cluster.item.exists, cluster.item.token = True, 4
    cluster.item.holder, cluster.item.expires = "someone#1-0000", 2_000_000_000.0
    with capture_logs() as logs:
        c = await cluster.add("c")  # its first attempt answers at once
        c.table.faults.fail = 3
        await cluster.run_for(6)
        assert c.supervisor.degraded()["lease"][0] == "lease_connection"
        assert c.keeper.status()["last_error"] == "acquire: acquire: injected failure"
        await cluster.run_for(16)
    assert c.table.calls == ["acquire"] * 5
    assert c.value("selfcheckd_lease_errors_total", reason="connection") == 3
    assert [e["event"] for e in logs].count("ha_lease_call_failed") == 3
    assert c.keeper.last_error is None
    assert c.supervisor.degraded() == {}
    assert c.supervisor.problems() == {}


async def test_holder_id_is_unique_per_process_and_names_the_ecs_task(
        aiohttp_task_metadata: Callable[[str], Awaitable[str]]) -> None:
    """With the task metadata endpoint, the id is the task ARN plus pid and a random part;
    without it, the host name plus pid and a random part. Two calls never agree."""
    arn = "arn:aws:ecs:eu-west-1:123456789012:task/cabal-mail/0123456789abcdef"
    uri = await aiohttp_task_metadata(arn)
    first = await holder_id({"ECS_CONTAINER_METADATA_URI_V4": uri})
    second = await holder_id({"ECS_CONTAINER_METADATA_URI_V4": uri})
    assert first.startswith(arn + "#")
    assert first != second
    plain = await holder_id({})
    assert "#" in plain
    assert not plain.startswith("arn:")


async def test_holder_id_falls_back_to_the_host_when_the_metadata_does_not_answer() -> None:
    """A metadata endpoint that refuses: a warning, and the host-name id."""
    with capture_logs() as logs:
        holder = await holder_id({"ECS_CONTAINER_METADATA_URI_V4": "http://127.0.0.1:9/v4/x"})
    assert not holder.startswith("arn:")
    assert any(e["event"] == "ha_task_arn_unknown" for e in logs)


@pytest.fixture
async def aiohttp_task_metadata() -> AsyncIterator[Callable[[str], Awaitable[str]]]:
    from aiohttp import web

    runners: list[web.AppRunner] = []

    async def serve(arn: str) -> str:
        async def task(_request: web.Request) -> web.Response:
            return web.json_response({"Cluster": "cabal-mail", "TaskARN": arn})

        app = web.Application()
        app.router.add_get("/v4/abc/task", task)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        return f"http://127.0.0.1:{runner.addresses[0][1]}/v4/abc"

    yield serve
    for runner in runners:
        await runner.cleanup()


@pytest.mark.parametrize(("ha", "leakwatch", "expected"), [
    ('lease_table = "t-t"\nrenew_every = 8', "",
     "ha.renew_every: must be less than half of lease_duration (15s): the leader stops its "
     "work lease_duration - renew_every after its last renewal, which must leave room for a "
     "renewal and a margin for clocks"),
    ('lease_table = "t"', "",
     "ha.lease_table: must be a DynamoDB table name: 3-255 letters, digits, _ - ."),
    ("", "", "ha.lease_table: required"),
    ('lease_table = "selfcheckd-lease"', '[leakwatch]\nsource = "stdin"\n',
     'ha: cannot be used with leakwatch.source = "stdin" (standard input cannot pass from '
     "one task to another)"),
])
def test_ha_config_names_the_key_and_the_rule(tmp_path: Any, ha: str, leakwatch: str,
                                              expected: str) -> None:
    """Bad [ha] values: one line naming the key and the rule."""
    from daemon.config import ConfigError, load_config

    path = tmp_path / "c.toml"
    path.write_text(f"{leakwatch}[ha]\n{ha}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, {})
    assert expected in err.value.problems


def test_ha_config_defaults() -> None:
    """15 s leases renewed every 5 s, the item `selfcheckd`; the endpoint from the SDK."""
    cfg = HaConfig(lease_table="selfcheckd-lease")
    assert (cfg.lease_key, cfg.lease_duration, cfg.renew_every) == ("selfcheckd", 15, 5)
    assert cfg.endpoint_url is None and cfg.region is None


@pytest.mark.parametrize(("leakwatch", "warning"), [
    ("[leakwatch]\nsource = \"file\"\n",
     "warning: ha without leakwatch.state_file: each takeover starts the leak watcher afresh"),
    ("[leakwatch]\nsource = \"file\"\nstate_file = \"/var/lib/selfcheckd/s.json\"\n",
     "warning: ha with leakwatch.state_file = /var/lib/selfcheckd/s.json: every task must "
     "reach this one file (EFS)"),
])
def test_config_check_warns_where_the_state_of_two_tasks_lives(
        tmp_path: Any, capsys: pytest.CaptureFixture[str], leakwatch: str,
        warning: str) -> None:
    """config-check: [ha] with no state file, or a file, is valid but gets a warning line."""
    from daemon.cli import main

    path = tmp_path / "c.toml"
    path.write_text(f'{leakwatch}[ha]\nlease_table = "selfcheckd-lease"\n')
    assert main(["config-check", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert warning in out
