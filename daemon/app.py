"""`selfcheckd run`: build the components from the config, start, reload, stop in one budget.

Shape after uvicorn: signal handlers only set events; the main coroutine
notices. Every long-running loop is a component of one `Supervisor`
(daemon/supervisor.py); the checks run through one `Runner` scheduled by one
`Scheduler`.

Shutdown (SIGTERM, SIGINT) draws on one budget of `shutdown_grace` seconds:
scheduling and reading the log source stop at once; runs in flight get what is
left after reserving time for their cleanup and the final steps; then they are
cancelled and their probe deletions run, shielded and bounded; then the leak
watcher saves its state, flushes the alert outbox and saves again; then every
component is stopped and clients close. Every path ends within
`shutdown_grace + CLOSE_BUDGET` seconds. A second signal exits at once.

SIGHUP reloads everything or nothing: the new file is validated, keys that
cannot change live refuse the reload, a new listener is bound before anything
is swapped; then changed components are rebuilt (the leak watcher hands its
state over) and removed routes' series are dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import math
import os
import signal
import sys
import threading
import time
import weakref
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from daemon import __version__
from daemon.checks.result import CheckResult, new_run_id
from daemon.checks.runner import Runner
from daemon.checks.scheduler import IDLE_TICK, Job, Scheduler
from daemon.config import Config, ConfigError, LoadedConfig, load_config
from daemon.delivery.heartbeats import Heartbeats
from daemon.http import HttpServer, ProbeAnswer
from daemon.http_limits import connection_cap
from daemon.logs import configure_logging, install_exception_hooks, redact_secrets
from daemon.metrics import Metrics
from daemon.roundtrip.check import RoundTrip
from daemon.roundtrip.probe import probe_secret
from daemon.stopping import StopBudget
from daemon.supervisor import Progress, Supervisor

if TYPE_CHECKING:  # imported when configured: botocore and the DNS libraries are heavy
    from daemon.dns.component import DnsChecks
    from daemon.dns.mta_sts import PolicyFetcher
    from daemon.drill.component import ScheduledDrill
    from daemon.logwatch.watcher import LeakWatch

log = structlog.get_logger("daemon.app")

EXIT_OK, EXIT_STARTUP, EXIT_FORCED = 0, 3, 1
# After the grace: stopping the components and closing listeners and clients.
CLOSE_BUDGET = 2.0
# Replacing a component on reload waits this long for the old one to end.
SWAP_TIMEOUT = 5.0

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


def final_reserve(grace: float) -> float:
    """Seconds of the grace kept for the state save and the outbox flush."""
    return min(4.0, grace * 0.2)


def cleanup_reserve(grace: float, cleanup_timeout: float) -> float:
    """Seconds of the grace kept for deleting the probes of cancelled runs."""
    return min(cleanup_timeout, grace * 0.3)


class ScheduledChecks:
    """The `scheduler` component: the scheduler's loop, one tick = one unit of progress."""

    name = "scheduler"
    # The loop wakes at least every IDLE_TICK seconds, whatever the intervals.
    progress_deadline = IDLE_TICK + 30.0

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    @property
    def may_finish(self) -> bool:
        return self.scheduler.stopping

    async def run(self, progress: Progress) -> None:
        self.scheduler.on_tick = progress.progress
        await self.scheduler.run()


