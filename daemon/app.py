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
from daemon.retry import Backoff
from daemon.roundtrip.check import RoundTrip
from daemon.roundtrip.probe import probe_secret
from daemon.stopping import StopBudget
from daemon.supervisor import Progress, Supervisor

if TYPE_CHECKING:  # imported when configured: botocore and the DNS libraries are heavy
    from daemon.dns.component import DnsChecks
    from daemon.dns.mta_sts import PolicyFetcher
    from daemon.drill.component import ScheduledDrill
    from daemon.ha import Leadership, LeaseKeeper, LeaseTable
    from daemon.logwatch.config import S3Location
    from daemon.logwatch.watcher import LeakWatch
    from daemon.state_s3 import S3StateStore

log = structlog.get_logger("daemon.app")

EXIT_OK, EXIT_STARTUP, EXIT_FORCED = 0, 3, 1
# Reading the leak watcher's S3 state at a takeover: each try's deadline, and the
# longest wait between tries while S3 does not answer.
STATE_READ_TIMEOUT = 10.0
STATE_READ_MAX_BACKOFF = 30.0
# After the grace: stopping the components and closing listeners and clients.
CLOSE_BUDGET = 2.0
# Replacing a component on reload waits this long for the old one to end.
SWAP_TIMEOUT = 5.0
# A leader stepping down waits this long for its components to end, and for its
# state to be saved (the save is fenced: a late one is refused, not harmful).
STEP_DOWN_STOP = 1.0
STEP_DOWN_SAVE = 2.0

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


