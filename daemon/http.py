"""The HTTP side of `selfcheckd run`: /metrics, /healthz, /readyz, /status, /probe.

`/healthz` is liveness, and fails (503) only for what a restart can mend: a
component that crashed again and again or a loop wedged without progress
(daemon/supervisor.py). A component that is alive but says why it cannot work
(log file missing, CloudWatch or the webhook unreachable) is *degraded*: 200,
named with its reason in the body's `degraded`, as are the routes whose last
run failed in `routes_failing`. `/readyz` says the config is loaded and the
daemon is not stopping. `/status` is JSON for people: the configuration in
force, each component's state, the last result of each route, pending alerts;
never a secret.

`/probe?route=NAME` (only with `[server] probe = true`: it sends mail) runs
that route's round trip now, joins the run in flight, or, within
`probe_min_interval` of the route's last run, answers that run's result marked
as cached. It wants `Authorization: Bearer <probe_token>` when a token is set
(required off loopback). It answers JSON, or Prometheus metrics when the
Accept header asks for them, as blackbox_exporter's /probe does
(daemon/probe_metrics.py).

The listener is the `http` component: bound before anything else starts (a
taken port is a start-up error, or a refused reload), closed when the
component is stopped or replaced. Its connections are bounded
(daemon/http_limits.py).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler

from daemon.checks.result import CheckResult
from daemon.config import is_loopback
from daemon.http_limits import LOOPBACK_RESERVE, ConnectionGuard, accept_backlog, connection_cap
from daemon.metrics import Metrics
from daemon.probe_metrics import render, wants_metrics
from daemon.supervisor import Progress

# The listener's loop reports progress (and a connection flood) this often.
TICK = 10.0
# In-flight requests get this long when the listener closes (aiohttp's default is 60 s).
CLOSE_TIMEOUT = 1.0


@dataclass
class ProbeAnswer:
    """What /probe answers: the JSON body, and the run's result for the metrics format."""

    status: int
    body: dict[str, Any]
    result: CheckResult | None = None
    cached: bool = False
    headers: dict[str, str] | None = None


class StatusSource(Protocol):
    """What the endpoints ask the daemon."""

    def problems(self) -> dict[str, str]: ...

    def degraded(self) -> dict[str, str]: ...

    def routes_failing(self) -> dict[str, str]: ...

    def is_ready(self) -> bool: ...

    def status(self) -> dict[str, Any]: ...

    def probe_enabled(self) -> bool: ...

    def probe_token(self) -> str | None: ...

    def probe_refused(self, outcome: str) -> None: ...

    async def probe(self, route: str) -> ProbeAnswer: ...


def bearer_matches(header: str, token: str) -> bool:
    """Whether an Authorization header carries `token` as a bearer token (constant time)."""
    scheme, _, given = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        given = ""
    # compare_digest on bytes: its time depends on the lengths only, never on where
    # the two first differ.
    return hmac.compare_digest(given.strip().encode(), token.encode())


