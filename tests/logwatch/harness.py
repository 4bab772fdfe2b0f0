"""Run a LeakWatch's components under a real Supervisor, in-process, the way `run` does."""

from __future__ import annotations

import argparse
import asyncio
import io
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from daemon.app import StateReader
from daemon.logwatch import scan_command
from daemon.logwatch.config import LeakWatchConfig
from daemon.logwatch.watcher import LeakWatch
from daemon.metrics import Metrics
from daemon.state import READ_TIMEOUT
from daemon.state_io import VolumeIO
from daemon.supervisor import Supervisor
from tests.fake_time import FakeClock
from tests.waiting import until


@dataclass
class Watching:
    watch: LeakWatch
    supervisor: Supervisor
    metrics: Metrics

    def value(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    def up(self, component: str) -> float | None:
        return self.metrics.registry.get_sample_value(
            "selfcheckd_component_up", {"component": component})


async def advance_until(clock: FakeClock, predicate: Callable[[], Any], limit: float,
                        step: float = 1.0, real_timeout: float = 60.0) -> None:
    """Move fake time a step at a time, giving real I/O (files, HTTP) a moment after each.

    Fake time moves only while the code waits on the fake clock: a slow real call
    (botocore's own retries under load) does not use up the fake `limit`.
    """
    start = clock.now
    async with asyncio.timeout(real_timeout):
        while not predicate():
            assert clock.now - start <= limit, "not reached in fake time"
            if clock.sleeping:
                await clock.advance(step)
            try:
                await until(predicate, timeout=0.05)
            except TimeoutError:
                continue


@asynccontextmanager
async def watching(
    config: LeakWatchConfig | dict[str, Any],
    metrics: Metrics | None = None,
    *,
    health_clock: Callable[[], float] | None = None,
    state_io: VolumeIO | None = None,
    read_timeout: float = READ_TIMEOUT,
    **watch_options: Any,
) -> AsyncIterator[Watching]:
    """Open the watcher (restoring its state file), supervise its components, stop and save.

    `health_clock` replaces the supervisor's clock only, so a test can move the
    progress deadlines on while the loops themselves run in real time; `state_io`
    replaces the state file's worker processes (a volume that never answers).
    """
    if isinstance(config, dict):
        config = LeakWatchConfig.model_validate(config)
    metrics = metrics or Metrics()
    watch = LeakWatch(config, metrics, **watch_options)
    if state_io is not None:
        watch.state.io = state_io
    sup = Supervisor(metrics, **({"clock": health_clock} if health_clock else {}))

    def start(opened: LeakWatch) -> None:
        for component in opened.components():
            sup.start(component)

    await watch.open(read_timeout=read_timeout)
    if watch.restored:
        await watch.prime()
        start(watch)
    else:  # as the daemon: the state is read (retried) before a component starts
        sup.start(StateReader(watch, start, watch_options.get("sleep", asyncio.sleep)))
    task = asyncio.create_task(sup.run())
    await sup.started()
    try:
        yield Watching(watch, sup, metrics)
    finally:
        sup.stop()
        await asyncio.wait_for(task, 5)
        await watch.close(save=watch.opened)


def run_scan(argv: list[str], config: LeakWatchConfig | None = None,
             **kwargs: Any) -> tuple[int, str, str]:
    """`selfcheckd scan ARGV` in-process: (exit status, stdout, stderr)."""
    parser = argparse.ArgumentParser()
    scan_command.add_arguments(parser)
    out, err = io.StringIO(), io.StringIO()
    code = scan_command.run(parser.parse_args(argv), config or LeakWatchConfig(), out, err,
                            **kwargs)
    return code, out.getvalue(), err.getvalue()
