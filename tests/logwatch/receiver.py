"""A real aiohttp alert_sink stand-in on loopback that records what it receives."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Sink:
    url: str = ""
    statuses: list[int] = field(default_factory=list)  # answers to give first, then `default`
    default: int = 200
    # Requests for which this returns True are held (never answered) until `release`.
    hold: Callable[[dict[str, Any]], bool] = lambda _body: False
    release: asyncio.Event = field(default_factory=asyncio.Event)
    requests: list[tuple[dict[str, Any], str | None]] = field(default_factory=list)
    alert_ids: list[str | None] = field(default_factory=list)
    oks: list[bool] = field(default_factory=list)

    @property
    def accepted(self) -> list[dict[str, Any]]:
        return [body for (body, _), ok in zip(self.requests, self.oks, strict=True) if ok]


@asynccontextmanager
async def alert_sink(statuses: list[int] | None = None, default: int = 200) -> AsyncIterator[Sink]:
    sink = Sink(statuses=list(statuses or []), default=default)

    async def handle(request: web.Request) -> web.Response:
        body = await request.json()
        if sink.hold(body):
            await sink.release.wait()
        sink.requests.append((body, request.headers.get("X-Alert-Secret")))
        sink.alert_ids.append(request.headers.get("X-Alert-Id"))
        status = sink.statuses.pop(0) if sink.statuses else sink.default
        sink.oks.append(status < 300)
        return web.json_response({"ok": status < 300}, status=status)

    app = web.Application()
    app.router.add_post("/alert", handle)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    sink.url = f"http://127.0.0.1:{runner.addresses[0][1]}/alert"
    try:
        yield sink
    finally:
        sink.release.set()
        await runner.cleanup()
