"""`selfcheckd check`: one round trip of each chosen route, then, when asked, the heartbeats.

The routes run concurrently through one `Runner`, as the daemon runs them.
With `--heartbeat` the configured `[[heartbeat]]` targets are pinged by the
same `Heartbeats` component the daemon uses, under a `Supervisor`, so the
per-route rules are the daemon's: a target pulses success only when every
route it covers succeeded in this invocation; a failed covered route sends its
failure (healthchecks `/fail`, Uptime Kuma `down`; updown gets nothing, the
missing pulse is its alarm). A covered route that this invocation did not
check (`--route`) has no result here: the target's success is withheld (this
command cannot vouch for a route it did not check), a failure is still sent.
After the last round trip the pings get `heartbeat_timeout` seconds; what is
still undelivered then is dropped and counted as a failure. Heartbeat outcomes
never change the exit code: the verdict is about the mail system.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

from daemon.checks.result import CheckResult, new_run_id
from daemon.checks.runner import Runner
from daemon.config import Config, HeartbeatKind, HeartbeatTarget, RouteConfig
from daemon.delivery.heartbeats import Heartbeats
from daemon.logs import install_exception_hooks
from daemon.metrics import Metrics
from daemon.roundtrip.check import RoundTrip
from daemon.roundtrip.probe import probe_secret
from daemon.supervisor import Supervisor

# After the heartbeats close: the supervisor's own teardown.
_STOP_WAIT = 2.0


@dataclass
class CheckOutcome:
    """What `check` did: each route's result and, with --heartbeat, a line per target."""

    results: list[CheckResult]
    heartbeats: list[str] = field(default_factory=list)


async def check_routes(
    cfg: Config, routes: Sequence[RouteConfig], *, heartbeat: bool = False,
    heartbeat_timeout: float = 30.0,
) -> CheckOutcome:
    """Run one round trip per route; with `heartbeat`, ping the targets (bounded)."""
    undo = install_exception_hooks(asyncio.get_running_loop())
    try:
        if not heartbeat:
            return CheckOutcome(await _run_all(cfg, routes, Runner(), None))
        return await _with_heartbeats(cfg, routes, heartbeat_timeout)
    finally:
        undo()


async def _run_all(
    cfg: Config, routes: Sequence[RouteConfig], runner: Runner, beats: Heartbeats | None,
) -> list[CheckResult]:
    secret = probe_secret(cfg.selfcheck)

    async def one(route: RouteConfig) -> CheckResult:
        run_id = new_run_id()
        if beats is not None:
            beats.run_started(route.name, run_id)
        return await runner.execute(RoundTrip(route, cfg.selfcheck, secret), run_id)

    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(one(r)) for r in routes]
    return [task.result() for task in tasks]


async def _with_heartbeats(
    cfg: Config, routes: Sequence[RouteConfig], timeout: float,
) -> CheckOutcome:
    metrics = Metrics()  # this invocation's counts, read for the summary
    beats = Heartbeats(cfg.heartbeat, metrics, routes=[r.name for r in cfg.selfcheck.routes])
    runner = Runner()
    runner.on_result(beats.run_finished)  # at verdict time, as in the daemon
    supervisor = Supervisor(metrics)
    supervising = asyncio.create_task(supervisor.run(), name="supervisor")
    try:
        await supervisor.started()
        supervisor.start(beats)
        results = await _run_all(cfg, routes, runner, beats)
    finally:
        # Whatever happened to the runs, the pings get their time and no more.
        await beats.close(grace=timeout)
        supervisor.stop()
        await asyncio.wait({supervising}, timeout=_STOP_WAIT)
    return CheckOutcome(results, [summary(t, beats, metrics, results) for t in beats.targets])


def summary(
    target: HeartbeatTarget, beats: Heartbeats, metrics: Metrics,
    results: Sequence[CheckResult],
) -> str:
    """One line per target: what was delivered, or why nothing was sent."""
    counts = {result: metrics.registry.get_sample_value(
        "selfcheck_heartbeats_total", {"target": target.name, "result": result}) or 0.0
        for result in ("success", "failure", "skipped")}
    if any(counts.values()):
        said = ", ".join(f"{result} {n:g}" for result, n in counts.items() if n)
        return f"heartbeat {target.name}: {said}"
    checked = {r.route: r for r in results}
    covered = [name for name in beats.covered(target, "") if name]
    failing = [name for name in covered if name in checked and not checked[name].success]
    unchecked = [name for name in covered if name not in checked]
    if failing and target.kind is HeartbeatKind.UPDOWN:
        why = f"covered route failed: {', '.join(failing)} (the missing pulse is the alarm)"
    elif not any(name in checked for name in covered):
        why = "it covers none of the routes checked"
    elif unchecked:
        why = f"covered route not checked in this invocation: {', '.join(unchecked)}"
    else:
        why = "no ping was due"
    return f"heartbeat {target.name}: nothing sent ({why})"