def make_app(source: StatusSource, registry: CollectorRegistry,
             middlewares: list[Any] | None = None) -> web.Application:
    async def healthz(_request: web.Request) -> web.Response:
        problems = source.problems()
        return web.json_response({"alive": not problems, "problems": problems,
                                  "degraded": source.degraded(),
                                  "routes_failing": source.routes_failing()},
                                 status=503 if problems else 200)

    async def readyz(_request: web.Request) -> web.Response:
        ready = source.is_ready()
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    async def status(_request: web.Request) -> web.Response:
        return web.Response(text=json.dumps(source.status(), indent=2),
                            content_type="application/json")

    def error(code: int, text: str, metrics: bool, **extra: Any) -> web.Response:
        headers = extra.pop("headers", None)
        if metrics:  # a scrape shows the body in its error; it never reads JSON
            return web.Response(text=text + "\n", status=code, headers=headers)
        return web.json_response({"error": text, **extra}, status=code, headers=headers)

    async def probe(request: web.Request) -> web.Response:
        metrics = wants_metrics(request.headers.get("Accept", ""))
        if not source.probe_enabled():
            return error(404, "on-demand probes are off (they send mail); "
                              "set [server] probe = true to allow them", metrics)
        token = source.probe_token()
        if token is not None and not bearer_matches(
                request.headers.get("Authorization", ""), token):
            source.probe_refused("unauthorized")
            return error(401, "a bearer token is required: Authorization: Bearer "
                              "<[server] probe_token>", metrics,
                         headers={"WWW-Authenticate": 'Bearer realm="selfcheckd probe"'})
        given = request.query.getall("route", [])
        if len(given) > 1:
            source.probe_refused("refused")
            return error(400, "give one route: /probe?route=NAME", metrics)
        route = given[0] if given else ""
        if not route:
            source.probe_refused("refused")
            return error(400, "give the route: /probe?route=NAME", metrics)
        answer = await source.probe(route)
        if answer.result is not None and metrics:
            finished = answer.result.finished_at
            age = 0.0 if finished is None else max(0.0, time.time() - finished)
            body, content_type = render(answer.result, cached=answer.cached, age=age,
                                        accept=request.headers.get("Accept", ""))
            return web.Response(body=body, status=answer.status, headers={
                "Content-Type": content_type, **(answer.headers or {})})
        if answer.result is None:
            text = str(answer.body.get("error", "no result"))
            extra = {k: v for k, v in answer.body.items() if k != "error"}
            return error(answer.status, text, metrics, headers=answer.headers, **extra)
        return web.Response(text=json.dumps(answer.body, indent=2), status=answer.status,
                            content_type="application/json", headers=answer.headers)

    app = web.Application(middlewares=middlewares or [])
    app.router.add_get("/metrics", make_aiohttp_handler(registry))
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/status", status)
    app.router.add_get("/probe", probe, allow_head=False)  # a HEAD must not send mail
    return app


class HttpServer:
    """The `http` component: one listener on `host:port`, its connections bounded."""

    name = "http"
    progress_deadline = 3 * TICK

    def __init__(
        self, source: StatusSource, metrics: Metrics, host: str, port: int, *,
        max_connections: int, header_timeout: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.host = host
        self.port = port
        self._sleep = sleep
        self.header_timeout = header_timeout
        # On loopback every peer is local: a reserve for local peers would just raise the cap.
        self.guard = ConnectionGuard(connection_cap(max_connections), metrics, clock,
                                     0 if is_loopback(host) else LOOPBACK_RESERVE)
        self._app = make_app(source, metrics.registry, middlewares=[self.guard.middleware])
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None
        self.bound_port = 0

    @property
    def listen(self) -> str:
        return f"{self.host}:{self.bound_port or self.port}"

    async def bind(self) -> None:
        """Start listening; raises OSError (port taken, address not local)."""
        # keepalive_timeout is aiohttp's only clock on a connection that has not sent a
        # whole request yet (it starts at accept), as well as between requests.
        runner = web.AppRunner(self._app, access_log=None, handle_signals=False,
                               shutdown_timeout=CLOSE_TIMEOUT,
                               keepalive_timeout=self.header_timeout)
        await runner.setup()
        handler = runner.server
        assert handler is not None
        try:
            # Our own server rather than a TCPSite: every accepted socket goes through
            # the guard before aiohttp builds anything for it.
            self._server = await asyncio.get_running_loop().create_server(
                self.guard.protocol_factory(handler), self.host, self.port,
                reuse_address=True, backlog=accept_backlog())
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        # The bound port differs from the configured one when that is 0.
        self.bound_port = int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        server, self._server = self._server, None
        runner, self._runner = self._runner, None
        if server is not None:
            server.close()  # accept nothing more
        if runner is not None:
            await runner.cleanup()  # in-flight requests get CLOSE_TIMEOUT, then all close
        if server is not None:
            await server.wait_closed()

    async def run(self, progress: Progress) -> None:
        try:
            if self._server is None:
                await self.bind()
            while True:
                progress.progress()
                self.guard.report()
                await self._sleep(TICK)
        except asyncio.CancelledError:
            await self.close()
            raise
