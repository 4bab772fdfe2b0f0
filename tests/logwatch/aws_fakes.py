"""moto's server plus a fault-injecting aiohttp proxy in front of it (loopback only)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from moto.server import ThreadedMotoServer

AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def moto_server() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@dataclass
class Faults:
    """What the proxy does to FilterLogEvents calls; each counter is consumed as used."""

    empty_pages: int = 0  # answer with {"events": [], "nextToken": ...} first
    throttles: int = 0  # answer HTTP 400 ThrottlingException
    resets: int = 0  # drop the connection without an answer
    seen_tokens: list[str] = field(default_factory=list)
    filter_calls: int = 0
    patterns: list[str] = field(default_factory=list)
    # Calls whose filterPattern this accepts wait, each on its own future in `held`
    # (in arrival order), until the test sets its result; all go on when the proxy stops.
    hold: Callable[[str], bool] = lambda _pattern: False
    held: list[asyncio.Future[None]] = field(default_factory=list)


@asynccontextmanager
async def fault_proxy(upstream: str, faults: Faults) -> AsyncIterator[str]:
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
    stash: dict[str, str] = {}  # our fake token -> the real one (or "" for none)

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        target = request.headers.get("X-Amz-Target", "")
        if target.endswith("FilterLogEvents"):
            faults.filter_calls += 1
            payload: dict[str, Any] = json.loads(body or b"{}")
            faults.patterns.append(payload.get("filterPattern", ""))
            if faults.hold(payload.get("filterPattern", "")):
                gate = asyncio.get_running_loop().create_future()
                faults.held.append(gate)
                await gate
            if faults.resets:
                faults.resets -= 1
                assert request.transport is not None
                request.transport.abort()
                raise ConnectionResetError
            if faults.throttles:
                faults.throttles -= 1
                return web.json_response(
                    {"__type": "ThrottlingException", "message": "Rate exceeded"}, status=400,
                    content_type="application/x-amz-json-1.1")
            token = payload.get("nextToken")
            if token is not None:
                faults.seen_tokens.append(token)
            if token in stash:
                real = stash.pop(token)
                if real:
                    payload["nextToken"] = real
                else:
                    payload.pop("nextToken")
                body = json.dumps(payload).encode()
            elif faults.empty_pages:
                faults.empty_pages -= 1
                fake = f"injected-{len(stash)}-{faults.filter_calls}"
                stash[fake] = token or ""
                return web.json_response(
                    {"events": [], "nextToken": fake, "searchedLogStreams": []},
                    content_type="application/x-amz-json-1.1")
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() not in ("host", "content-length")}
        async with session.request(request.method, upstream + request.path_qs,
                                   headers=headers, data=body) as resp:
            data = await resp.read()
            return web.Response(body=data, status=resp.status,
                                content_type=resp.content_type)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        for gate in faults.held:
            if not gate.done():
                gate.set_result(None)
        await runner.cleanup()
        await session.close()