class Daemon:
    """Everything `selfcheckd run` owns; tests drive it in-process via `start`/`shutdown`."""

    def __init__(
        self,
        loaded: LoadedConfig,
        config_path: Path | None = None,
        metrics: Metrics | None = None,
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        policy_fetcher: PolicyFetcher | None = None,
    ) -> None:
        self.config = loaded.config
        self.config_path = config_path if config_path is not None else loaded.path
        self.metrics = metrics or Metrics()
        self.metrics.config_reload_ok.set(1)
        self._clock = clock
        self._sleep = sleep
        self.budget = StopBudget(clock)
        self.supervisor = Supervisor(self.metrics, clock=clock, sleep=sleep)
        self.runner = Runner(self.metrics, budget=self.budget,
                             final_reserve=final_reserve(self.config.shutdown_grace))
        self.runner.on_result(self._on_result)
        self.results: dict[str, CheckResult] = {}
        # The result of each scheduled run's task, while someone may still ask (/probe).
        self._run_results: weakref.WeakKeyDictionary[asyncio.Task[None], CheckResult] = (
            weakref.WeakKeyDictionary())
        # When each route's latest run (scheduled or on demand) started: /probe's spacing.
        self._run_started: dict[str, float] = {}
        self.checks = self._checks(self.config)
        jobs = self._jobs(self.config, self.checks)
        self.scheduler = Scheduler(
            jobs, clock=clock, sleep=sleep,
            on_skip=self._on_skip,
            on_deadline=lambda name: log.error("selfcheck_deadline_cancelled", route=name),
            on_crash=lambda _name: self.metrics.internal_errors.labels(
                kind="scheduled_job").inc())
        self._export_schedule(jobs)
        self.heartbeats = Heartbeats(self.config.heartbeat, self.metrics, sleep=sleep,
                                     routes=list(self.checks))
        self.leakwatch = self._leakwatch(self.config)
        self.drill = self._drill(self.config)
        # How MTA-STS policies are fetched: port 443 and the system's CAs unless a test
        # says otherwise (the configuration cannot).
        self._policy_fetcher = policy_fetcher
        self.dns = self._dns(self.config)
        self.http = self._http(self.config)
        self.started_at = time.time()
        self.ready = False
        self.stopping = False
        self._supervising: asyncio.Task[None] | None = None

    # -- building -----------------------------------------------------------------------

    @staticmethod
    def _checks(config: Config) -> dict[str, RoundTrip]:
        if not config.selfcheck.routes:
            return {}  # a leak watcher alone needs no probe secret (nor a warning about one)
        secret = probe_secret(config.selfcheck)
        return {r.name: RoundTrip(r, config.selfcheck, secret) for r in config.selfcheck.routes}

    def _jobs(self, config: Config, checks: dict[str, RoundTrip]) -> list[Job]:
        sc = config.selfcheck
        return [
            Job(name=name, run=self._make_run(name), interval=sc.interval, jitter=sc.jitter,
                # A backstop: the runner enforces the check's own deadline first.
                deadline=check.deadline + check.cleanup_timeout + 5,
                # A /probe run this close before a due time does that run's work.
                on_demand_window=min(config.server.probe_min_interval, sc.interval)
                if config.server.probe else 0.0)
            for name, check in checks.items()
        ]

    def _export_schedule(self, jobs: list[Job]) -> None:
        """Each route's interval, which the alert rules are relative to."""
        for job in jobs:
            self.metrics.schedule_route(job.name, job.interval)

    def _make_run(self, name: str) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            check = self.checks.get(name)  # looked up at run time, so a reload applies
            if check is None:
                return
            run_id = new_run_id()
            self._run_started[name] = self._clock()
            self.heartbeats.run_started(name, run_id)
            try:
                result = await self.runner.execute(check, run_id)
                if (task := asyncio.current_task()) is not None:
                    self._run_results[task] = result  # for /probe callers joining this run
            finally:
                if name not in self.checks:  # removed by a reload while this run was going
                    self.metrics.forget_route(name)
                    self.results.pop(name, None)
        return run

    def _leakwatch(self, config: Config, handover: LeakWatch | None = None) -> LeakWatch | None:
        if config.leakwatch is None:
            return None
        from daemon.logwatch.watcher import LeakWatch

        stdin = handover.source if handover is not None and handover.source.kind == "stdin" \
            else None
        return LeakWatch(config.leakwatch, self.metrics, clock=self._clock, sleep=self._sleep,
                         stdin=stdin)

    def _drill(self, config: Config) -> ScheduledDrill | None:
        if config.drill is None or config.drill.schedule is None:
            return None
        from daemon.drill.component import ScheduledDrill

        # A drill interrupted by our SIGTERM parks the sinkhole within the grace.
        return ScheduledDrill(config, self.metrics, clock=self._clock, sleep=self._sleep,
                              interrupt_budget=max(1.0, config.shutdown_grace - CLOSE_BUDGET))

    def _dns(self, config: Config) -> DnsChecks | None:
        if not config.dns:
            return None
        from daemon.dns.component import DnsChecks

        return DnsChecks(config.dns, self.metrics, fetcher=self._policy_fetcher,
                         clock=self._clock, sleep=self._sleep)

    def _http(self, config: Config) -> HttpServer:
        server = config.server
        return HttpServer(self, self.metrics, server.host, server.port,
                          max_connections=server.max_connections,
                          header_timeout=server.header_timeout,
                          clock=self._clock, sleep=self._sleep)

    def _on_result(self, result: CheckResult) -> None:
        if result.route not in self.checks:
            return  # a reload removed the route while this run was going
        self.results[result.route] = result
        self.heartbeats.run_finished(result)
        if self.dns is not None:
            self.dns.route_result(result)  # the sending IP of ips_from_route

    def _on_skip(self, name: str, count: int) -> None:
        self.metrics.skipped_runs.labels(name).inc(count)
        log.warning("selfcheck_skipped", route=name, skipped=count,
                    why="previous run still going")

    @property
    def listen_port(self) -> int:
        """The port /metrics is served on (the bound one when the config says 0)."""
        return self.http.bound_port

    # -- what the endpoints see -----------------------------------------------------------

    def problems(self) -> dict[str, str]:
        return self.supervisor.problems()

    def degraded(self) -> dict[str, str]:
        """Components alive but unable to work, with why (a restart would not help)."""
        return {name: why for name, (_code, why) in self.supervisor.degraded().items()}

    def routes_failing(self) -> dict[str, str]:
        """Routes whose latest run failed, with its reason (the monitor's verdict on mail)."""
        return {name: result.reason.value if result.reason else "failure"
                for name, result in self.results.items()
                if not result.success and name in self.checks}

    def is_ready(self) -> bool:
        return self.ready and not self.stopping

    def status(self) -> dict[str, Any]:
        """The configuration in force and the state of everything; no secrets."""
        cfg = self.config
        routes: dict[str, Any] = {}
        for name in self.checks:
            result = self.results.get(name)
            routes[name] = None if result is None else {
                **result.as_dict(verbose=True), "finished_at": result.finished_at}
        leak: dict[str, Any] | None = None
        if self.leakwatch is not None:
            lw = self.leakwatch
            leak = {
                "source": lw.config.source,
                "state_file": {"path": str(lw.state.path) if lw.state.path else None,
                               "last_saved_at": lw.state.last_saved_at,
                               "last_error": lw.state.last_error},
                "pending_alerts": [] if lw.outbox is None else [
                    {"id": a.id, "summary": a.summary, "severity": a.severity,
                     "alerts": a.count, "attempts": a.attempts, "last_error": a.last_error,
                     "age": round(lw.outbox.age(a), 3)}
                    for a in lw.outbox.pending()],
                "queue": lw.queue_status(),
            }
        return {
            "version": __version__,
            "started_at": self.started_at,
            "stopping": self.stopping,
            "config": {
                "listen": self.http.listen,
                "http": {"max_connections": self.http.guard.cap,
                         "header_timeout": cfg.server.header_timeout,
                         "probe": cfg.server.probe,
                         "probe_token_set": cfg.server.probe_token is not None,
                         "probe_min_interval": cfg.server.probe_min_interval},
                "interval": cfg.selfcheck.interval,
                "timeout": cfg.selfcheck.timeout,
                "shutdown_grace": cfg.shutdown_grace,
                "routes": list(self.checks),
                "heartbeats": [t.name for t in cfg.heartbeat],
                "leakwatch": None if cfg.leakwatch is None else cfg.leakwatch.source,
                "dns": [e.name for e in cfg.dns],
                "logging": cfg.logging.model_dump(),
            },
            "problems": self.problems(),
            "degraded": self.degraded(),
            "components": self.supervisor.states(),
            "routes": routes,
            "leakwatch": leak,
            "dns": None if self.dns is None else self.dns.status(),
        }

    def probe_enabled(self) -> bool:
        return self.config.server.probe

    def probe_token(self) -> str | None:
        token = self.config.server.probe_token
        return None if token is None else token.get_secret_value()

    def probe_refused(self, outcome: str) -> None:
        self.metrics.probe_requests.labels(outcome).inc()

    async def probe(self, route: str) -> ProbeAnswer:
        """GET /probe?route=NAME: join the run in flight, answer the latest result if the
        route's last run started within `probe_min_interval`, else run the route now."""
        if route not in self.checks:
            self.probe_refused("refused")
            return ProbeAnswer(404, {"error": f"no such route: {route}",
                                     "routes": list(self.checks)})
        if self.stopping:
            self.probe_refused("refused")
            return ProbeAnswer(503, {"error": "selfcheckd is stopping"})
        spacing = self.config.server.probe_min_interval
        in_flight = route in self.scheduler.running
        since = self._clock() - self._run_started.get(route, -math.inf)
        if not in_flight and since < spacing:
            # A scrape that fails (429) loses the series and fires up == 0 alerts, and
            # Prometheus ignores Retry-After: the latest verdict, marked cached, is
            # what it can use.
            wait = math.ceil(spacing - since)
            result = self.results.get(route)
            if result is None:  # that run ended without a verdict (cancelled)
                self.probe_refused("refused")
                return ProbeAnswer(429, {"error": f"a run of {route} started {since:.0f}s "
                                                  f"ago without a verdict; try again later"},
                                   headers={"Retry-After": str(wait)})
            self.metrics.probe_requests.labels("cached").inc()
            return ProbeAnswer(200, {**self._result_body(result), "cached": True,
                                     "next_run_in": wait}, result=result, cached=True)
        task = self.scheduler.fire_now(route)
        if task is None:
            self.probe_refused("refused")
            return ProbeAnswer(503, {"error": "selfcheckd is not scheduling yet (starting up)"})
        self.metrics.probe_requests.labels("joined" if in_flight else "ran").inc()
        log.info("selfcheck_probe_requested", route=route, joined=in_flight)
        # asyncio.wait never cancels what it waits for: a client that hangs up
        # does not cancel a run the scheduler owns.
        await asyncio.wait({task})
        result = self._run_results.get(task)
        if result is None:
            why = "selfcheckd is stopping" if self.stopping else "it was cancelled"
            return ProbeAnswer(503, {"error": f"the run ended without a verdict: {why}"})
        return ProbeAnswer(200, {**self._result_body(result), "cached": False},
                           result=result)

    @staticmethod
    def _result_body(result: CheckResult) -> dict[str, Any]:
        return {**result.as_dict(verbose=True), "started_at": result.started_at,
                "finished_at": result.finished_at}

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen, restore the leak watcher, start every component. Raises OSError on bind."""
        await self.http.bind()
        if self.leakwatch is not None:
            self.leakwatch.open()
            await self.leakwatch.prime()
        self.supervisor.start(self.http)
        self.supervisor.start(ScheduledChecks(self.scheduler))
        self.supervisor.start(self.heartbeats)
        for component in self.leakwatch.components() if self.leakwatch else []:
            self.supervisor.start(component)
        if self.drill is not None:
            self.supervisor.start(self.drill)
        if self.dns is not None:
            self.supervisor.start(self.dns)
        self._supervising = asyncio.create_task(self.supervisor.run(), name="supervisor")
        await self.supervisor.started()
        self.ready = True
        log.info("selfcheckd_started", version=__version__, listen=self.http.listen,
                 routes=len(self.checks), interval=self.config.selfcheck.interval,
                 leakwatch=self.config.leakwatch is not None, dns=len(self.config.dns),
                 components=",".join(self.supervisor.names()))

    async def shutdown(self) -> None:
        """Stop everything within `shutdown_grace` (+ CLOSE_BUDGET to close clients)."""
        if self.stopping:
            return
        self.stopping = True
        grace = self.config.shutdown_grace
        self.budget.start(grace)
        final = final_reserve(grace)
        cleanup = cleanup_reserve(grace, self.config.selfcheck.cleanup_timeout)
        log.info("selfcheckd_stopping", grace=grace, running=sorted(self.scheduler.running))
        # A drill in flight starts its cleanup now (parking the sinkhole in defer),
        # alongside everything else, within the grace.
        drill_stopped = None if self.drill is None else asyncio.create_task(
            self.drill.stop(timeout=grace), name="drill-stop")
        self.scheduler.stop()
        if self.dns is not None:  # a DNS run has nothing to clean up: cancelled at once
            await self.dns.stop(timeout=min(1.0, self.budget.remaining()))
        if self.leakwatch is not None:  # read nothing new from here on
            await self.supervisor.remove(self.leakwatch.source_loop.name,
                                         timeout=min(1.0, self.budget.remaining()))
        await self._finish_runs(cleanup, final)
        if self.leakwatch is not None and self.leakwatch.opened:
            await self._close_leakwatch(self.leakwatch)
        await self.heartbeats.close(grace=min(2.0, self.budget.remaining()))
        if drill_stopped is not None:
            await asyncio.wait({drill_stopped}, timeout=self.budget.remaining())
        self.supervisor.stop()
        if self._supervising is not None:
            done, _ = await asyncio.wait({self._supervising},
                                         timeout=self.budget.remaining() + CLOSE_BUDGET)
            if not done:
                log.error("selfcheckd_components_ignored_stop")
            elif self._supervising.exception() is not None:
                log.error("supervisor_failed", exc_info=self._supervising.exception())
        await self.http.close()  # if the http component never ran
        log.info("selfcheckd_stopped")

    async def _finish_runs(self, cleanup: float, final: float) -> None:
        """Runs in flight get what is left of the grace, then are cancelled (cleanup still runs)."""
        if await self.scheduler.wait_idle(self.budget.remaining(cleanup + final)):
            return
        log.warning("selfcheckd_cancelling_runs", running=sorted(self.scheduler.running))
        if not await self.scheduler.cancel_running(timeout=self.budget.remaining(final)):
            # Their cleanups are still inside their own (budget-bounded) time.
            log.warning("selfcheckd_runs_still_cleaning_up", running=sorted(self.scheduler.running))

    async def _close_leakwatch(self, watch: LeakWatch) -> None:
        """Save, flush undelivered alerts within the budget, save what is left."""
        # Each step is bounded: a state volume that hangs (NFS) costs its share of
        # the budget, never the exit.
        try:
            await watch.save(timeout=min(2.0, self.budget.remaining(reserve=1.0)))
            if watch.outbox is not None and watch.outbox.pending():
                await watch.outbox.flush(self.budget.remaining(reserve=0.5))
            for component in watch.components():
                await self.supervisor.remove(component.name, timeout=min(
                    1.0, self.budget.remaining() + CLOSE_BUDGET / 2))
            await watch.close(timeout=self.budget.remaining() + CLOSE_BUDGET / 2)
        except Exception:  # the rest of the shutdown must still happen
            log.exception("leakwatch_stop_failed")

    # -- reload ---------------------------------------------------------------------------

    async def reload(self) -> bool:
        """SIGHUP: apply the file's configuration completely, or not at all."""
        try:
            return await self._reload()
        except Exception as exc:  # a bug: say so, keep running with what is in force
            log.exception("config_reload_failed")
            self.metrics.internal_errors.labels(kind="reload").inc()
            return self._refuse([f"reload failed: {type(exc).__name__}: {exc}"])

    async def _reload(self) -> bool:
        try:
            new = load_config(self.config_path).config
        except ConfigError as exc:
            return self._refuse(exc.problems)
        problems = self._not_live(new)
        if problems:
            return self._refuse(problems)
        old = self.config
        # Everything built from the new config is built before any of it is applied, so
        # a value that only fails here refuses the reload instead of half-applying it.
        try:
            checks = self._checks(new)
            jobs = self._jobs(new, checks)
        except ValueError as exc:
            return self._refuse([f"cannot apply: {exc}"])
        http: HttpServer | None = None
        if new.server.listen != old.server.listen:
            http = self._http(new)
            try:
                await http.bind()
            except OSError as exc:
                return self._refuse([f"server.listen: cannot listen on {new.server.listen}: "
                                     f"{exc.strerror or exc}"])
        # Nothing below can fail on bad input: commit.
        changed = _changed_sections(old, new)
        self.config = new
        redact_secrets(old.secret_values() | new.secret_values())
        self.runner.final_reserve = final_reserve(new.shutdown_grace)
        removed = set(self.checks) - {r.name for r in new.selfcheck.routes}
        self.checks = checks
        self.scheduler.replace_jobs(jobs)
        self._export_schedule(jobs)
        for name in removed:
            self.results.pop(name, None)
            self.metrics.forget_route(name)
        if new.heartbeat != old.heartbeat:
            await self._swap_heartbeats(new)
        else:
            self.heartbeats.set_routes(self.checks)
        if new.leakwatch != old.leakwatch:
            await self._swap_leakwatch(new)
        if new.drill != old.drill:
            await self._swap_drill(new)
        if new.dns != old.dns:
            await self._swap_dns(new)
        if http is not None:
            old_http, self.http = self.http, http
            await self.supervisor.replace(http, timeout=SWAP_TIMEOUT)
            await old_http.close()
        else:
            self.http.guard.set_cap(connection_cap(new.server.max_connections))
        self.metrics.config_reload_ok.set(1)
        # Said before logging changes, so it is seen whatever the new level is.
        log.info("config_reloaded", changed=",".join(changed) or "nothing",
                 routes=len(self.checks))
        if new.logging != old.logging:
            configure_logging(new.logging.format, new.logging.level,
                              timestamps=new.logging.timestamps)
        return True

    def _refuse(self, problems: list[str]) -> bool:
        self.metrics.config_reload_ok.set(0)
        for problem in problems:
            log.error("config_reload_rejected", problem=problem)
        return False

    def _not_live(self, new: Config) -> list[str]:
        """Keys that cannot change while running (the reload is refused, nothing applied)."""
        if new.drill != self.config.drill and self.drill is not None \
                and self.drill.current is not None:
            return ["drill: cannot change while a drill is running (it would be cut short); "
                    "reload again once it has ended"]
        old_src = self.config.leakwatch.source if self.config.leakwatch else None
        new_src = new.leakwatch.source if new.leakwatch else None
        if old_src != new_src and "stdin" in (old_src, new_src):
            return ["leakwatch.source: cannot change to or from stdin while running "
                    "(standard input is read once; restart selfcheckd)"]
        old_server, new_server = self.config.server, new.server
        if new_server.header_timeout != old_server.header_timeout \
                and new_server.listen == old_server.listen:
            return ["server.header_timeout: cannot change while listening on the same address "
                    "(the listener keeps its timeout); restart selfcheckd"]
        return []

    async def _swap_heartbeats(self, new: Config) -> None:
        old = self.heartbeats
        self.heartbeats = Heartbeats(new.heartbeat, self.metrics, sleep=self._sleep,
                                     routes=list(self.checks))
        self.heartbeats.carry_results_from(old)
        await old.close(grace=2.0)
        await self.supervisor.replace(self.heartbeats, timeout=SWAP_TIMEOUT)
        for target in {t.name for t in old.targets} - {t.name for t in new.heartbeat}:
            self.metrics.forget_heartbeat_target(target)

    async def _swap_drill(self, new: Config) -> None:
        if self.drill is not None:
            await self.supervisor.remove(self.drill.name, timeout=SWAP_TIMEOUT)
        self.drill = self._drill(new)
        if self.drill is not None:
            self.supervisor.start(self.drill)

    async def _swap_dns(self, new: Config) -> None:
        """Entries changed: the component takes the new ones (keeping cadences and results
        of the others), is started for the first entries, or stopped after the last."""
        if self.dns is not None and new.dns:
            self.dns.replace(new.dns)
            return
        if self.dns is not None:
            old, self.dns = self.dns, None
            await old.stop(timeout=SWAP_TIMEOUT)
            old.replace([])  # drops every entry's series
            await self.supervisor.remove(old.name, timeout=SWAP_TIMEOUT)
            return
        self.dns = self._dns(new)
        if self.dns is not None:
            self.supervisor.start(self.dns)

    async def _swap_leakwatch(self, new: Config) -> None:
        old = self.leakwatch
        handover: dict[str, Any] | None = None
        if old is not None:
            for component in old.components():
                await self.supervisor.remove(component.name, timeout=SWAP_TIMEOUT)
            handover = old.snapshot()
            await old.close(timeout=SWAP_TIMEOUT)
        self.leakwatch = self._leakwatch(new, handover=old)
        if self.leakwatch is not None:
            self.leakwatch.open(handover)
            await self.leakwatch.prime()
            for component in self.leakwatch.components():
                self.supervisor.start(component)


