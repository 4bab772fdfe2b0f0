"""`[drill] schedule`: the drill as a supervised component with its metrics and journals."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from daemon.config import Config
from daemon.drill.component import FIRST_DELAY, ScheduledDrill
from daemon.drill.steps import Drill
from daemon.metrics import Metrics
from daemon.supervisor import ComponentState, Progress, Supervisor
from tests.drill.fakes import SMTP, FakeCluster, FakeModes, ManualClock

WEEK = 7 * 86400.0


def config(tmp_path: Path, **drill: Any) -> Config:
    return Config.model_validate({
        "selfcheck": {"routes": [{
            "name": "default", "from": "probe@example.com", "to": "probe@example.com",
            "smtp": {"host": "127.0.0.1", "port": 2525, "security": "none"},
            "imap": {"host": "127.0.0.1", "security": "none"}}]},
        "drill": {"driver": "ecs", "environment": "stage", "schedule": "weekly",
                  "sender": "qp-test-drill@example.com", "lock_file": str(tmp_path / "lock"),
                  "journal_dir": str(tmp_path / "journals"), **drill}})


class World:
    def __init__(self, *, shared: bool = True) -> None:
        self.modes = FakeModes()
        self.shared = shared
        self.clusters: list[FakeCluster] = []
        self.hooks: dict[str, Any] = {}

    def build(self, cfg: Config, **seams: Any) -> Drill:
        assert cfg.drill is not None
        cluster = FakeCluster(self.modes, shared=self.shared)
        cluster.hooks.update(self.hooks)
        self.clusters.append(cluster)
        return Drill(cfg.drill, SMTP, cluster, self.modes, send=cluster.send,
                     clock=self.clock, sleep=self.clock.sleep, **seams)

    clock = ManualClock()


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def progress(metrics: Metrics) -> Progress:
    return Progress(Supervisor(metrics), ComponentState(name="drill", deadline=1e9))


async def run_until(component: ScheduledDrill, metrics: Metrics, runs: int = 1,
                    handle: Progress | None = None) -> None:
    task = asyncio.create_task(component.run(handle or progress(metrics)))
    try:
        async with asyncio.timeout(60):  # a guard only: fake time drives the loop
            while sum(sample(metrics, "selfcheck_drill_runs_total", result=r) or 0
                      for r in ("passed", "failed", "aborted", "cleanup_failed")) < runs:
                await asyncio.sleep(0)
    finally:
        task.cancel()
        await asyncio.wait({task})


async def test_a_scheduled_drill_runs_and_exports_its_metrics(tmp_path: Path) -> None:
    """Without history the first drill runs an hour after the start; a pass counts in
    runs_total{result="passed"}, sets the last-success time, the duration and the result,
    and its journal is kept in journal_dir."""
    world = World()
    world.clock = ManualClock()
    metrics = Metrics()
    start = world.clock.now
    component = ScheduledDrill(config(tmp_path), metrics, build=world.build,
                               clock=world.clock, wall=world.clock.wall,
                               sleep=world.clock.sleep)
    await run_until(component, metrics)
    assert sample(metrics, "selfcheck_drill_runs_total", result="passed") == 1
    assert component.last is not None
    steps = component.last.as_dict()["steps"]
    assert steps[0]["started"] is not None
    first_step_at = world.clock.now
    assert first_step_at - start >= FIRST_DELAY
    assert (sample(metrics, "selfcheck_drill_last_success_timestamp_seconds") or 0) > 0
    assert sample(metrics, "selfcheck_drill_last_result", result="passed") == 1
    assert sample(metrics, "selfcheck_drill_last_result", result="failed") == 0
    assert (sample(metrics, "selfcheck_drill_duration_seconds") or 0) > 0
    kept = list((tmp_path / "journals").glob("drill-*.json"))
    assert len(kept) == 1 and json.loads(kept[0].read_text())["result"] == "passed"


async def test_a_failed_drill_is_counted_and_keeps_the_last_success(tmp_path: Path) -> None:
    """A failing drill counts as failed, sets last_result{failed}, and leaves the
    last-success time where it was."""
    world = World(shared=False)
    world.clock = ManualClock()
    metrics = Metrics()
    component = ScheduledDrill(config(tmp_path), metrics, build=world.build,
                               clock=world.clock, wall=world.clock.wall,
                               sleep=world.clock.sleep)
    await run_until(component, metrics)
    assert sample(metrics, "selfcheck_drill_runs_total", result="failed") == 1
    assert sample(metrics, "selfcheck_drill_last_result", result="failed") == 1
    assert sample(metrics, "selfcheck_drill_last_success_timestamp_seconds") == 0
    assert world.modes.mode == "defer"


async def test_history_restores_the_schedule_and_the_last_success(tmp_path: Path) -> None:
    """A journal in journal_dir restores last success at start, and the next drill is due
    one interval after the last one started, not an hour after this start."""
    journals = tmp_path / "journals"
    journals.mkdir()
    world = World()
    world.clock = ManualClock()
    now = world.clock.wall()
    (journals / "drill-old.json").write_text(json.dumps({
        "result": "passed", "started": _iso(now - 3 * 86400),
        "ended": _iso(now - 3 * 86400 + 60)}))
    metrics = Metrics()
    component = ScheduledDrill(config(tmp_path), metrics, build=world.build,
                               clock=world.clock, wall=world.clock.wall,
                               sleep=world.clock.sleep)
    start = world.clock.now
    task = asyncio.create_task(component.run(progress(metrics)))
    async with asyncio.timeout(30):  # the journals are read in a thread (a guard only)
        while not sample(metrics, "selfcheck_drill_last_success_timestamp_seconds"):
            await asyncio.sleep(0.01)
    assert sample(metrics, "selfcheck_drill_last_success_timestamp_seconds") == \
        round(now - 3 * 86400 + 60, 3)
    task.cancel()
    await asyncio.wait({task})
    await run_until(component, metrics)
    assert component.last is not None
    assert world.clock.now - start >= 4 * 86400 - 10  # due 7 days after the old start


async def test_stop_interrupts_a_drill_in_flight_and_waits_for_its_cleanup(
        tmp_path: Path) -> None:
    """stop() (the daemon's SIGTERM) interrupts the running drill; its cleanup parks the
    sinkhole in defer before stop returns; the run counts as aborted."""
    world = World()
    world.clock = ManualClock()
    metrics = Metrics()
    component = ScheduledDrill(config(tmp_path), metrics, build=world.build,
                               clock=world.clock, wall=world.clock.wall,
                               sleep=world.clock.sleep)
    stopping: list[asyncio.Task[bool]] = []
    world.hooks["stop_task"] = lambda: stopping.append(
        asyncio.create_task(component.stop(timeout=10)))
    state = ComponentState(name="drill", deadline=1e9)
    await run_until(component, metrics, handle=Progress(Supervisor(metrics), state))
    assert await stopping[0] is True
    assert (state.up, state.code) == (False, "drill_aborted")  # degraded, with the reason
    assert sample(metrics, "selfcheck_drill_runs_total", result="aborted") == 1
    assert world.modes.mode == "defer"
    assert component.last is not None and component.last.interrupted_by == "shutdown"


def _iso(ts: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, UTC).isoformat()


async def test_the_daemon_supervises_a_scheduled_drill_and_refuses_a_reload_mid_drill(
        tmp_path: Path) -> None:
    """With [drill] schedule, `selfcheckd run` builds the `drill` component; a reload that
    changes [drill] while a drill runs is refused, naming the key."""
    from daemon.app import Daemon
    from daemon.config import LoadedConfig

    cfg = config(tmp_path)
    daemon = Daemon(LoadedConfig(config=cfg, path=None))
    assert daemon.drill is not None and daemon.drill.name == "drill"
    changed = config(tmp_path, schedule="daily")
    assert daemon._not_live(changed) == []
    world = World()
    daemon.drill.current = world.build(cfg)  # a drill in flight
    assert daemon._not_live(changed) == [
        "drill: cannot change while a drill is running (it would be cut short); reload "
        "again once it has ended"]
    unscheduled = Config.model_validate({**cfg.model_dump(by_alias=True, mode="json"),
                                         "drill": None})
    assert Daemon(LoadedConfig(config=unscheduled, path=None)).drill is None