class StateReader:
    """The `leakwatch-state` component: reads the leak watcher's saved state, then starts it.

    The state is read (an S3 object whole, and claimed) before the watcher opens: a
    line read before would be saved over a state not yet known. While the store does
    not answer (S3, or a state volume that does not hand the file over within the
    read deadline: daemon/state_io.py), the read is retried with backoff and the
    component is degraded (`state_read`); the round trips and heartbeats run
    meanwhile. Once read, the watcher is opened and primed and its components
    started; this one has then finished.
    """

    name = "leakwatch-state"

    def __init__(self, watch: LeakWatch, start: Callable[[LeakWatch], None], sleep: Sleep) -> None:
        self.watch = watch
        self._start = start
        self._sleep = sleep
        self._backoff = Backoff(initial=1.0, maximum=STATE_READ_MAX_BACKOFF)
        self.progress_deadline = STATE_READ_TIMEOUT + STATE_READ_MAX_BACKOFF + 30.0
        self.done = False

    @property
    def may_finish(self) -> bool:
        return self.done

    async def run(self, progress: Progress) -> None:
        from daemon.state_s3 import S3StateStore

        watch = self.watch
        # An S3 read has its deadline here; a file's is the watcher's (open's read_timeout).
        timeout = STATE_READ_TIMEOUT if isinstance(watch.state, S3StateStore) else None
        failures = 0
        why = watch.unread_reason  # a first read already failed (the file store's open)
        while not watch.restored:
            if why is None and (why := await watch.restore_saved(timeout)) is None:
                break
            failures += 1
            watch.count_error("state_read")
            delay = round(self._backoff.delay(failures), 3)
            # Alive and saying why: degraded. A restart would meet the same store.
            progress.retrying(f"state not read: {why}", "state_read")
            if failures == 1:
                log.error("state_file_unreadable", path=str(watch.state.path), error=why,
                          retry_in=delay,
                          consequence="the leak watcher reads no line until it can read "
                                      "the state (retried), and saves nothing over it")
            await self._sleep(delay)
            why = None
        if failures:
            log.info("state_file_read", path=str(watch.state.path), after_failures=failures)
        await watch.open()
        await watch.prime()
        self._start(watch)
        self.done = True


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
        lease_table: LeaseTable | None = None,
        holder: str | None = None,
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
        # [ha]: the leader's work (the scheduler, heartbeats, the leak watcher) runs only
        # while this process holds the lease; without it, always (daemon/ha.py).
        self.ha = self.config.ha
        self.leading = self.ha is None
        self.token: int | None = None
        self._lease_table = lease_table
        self._holder = holder
        self.keeper: LeaseKeeper | None = None
        self.leadership: Leadership | None = None
        # One start or stop of the leader's work at a time, and none inside a reload.
        self._transition = asyncio.Lock()
        # Halted, its components and state not yet stopped and saved.
        self._cleanup_pending = False
        # Schedulers of earlier terms whose cancelled runs may still delete their probes.
        self._retired: list[Scheduler] = []
        self._halted: list[asyncio.Task[None]] = []
        self._cleaning: asyncio.Task[None] | None = None
        # Set at SIGTERM: the step-down releases the lease as soon as the state is saved.
        self._release_when_saved = False
        self.runner.halted = lambda: not self.leading
        jobs = self._jobs(self.config, self.checks)
        self.scheduler = self._scheduler(jobs)
        if self.leading:  # a standby exports no route series (its rules would fire)
            self._export_schedule(jobs)
        self.heartbeats = Heartbeats(self.config.heartbeat, self.metrics, sleep=sleep,
                                     routes=list(self.checks))
        self.leakwatch = self._leakwatch(self.config) if self.leading else None
        if self.leakwatch is None and self.config.leakwatch is not None:
            # A standby imports now what a takeover needs (botocore's service models
            # among it): a takeover is seconds of nobody watching, not the time to load.
            import daemon.logwatch.watcher  # noqa: F401
        self.drill = self._drill(self.config) if self.leading else None
        # How MTA-STS policies are fetched: port 443 and the system's CAs unless a test
        # says otherwise (the configuration cannot).
        self._policy_fetcher = policy_fetcher
        self.dns = self._dns(self.config) if self.leading else None
        self.metrics.leader.set(1 if self.leading else 0)
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

    def _scheduler(self, jobs: list[Job]) -> Scheduler:
        return Scheduler(
            jobs, clock=self._clock, sleep=self._sleep,
            on_skip=self._on_skip,
            on_deadline=lambda name: log.error("selfcheck_deadline_cancelled", route=name),
            on_crash=lambda _name: self.metrics.internal_errors.labels(
                kind="scheduled_job").inc())

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
        from daemon.state_s3 import S3StateStore

        stdin = handover.source if handover is not None and handover.source.kind == "stdin" \
            else None
        state: S3StateStore | None = None
        if (location := config.leakwatch.state_s3) is not None:
            if handover is not None and isinstance(handover.state, S3StateStore) \
                    and handover.state.path == location:
                state = handover.state  # a reload: the same object, on the same ETag
            else:
                state = self._s3_store(config, location)
        return LeakWatch(config.leakwatch, self.metrics, clock=self._clock, sleep=self._sleep,
                         stdin=stdin, state=state)

    def _s3_store(self, config: Config, location: S3Location) -> S3StateStore:
        """The S3 state of this term: written under this process's holder id and token."""
        from daemon.ha import local_holder_id
        from daemon.state_s3 import S3StateStore

        ha = config.ha
        store = S3StateStore(
            location, self.metrics,
            region=ha.region if ha else None, endpoint_url=ha.endpoint_url if ha else None,
            holder=self.keeper.holder if self.keeper is not None else local_holder_id(),
            token=self.token)
        store.on_fenced = self._fenced
        return store

    def _fenced(self, why: str) -> None:
        """The state store refused a save: another process wrote the state since ours."""
        if self.keeper is not None and self.leading:
            # A newer leader exists: stop now, not when our renewal is refused.
            self.keeper.lose(f"the leak watcher's state was {why}")

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
        if result.route not in self.checks or not self.leading:
            return  # a reload removed the route, or this task stopped leading, meanwhile
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
            "role": "leader" if self.leading else "standby",
            "ha": self._ha_status(),
            "problems": self.problems(),
            "degraded": self.degraded(),
            "components": self.supervisor.states(),
            "routes": routes,
            "leakwatch": leak,
            "dns": None if self.dns is None else self.dns.status(),
        }

    def _ha_status(self) -> dict[str, Any] | None:
        """Who holds the lease and under which token; None without [ha]."""
        if self.ha is None:
            return None
        if self.keeper is None:
            return {"role": "standby", "holder": None, "token": None, "leader": None}
        status = self.keeper.status()
        # The role is what this process does, which the lease alone does not say (the
        # work stops at valid_until, and starts only after the state is read).
        status["role"] = "leader" if self.leading else "standby"
        status["token"] = self.token if self.leading else None
        return status

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
        if not self.leading:
            self.probe_refused("refused")
            leader = self.keeper.leader if self.keeper is not None else None
            return ProbeAnswer(503, {"error": "this task is standby: the leader runs the "
                                              "round trips",
                                     "leader": leader.holder if leader else None})
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
        """Listen, restore the leak watcher, start every component. Raises OSError on bind.

        With [ha], only the lease and leadership loops start here: the leader's work
        starts when the lease is won (`start_leading`).
        """
        await self.http.bind()
        self.supervisor.start(self.http)
        if self.ha is None:
            await self._start_work()
        else:
            from daemon.ha import DynamoLeaseTable, Leadership, LeaseKeeper, holder_id

            holder = self._holder if self._holder is not None else await holder_id()
            table = self._lease_table if self._lease_table is not None \
                else DynamoLeaseTable(self.ha)
            self.keeper = LeaseKeeper(self.ha, table, holder, self.metrics, clock=self._clock,
                                      sleep=self._sleep)
            self.leadership = Leadership(self.keeper, self, self.metrics)
            self.supervisor.start(self.keeper)
            self.supervisor.start(self.leadership)
        self._supervising = asyncio.create_task(self.supervisor.run(), name="supervisor")
        await self.supervisor.started()
        self.ready = True
        log.info("selfcheckd_started", version=__version__, listen=self.http.listen,
                 routes=len(self.checks), interval=self.config.selfcheck.interval,
                 leakwatch=self.config.leakwatch is not None, dns=len(self.config.dns),
                 holder=self.keeper.holder if self.keeper is not None else None,
                 components=",".join(self.supervisor.names()))

    async def _start_work(self) -> None:
        """Open the leak watcher and start the leader's components (a state in S3, or a
        state file the volume did not hand over in time, is read by the `leakwatch-state`
        component first: the store may not answer at once)."""
        watch = self.leakwatch
        reader: StateReader | None = None
        if watch is not None:
            if not getattr(watch.state, "needs_fetch", False):
                await watch.open()  # a state file: read at once, within its deadline
            if watch.restored:
                await watch.prime()
            else:  # S3, or a volume that did not hand the file over: read by a component
                reader = StateReader(watch, self._start_leakwatch, self._sleep)
        if not self.leading:  # halted while the watcher opened: start nothing
            return
        self.supervisor.start(ScheduledChecks(self.scheduler))
        self.supervisor.start(self.heartbeats)
        if reader is not None:
            self.supervisor.start(reader)
        elif watch is not None:
            self._start_leakwatch(watch)
        if self.drill is not None:
            self.supervisor.start(self.drill)
        if self.dns is not None:
            self.supervisor.start(self.dns)

    def _start_leakwatch(self, watch: LeakWatch) -> None:
        if self.leading and watch is self.leakwatch:  # not once this task stepped down
            for component in watch.components():
                self.supervisor.start(component)

    # -- leader and standby (daemon/ha.py) ------------------------------------------------

    async def start_leading(self, token: int) -> None:
        """The lease is ours (fencing token `token`): build the leader's work afresh and
        start it. Everything is read anew (the state at takeover): another task may
        have led since this one last did."""
        async with self._transition:
            if self.stopping:
                return
            await self._cleanup_leadership(save=False)  # a previous term cut short
            self.leading, self.token = True, token
            self.results.clear()
            self._run_started.clear()
            jobs = self._jobs(self.config, self.checks)
            self.scheduler = self._scheduler(jobs)
            self._export_schedule(jobs)
            self.heartbeats = Heartbeats(self.config.heartbeat, self.metrics,
                                         sleep=self._sleep, routes=list(self.checks))
            self.leakwatch = self._leakwatch(self.config)
            self.drill = self._drill(self.config)
            self.dns = self._dns(self.config)
            self._cleanup_pending = True
            await self._start_work()
            log.info("ha_leader_work_started", token=token,
                     components=",".join(self.supervisor.names()))

    async def stop_leading(self, why: str, *, holding: bool) -> None:
        """Stop acting as leader now; then stop and save what it ran.

        Acting stops before the first await (`_halt`): runs and components are
        cancelled in the same instant, so nothing of the leader's happens after
        the lease's deadline however long the save takes. The save is kept when
        the lease is still ours (`holding`) or the store refuses a deposed
        leader's write; a file, which cannot, is not written once the lease may
        have passed to another task. The cleanup is one task, shielded: a caller
        cancelled meanwhile (the shutdown stopping the leadership loop) does not
        cut the save short, and the next caller joins it.
        """
        self._halt(why)
        if self._cleaning is None or self._cleaning.done():
            if not self._cleanup_pending:
                return
            self._cleaning = asyncio.create_task(
                self._cleanup_locked(save=holding or self._store_fenced(),
                                     save_timeout=self._step_down_save(holding)),
                name="ha-step-down")
        await asyncio.shield(self._cleaning)

    async def _cleanup_locked(self, save: bool, save_timeout: float) -> None:
        async with self._transition:
            await self._cleanup_leadership(save=save, save_timeout=save_timeout)

    def _step_down_save(self, holding: bool) -> float:
        """How long the step-down's save may take. Still holding the lease (a stop), the
        next leader waits for it: briefly. Lease lost (a partition): S3 may be out of
        reach for as long, and the write is fenced (a late one is refused, and seen,
        logged and counted as such), so it may wait up to a lease; but never more than
        half the shutdown grace, which a SIGTERM arriving meanwhile waits for."""
        if holding or self.ha is None:
            return STEP_DOWN_SAVE
        return max(STEP_DOWN_SAVE, min(self.ha.lease_duration, self.config.shutdown_grace / 2))

    def _halt(self, why: str) -> None:
        """Stop every piece of the leader's work at once (synchronous: no await)."""
        if not self.leading:
            return
        self.leading = False
        self.scheduler.stop()
        self.scheduler.cancel_runs()
        names = [ScheduledChecks.name, self.heartbeats.name, StateReader.name]
        if self.leakwatch is not None:
            names += [c.name for c in self.leakwatch.components()]
        if self.dns is not None:  # a DNS run leaves nothing to clean up: cancelled at once
            self.dns.scheduler.stop()
            self.dns.scheduler.cancel_runs()
            names.append(self.dns.name)
        self._halted = [t for name in names if (t := self.supervisor.detach(name)) is not None]
        if self.drill is not None and self.drill.current is not None:
            # Its steps stop now; its cleanup (parking the sinkhole in defer) runs on, and
            # `_cleanup_leadership` waits for it before stopping the component.
            self.drill.current.interrupt("this task stopped leading")
        log.warning("ha_leader_work_halted", why=why, token=self.token,
                    runs_cancelled=sorted(self.scheduler.running))

    def _release_timeout(self) -> float:
        """A release waits for the lease loop's call in progress, then makes its own."""
        assert self.keeper is not None
        return min(2 * self.keeper.renew_every, self.budget.remaining(1.0))

    def _store_fenced(self) -> bool:
        """Whether the state store refuses a deposed leader's late write (S3 does)."""
        return self.leakwatch is not None and self.leakwatch.config.state_s3 is not None

    async def _cleanup_leadership(self, save: bool, save_timeout: float = STEP_DOWN_SAVE) -> None:
        """After `_halt`: wait for the components, save the leak state, forget the series."""
        if not self._cleanup_pending:
            return
        self._halt("cleanup")
        halted, self._halted = self._halted, []
        if halted:
            done, _ = await asyncio.wait(halted, timeout=STEP_DOWN_STOP)
            if len(done) < len(halted):
                log.error("ha_components_ignored_stop", count=len(halted) - len(done))
        watch, self.leakwatch = self.leakwatch, None
        if watch is not None:
            try:  # never a save over a state not read (the watcher did not open)
                await watch.close(timeout=min(save_timeout, self.budget.remaining(0.5)),
                                  save=save and watch.opened)
            except Exception:
                log.exception("leakwatch_stop_failed")
        if self._release_when_saved and self.keeper is not None:
            # A stop: the state is saved, so a standby may take over while a drill in
            # flight still parks the sinkhole below.
            await self.keeper.release(timeout=self._release_timeout())
        dns, self.dns = self.dns, None
        if dns is not None:
            await dns.stop(timeout=STEP_DOWN_STOP)
            dns.replace([])  # its entries' series: a standby exports none
        drill, self.drill = self.drill, None
        if drill is not None:
            await drill.stop(timeout=max(1.0, self.config.shutdown_grace - CLOSE_BUDGET))
            await self.supervisor.remove(drill.name, timeout=STEP_DOWN_STOP)
        if self.scheduler.running:
            self._retired.append(self.scheduler)  # their probe deletions run on
        self._retired = [s for s in self._retired if s.running]
        self._forget_leader_series()
        self.token = None
        self._cleanup_pending = False

    def _forget_leader_series(self) -> None:
        """A standby exports none of the leader's series: the rules that read them
        (SelfcheckStale, LeakWatcherDown, SinkholeLeftInAcceptMode ...) would fire on
        the values it last had."""
        for route in self.checks:
            self.metrics.forget_route(route)
        for target in self.heartbeats.targets:
            self.metrics.forget_heartbeat_target(target.name)
        self.metrics.forget_leakwatch_series()
        self.metrics.forget_drill_series()

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
        if self.ha is not None:
            await self._hand_over()
        # A drill in flight starts its cleanup now (parking the sinkhole in defer),
        # alongside everything else, within the grace.
        drill_stopped = None if self.drill is None or not self.leading else asyncio.create_task(
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
        elif self.leakwatch is not None:  # its state never read: nothing to save over it
            await self.leakwatch.close(save=False)
        if self.leading:  # a standby's heartbeats never ran
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

    async def _hand_over(self) -> None:
        """SIGTERM with [ha]: stop leading at once, save, release the lease.

        A standby waiting for the lease takes over at its next attempt, within
        `renew_every`: so runs in flight are cancelled (their probes still deleted,
        below, within the budget) rather than awaited, and undelivered alerts are
        saved for the new leader rather than flushed here.
        """
        from daemon.ha import Leadership

        holding = self.keeper is not None and self.keeper.leading() is not None
        self._release_when_saved = True
        # Nothing of the leader's happens from this instant (no await before these two):
        # no transition (a start in progress is cancelled), no leader work.
        leadership = self.supervisor.detach(Leadership.name)
        self._halt("selfcheckd is stopping")
        if leadership is not None:
            done, _ = await asyncio.wait({leadership}, timeout=min(1.0, self.budget.remaining()))
            if not done:
                log.error("component_ignored_cancel", component=Leadership.name)
        if self.leadership is not None:
            await self.leadership.step_down("selfcheckd is stopping", holding=holding)
        await self.stop_leading("selfcheckd is stopping", holding=holding)  # what is left
        if self.keeper is not None:  # released already when the leader saved
            await self.keeper.release(timeout=self._release_timeout())
            await self.supervisor.remove(self.keeper.name,
                                         timeout=min(1.0, self.budget.remaining()))
        retired = [t for s in self._retired for t in s.running.values()]
        if retired:  # probe deletions of cancelled runs
            await asyncio.wait(retired, timeout=self.budget.remaining(final_reserve(
                self.config.shutdown_grace)))

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
        # Nothing below can fail on bad input: commit. A start or stop of the leader's
        # work waits for the reload (a step-down halts at once all the same, and what
        # follows starts nothing once this task is not the leader).
        async with self._transition:
            return await self._apply(old, new, checks, jobs, http)

    async def _apply(self, old: Config, new: Config, checks: dict[str, RoundTrip],
                     jobs: list[Job], http: HttpServer | None) -> bool:
        changed = _changed_sections(old, new)
        self.config = new
        redact_secrets(old.secret_values() | new.secret_values())
        self.runner.final_reserve = final_reserve(new.shutdown_grace)
        removed = set(self.checks) - {r.name for r in new.selfcheck.routes}
        self.checks = checks
        self.scheduler.replace_jobs(jobs)
        if self.leading:
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
        if new.ha != self.config.ha:
            return ["ha: cannot change while running (the lease is held under these "
                    "settings); restart selfcheckd"]
        old_s3 = self.config.leakwatch.state_s3 if self.config.leakwatch else None
        new_s3 = new.leakwatch.state_s3 if new.leakwatch else None
        if old_s3 != new_s3:
            return ["leakwatch.state_file: cannot change to, from or between S3 objects while "
                    "running (the state is read whole and claimed at start); restart "
                    "selfcheckd"]
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
        if not self.leading:  # a standby's heartbeats never run: the next term starts them
            return
        self.heartbeats.carry_results_from(old)
        await old.close(grace=2.0)
        await self.supervisor.remove(old.name, timeout=SWAP_TIMEOUT)
        if self.leading:
            self.supervisor.start(self.heartbeats)
        for target in {t.name for t in old.targets} - {t.name for t in new.heartbeat}:
            self.metrics.forget_heartbeat_target(target)

    async def _swap_drill(self, new: Config) -> None:
        if not self.leading:  # a standby runs none: the next term builds it from the config
            return
        if self.drill is not None:
            await self.supervisor.remove(self.drill.name, timeout=SWAP_TIMEOUT)
        self.drill = self._drill(new) if self.leading else None
        if self.drill is not None:
            self.supervisor.start(self.drill)

    async def _swap_dns(self, new: Config) -> None:
        """Entries changed: the component takes the new ones (keeping cadences and results
        of the others), is started for the first entries, or stopped after the last."""
        if not self.leading:  # a standby runs none: the next term builds it from the config
            return
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
        if not self.leading:  # a standby runs none: the next term builds it from the config
            return
        old = self.leakwatch
        handover: dict[str, Any] | None = None
        if old is not None:
            for name in [*(c.name for c in old.components()), StateReader.name]:
                await self.supervisor.remove(name, timeout=SWAP_TIMEOUT)
            if old.opened:  # one still reading its state has nothing to hand over
                handover = old.snapshot()
            await old.close(timeout=SWAP_TIMEOUT, save=old.opened)
        if not self.leading:  # stepped down meanwhile: the old one saved, nothing starts
            self.leakwatch = None
            return
        self.leakwatch = watch = self._leakwatch(new, handover=old)
        if watch is None:
            return
        if handover is not None or not getattr(watch.state, "needs_fetch", False):
            await watch.open(handover)
        if not watch.restored:
            self.supervisor.start(StateReader(watch, self._start_leakwatch, self._sleep))
            return
        await watch.prime()
        self._start_leakwatch(watch)


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
        _ignore_sighup_from_now_on(loop)
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError, RuntimeError):
                loop.remove_signal_handler(sig)
    return EXIT_OK


def _ignore_sighup_from_now_on(loop: asyncio.AbstractEventLoop) -> None:
    """A reload asked for in the last moments of the exit must not turn exit 0 into death
    by signal. `remove_signal_handler` restores SIG_DFL (which kills) before anything can
    set SIG_IGN, and a HUP landing in between killed the daemon (about 1 run in 6 of a
    loaded test): ignore first, then drop asyncio's record of the handler so neither this
    nor `loop.close()` restores the default."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    handlers = getattr(loop, "_signal_handlers", None)  # the Unix loop's, since 3.4
    if isinstance(handlers, dict):
        handlers.pop(signal.SIGHUP, None)
        return
    with contextlib.suppress(ValueError, RuntimeError):  # another loop: the old order
        loop.remove_signal_handler(signal.SIGHUP)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


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