def _changed_sections(old: Config, new: Config) -> list[str]:
    names = ["selfcheck", "server", "logging", "heartbeat", "leakwatch", "drill", "dns",
             "shutdown_grace"]
    return [n for n in names if getattr(old, n) != getattr(new, n)]


async def _main(loaded: LoadedConfig, config_path: Path | None) -> int:
    daemon = Daemon(loaded, config_path)
    loop = asyncio.get_running_loop()
    install_exception_hooks(loop, daemon.metrics)
    stop = asyncio.Event()
    reload = asyncio.Event()
    signals_seen = 0

    def on_stop(signame: str) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen > 1:
            log.warning("selfcheckd_forced_exit", signal=signame)
            os._exit(EXIT_FORCED)
        log.info("selfcheckd_signal", signal=signame)
        daemon.budget.start(daemon.config.shutdown_grace)  # the budget runs from the signal
        stop.set()

    # Before the start, so a SIGTERM while starting is a clean stop, not death by signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop, sig.name)
    loop.add_signal_handler(signal.SIGHUP, reload.set)
    try:
        try:
            await daemon.start()
        except OSError as exc:  # binding comes first: nothing else has started
            why = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
            print(f"selfcheckd: cannot listen on {daemon.config.server.listen}: {why} "
                  "(set [server] listen or SELFCHECKD_LISTEN)", file=sys.stderr)
            return EXIT_STARTUP
        except Exception as exc:  # a bug: the traceback in the log, then one line last
            log.exception("selfcheckd_start_failed")
            await daemon.shutdown()
            print(f"selfcheckd: could not start: {type(exc).__name__}: {exc}",
                  file=sys.stderr)
            return EXIT_STARTUP
        while not stop.is_set():
            await _first(stop.wait(), reload.wait())
            if reload.is_set() and not stop.is_set():
                reload.clear()
                await _reload_unless_stopped(daemon, stop)
        await daemon.shutdown()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            with contextlib.suppress(ValueError, RuntimeError):
                loop.remove_signal_handler(sig)
        # Removing the handler restored SIGHUP's default, which kills: a reload asked for
        # in the last moments of the exit must not turn exit 0 into death by signal.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    return EXIT_OK


async def _reload_unless_stopped(daemon: Daemon, stop: asyncio.Event) -> None:
    """Reload; a SIGTERM meanwhile wins (the process stops, a half-done reload is moot)."""
    task = asyncio.create_task(daemon.reload(), name="reload")
    stopped = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not task.done():
            log.warning("config_reload_interrupted", why="stopping")
            task.cancel()
        await asyncio.wait({task, stopped})


async def _first(*aws: Awaitable[Any]) -> None:
    """Wait until the first of `aws` completes; the others are cancelled."""
    tasks = [asyncio.ensure_future(aw) for aw in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)


def serve(loaded: LoadedConfig, config_path: Path | None = None) -> int:
    previous = sys.unraisablehook, threading.excepthook
    try:
        return asyncio.run(_main(loaded, config_path))
    finally:  # after asyncio.run's own teardown, which may still report through them
        sys.unraisablehook, threading.excepthook = previous
