"""The HTTP side of `selfcheckd run`: /metrics, /healthz, /readyz, /status.

`/healthz` is liveness: 503 naming every component that is dead (crashed,
waiting to restart) or stalled (no progress within its deadline). `/readyz`
says the config is loaded and the daemon is not stopping; it does not depend
on mail flowing, so a mail outage never gets the monitor restarted. `/status`
is JSON for people: the configuration in force, each component's state, the
last result of each route, pending alerts; never a secret. `/probe?route=NAME`
(only with `[server] probe = true`: it sends mail) runs that route's round trip
now, or joins the run in flight, and answers its result.

The listener is the `http` component: bound before anything else starts (a
taken port is a start-up error, or a refused reload), closed when the
component is stopped or replaced.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler

from daemon.supervisor import Progress

# The listener's loop reports progress this often.
TICK = 10.0
# In-flight requests get this long when the listener closes (aiohttp's default is 60 s).
CLOSE_TIMEOUT = 1.0


class StatusSource(Protocol):
    """What the endpoints ask the daemon."""

    def problems(self) -> dict[str, str]: ...

    def is_ready(self) -> bool: ...

    def status(self) -> dict[str, Any]: ...

    async def probe(self, route: str) -> tuple[int, dict[str, Any]]: ...


def make_app(source: StatusSource, registry: CollectorRegistry) -> web.Application:
    async def healthz(_request: web.Request) -> web.Response:
        problems = source.problems()
        return web.json_response({"alive": not problems, "problems": problems},
                                 status=503 if problems else 200)

    async def readyz(_request: web.Request) -> web.Response:
        ready = source.is_ready()
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    async def status(_request: web.Request) -> web.Response:
        return web.Response(text=json.dumps(source.status(), indent=2),
                            content_type="application/json")

    async def probe(request: web.Request) -> web.Response:
        given = request.query.getall("route", [])
        if len(given) > 1:
            return web.json_response({"error": "give one route: /probe?route=NAME"},
                                     status=400)
        route = given[0] if given else ""
        if not route:
            return web.json_response({"error": "give the route: /probe?route=NAME"}, status=400)
        code, body = await source.probe(route)
        return web.Response(text=json.dumps(body, indent=2), status=code,
                            content_type="application/json")

    app = web.Application()
    app.router.add_get("/metrics", make_aiohttp_handler(registry))
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/status", status)
    app.router.add_get("/probe", probe, allow_head=False)  # a HEAD must not send mail
    return app


class HttpServer:
    """The `http` component: one listener on `host:port`."""

    name = "http"
    progress_deadline = 3 * TICK

    def __init__(
        self, app: web.Application, host: str, port: int,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.host = host
        self._sleep = sleep
        self.port = port
        self._app = app
        self._runner: web.AppRunner | None = None
        self.bound_port = 0

    @property
    def listen(self) -> str:
        return f"{self.host}:{self.bound_port or self.port}"

    async def bind(self) -> None:
        """Start listening; raises OSError (port taken, address not local)."""
        runner = web.AppRunner(self._app, access_log=None, handle_signals=False,
                               shutdown_timeout=CLOSE_TIMEOUT)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port, reuse_address=True).start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        # The bound port differs from the configured one when that is 0.
        self.bound_port = int(runner.addresses[0][1])

    async def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def run(self, progress: Progress) -> None:
        try:
            if self._runner is None:
                await self.bind()
            while True:
                progress.progress()
                await self._sleep(TICK)
        except asyncio.CancelledError:
            await self.close()
            raise
