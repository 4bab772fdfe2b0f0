"""A real aiohttp alert_sink stand-in on loopback that records what it receives."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Sink:
    url: str = ""
    statuses: list[int] = field(default_factory=list)  # answers to give first, then 200
    requests: list[tuple[dict[str, Any], str | None]] = field(default_factory=list)

    oks: list[bool] = field(default_factory=list)

    @property
    def accepted(self) -> list[dict[str, Any]]:
        return [body for (body, _), ok in zip(self.requests, self.oks, strict=True) if ok]


@asynccontextmanager
async def alert_sink(statuses: list[int] | None = None) -> AsyncIterator[Sink]:
    sink = Sink(statuses=list(statuses or []))

    async def handle(request: web.Request) -> web.Response:
        sink.requests.append((await request.json(), request.headers.get("X-Alert-Secret")))
        status = sink.statuses.pop(0) if sink.statuses else 200
        sink.oks.append(status < 300)
        return web.json_response({"ok": status < 300}, status=status)

    app = web.Application()
    app.router.add_post("/alert", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    sink.url = f"http://127.0.0.1:{runner.addresses[0][1]}/alert"
    try:
        yield sink
    finally:
        await runner.cleanup()
