"""`selfcheckd run`: start-up, serve, graceful shutdown, reload.

Shape after uvicorn: signal handlers only flip state; the main coroutine
notices. SIGTERM/SIGINT stop scheduling, give an in-flight run `shutdown_grace`
seconds, then cancel it (its cleanup still deletes the probe) and exit 0; a
second signal exits at once. SIGHUP parses the config anew and swaps it in only
if it is valid.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler

from daemon import __version__
from daemon.config import ConfigError, LoadedConfig, load_config
from daemon.heartbeat import Heartbeats
from daemon.metrics import Metrics
from daemon.roundtrip.probe import new_run_id
from daemon.roundtrip.result import CheckResult
from daemon.runner import hard_deadline, probe_secret, record_metrics, run_check
from daemon.scheduler import Job, Scheduler

log = structlog.get_logger("daemon.app")

EXIT_OK, EXIT_STARTUP, EXIT_FORCED = 0, 3, 1


class Daemon:
    """Everything `selfcheckd run` owns; tests drive it in-process via `start`/`shutdown`."""

    def __init__(self, loaded: LoadedConfig, config_path: Path | None = None,
                 metrics: Metrics | None = None) -> None:
        self.config = loaded.config
        self.config_path = config_path if config_path is not None else loaded.path
        self.metrics = metrics or Metrics()
        self.metrics.config_reload_ok.set(1)
        self.secret = probe_secret(self.config)
        self.results: dict[str, CheckResult] = {}
        self.heartbeats = Heartbeats(self.config.heartbeat, self.metrics)
        self.scheduler = Scheduler(
            self._jobs(), on_skip=self._on_skip,
            on_deadline=lambda name: log.error("selfcheck_deadline_cancelled", route=name),
        )
        self.started_at = time.time()
        self.ready = False
        self.stopping = False
        self.leakwatch_stop = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._runner: web.AppRunner | None = None
        self.listen_port = 0

    # -- jobs ----------------------------------------------------------------------------

    def _jobs(self) -> list[Job]:
        sc = self.config.selfcheck
        return [
            Job(name=route.name, run=self._make_run(route.name), interval=sc.interval,
                jitter=sc.jitter, deadline=hard_deadline(route, sc) + sc.cleanup_timeout + 5)
            for route in sc.routes
        ]

    def _make_run(self, name: str) -> Any:
        async def run() -> None:
            # Look the route up at run time so a reload's new settings apply.
            route = next((r for r in self.config.selfcheck.routes if r.name == name), None)
            if route is None:
                return
            run_id = new_run_id()
            self.heartbeats.run_started(route.name, run_id)
            result = await run_check(route, self.config.selfcheck, self.secret, run_id=run_id)
            record_metrics(self.metrics, result)
            self.results[route.name] = result
            self.heartbeats.run_finished(result)
        return run

    def _on_skip(self, name: str, count: int) -> None:
        self.metrics.skipped_runs.labels(name).inc(count)
        log.warning("selfcheck_skipped", route=name, skipped=count,
                    why="previous run still going")

    # -- HTTP ----------------------------------------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", make_aiohttp_handler(self.metrics.registry))
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/status", self._status)
        return app

    async def _healthz(self, _request: web.Request) -> web.Response:
        alive = self.scheduler.alive(time.monotonic()) or not self.config.selfcheck.routes
        return web.json_response({"alive": alive}, status=200 if alive else 503)

    async def _readyz(self, _request: web.Request) -> web.Response:
        # Not tied to selfcheck success: a mail outage must not get the monitor killed.
        ready = self.ready and not self.stopping
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    async def _status(self, _request: web.Request) -> web.Response:
        routes: dict[str, Any] = {}
        for route in self.config.selfcheck.routes:
            result = self.results.get(route.name)
            routes[route.name] = None if result is None else {
                **result.as_dict(verbose=True), "finished_at": result.finished_at,
            }
        body = {
            "version": __version__,
            "started_at": self.started_at,
            "interval": self.config.selfcheck.interval,
            "leakwatch": self.config.leakwatch is not None,
            "routes": routes,
        }
        return web.Response(text=json.dumps(body, indent=2), content_type="application/json")

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Listen, then start the scheduler and the leak watcher. Raises OSError on bind."""
        self._runner = web.AppRunner(self.make_app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        server = self.config.server
        site = web.TCPSite(self._runner, server.host, server.port, reuse_address=True)
        try:
            await site.start()
        except OSError:
            await self._runner.cleanup()
            raise
        # The bound port, which differs from the configured one when that is 0.
        self.listen_port = int(self._runner.addresses[0][1])
        await self.heartbeats.start()
        self._tasks.append(asyncio.create_task(self.scheduler.run(), name="scheduler"))
        if self.config.leakwatch is not None:
            from daemon.logwatch.watcher import run_leakwatch

            self._tasks.append(asyncio.create_task(
                run_leakwatch(self.config.leakwatch, self.metrics, self.leakwatch_stop),
                name="leakwatch",
            ))
        self.ready = True
        log.info("selfcheckd_started", version=__version__, listen=f"{server.host}:"
                 f"{self.listen_port}", routes=len(self.config.selfcheck.routes),
                 interval=self.config.selfcheck.interval,
                 leakwatch=self.config.leakwatch is not None)

    async def shutdown(self) -> None:
        """Stop scheduling; let a run finish within the grace; cancel what is left."""
        self.stopping = True
        self.scheduler.stop()
        self.leakwatch_stop.set()
        grace = self.config.shutdown_grace
        log.info("selfcheckd_stopping", grace=grace, running=sorted(self.scheduler.running))
        if not await self.scheduler.wait_idle(grace):
            log.warning("selfcheckd_cancelling_runs", running=sorted(self.scheduler.running))
            budget = self.config.selfcheck.cleanup_timeout + 5
            if not await self.scheduler.cancel_running(timeout=budget):
                log.error("selfcheckd_runs_ignored_cancel", running=sorted(self.scheduler.running))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.heartbeats.close()
        if self._runner is not None:
            await self._runner.cleanup()
        log.info("selfcheckd_stopped")

    async def _swap_heartbeats(self, old: Heartbeats) -> None:
        await self.heartbeats.start()
        await old.close()

    def reload(self) -> bool:
        """SIGHUP: parse the config anew; swap it in only if it is valid."""
        try:
            loaded = load_config(self.config_path)
        except ConfigError as exc:
            self.metrics.config_reload_ok.set(0)
            for problem in exc.problems:
                log.error("config_reload_rejected", problem=problem)
            return False
        self.config = loaded.config
        self.secret = probe_secret(self.config)
        old, self.heartbeats = self.heartbeats, Heartbeats(self.config.heartbeat, self.metrics)
        self._tasks.append(asyncio.create_task(self._swap_heartbeats(old), name="heartbeat-swap"))
        self.scheduler.replace_jobs(self._jobs())
        self.metrics.config_reload_ok.set(1)
        log.info("config_reloaded", routes=len(self.config.selfcheck.routes))
        return True


async def _main(loaded: LoadedConfig, config_path: Path | None) -> int:
    daemon = Daemon(loaded, config_path)
    try:
        await daemon.start()
    except OSError as exc:
        why = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
        print(f"selfcheckd: cannot listen on {daemon.config.server.listen}: {why} "
              "(set [server] listen or SELFCHECKD_LISTEN)", file=sys.stderr)
        return EXIT_STARTUP

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals_seen = 0

    def on_stop(signame: str) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen > 1:
            log.warning("selfcheckd_forced_exit", signal=signame)
            os._exit(EXIT_FORCED)
        log.info("selfcheckd_signal", signal=signame)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop, sig.name)
    loop.add_signal_handler(signal.SIGHUP, daemon.reload)
    try:
        await stop.wait()
        await daemon.shutdown()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
    return EXIT_OK


def serve(loaded: LoadedConfig, config_path: Path | None = None) -> int:
    return asyncio.run(_main(loaded, config_path))
