"""The HTTP listener under a connection flood: a cap, a header timeout, one log line per flood."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from daemon.app import Daemon
from daemon.config import Config, LoadedConfig
from daemon.http import TICK
from daemon.http_limits import LOOPBACK_RESERVE, accept_backlog, connection_cap
from tests.fake_time import FakeClock
from tests.test_daemon import get
from tests.waiting import until

CAP = 20
HEADER_TIMEOUT = 0.5  # real seconds: aiohttp times it on the event loop's own clock


def leak_only_config(tmp_path: Any, **server: Any) -> LoadedConfig:
    maillog = tmp_path / "maillog"
    maillog.write_text("")
    return LoadedConfig(Config.model_validate({
        "server": {"listen": "127.0.0.1:0", **server},
        "leakwatch": {"source": "file", "file": {"path": str(maillog)}},
    }), None)


@contextlib.asynccontextmanager
async def running(config: LoadedConfig, clock: FakeClock) -> AsyncIterator[Daemon]:
    daemon = Daemon(config, clock=clock, sleep=clock.sleep)
    await daemon.start()
    try:
        yield daemon
    finally:
        await daemon.shutdown()


def healthz_ok(port: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        try:
            return (await get(port, "/healthz"))[0] == 200
        except aiohttp.ClientError:  # refused while every held socket is newer than the grace
            return False
    return check


async def closed_by_server(reader: asyncio.StreamReader) -> bool:
    """True if the server has closed this connection (EOF or reset), without waiting."""
    try:
        data = await asyncio.wait_for(reader.read(1), 0.01)
    except TimeoutError:
        return False
    except ConnectionError:
        return True
    return data == b""


async def test_idle_connections_past_the_cap_are_shed_and_logged_once(
    tmp_path: Any, caplog: pytest.LogCaptureFixture,
) -> None:
    """Idle sockets past the cap are closed, a fresh client still gets /healthz, the
    header timeout closes the rest, and the flood is one log line with its count."""
    clock = FakeClock()
    config = leak_only_config(tmp_path, max_connections=CAP, header_timeout=HEADER_TIMEOUT)
    caplog.set_level(logging.DEBUG)
    async with running(config, clock) as daemon:
        port = daemon.listen_port
        with capture_logs() as logs:
            sockets = []
            for i in range(3 * CAP):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                if i % 2:  # half of them trickle a request that never ends (slowloris)
                    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                sockets.append((reader, writer))
            await until(lambda: daemon.http.guard.open <= CAP)
            states = [await closed_by_server(r) for r, _ in sockets]
            # At most CAP are held, never more; the rest were closed at once.
            assert states.count(False) <= CAP and states.count(True) >= 2 * CAP
            # A fresh client gets in during the flood: an idle socket held past
            # EVICT_GRACE makes room for it.
            await until(healthz_ok(port))
            # The header timeout closes whatever is still held.
            for reader, _ in sockets:
                await asyncio.wait_for(reader.read(), 5 * HEADER_TIMEOUT + 5)
            assert (await get(port, "/healthz"))[0] == 200
            await clock.advance(TICK)
            await clock.advance(TICK)
        shed = [e for e in logs if e["event"] == "http_connections_shed"]
        assert len(shed) == 1, shed
        assert shed[0]["evicted"] + shed[0]["refused"] >= 2 * CAP and shed[0]["cap"] == CAP
        assert len(logs) < 10, [e["event"] for e in logs]  # no line per connection
        noisy = [r for r in caplog.records
                 if r.name.startswith(("aiohttp", "asyncio")) and r.levelno >= logging.INFO]
        assert noisy == []
        assert sum(daemon.metrics.registry.get_sample_value(
            "selfcheckd_http_connections_shed_total", {"action": action}) or 0
            for action in ("evicted", "refused")) >= 2 * CAP
        for _, writer in sockets:
            writer.close()


async def test_a_connection_with_a_request_in_flight_is_never_shed(make_stack: Any) -> None:
    """A /probe waiting for its run keeps its connection while idle ones come and go."""
    stack = await make_stack()
    stack.smtp.delivery_delay = 1.0
    config = LoadedConfig(Config.model_validate({
        "selfcheck": {"interval": 600, "timeout": 5, "secret": "x",
                      "routes": [stack.route_table()]},
        "server": {"listen": "127.0.0.1:0", "probe": True, "max_connections": 2},
    }), None)
    daemon = Daemon(config)
    await daemon.start()
    try:
        await until(lambda: "default" in daemon.scheduler.running)
        probe = asyncio.create_task(get(daemon.listen_port, "/probe?route=default"))
        await until(lambda: daemon.http.guard.open == 1)
        idle = [await asyncio.open_connection("127.0.0.1", daemon.listen_port)
                for _ in range(5)]
        code, body = await probe
        assert code == 200 and '"success": true' in body
        for _, writer in idle:
            writer.close()
    finally:
        await daemon.shutdown()


def test_the_listener_keeps_three_quarters_of_the_fds_for_the_components() -> None:
    """Held connections, one accept burst and the loopback reserve fit in a quarter of
    RLIMIT_NOFILE; the cap is max_connections when that fits."""
    assert connection_cap(100, nofile=1024) == 100
    for nofile in (256, 1024, 4096, 65536):
        held = connection_cap(100_000, nofile) + accept_backlog(nofile) + LOOPBACK_RESERVE
        assert held <= nofile // 4, nofile
    assert connection_cap(100, nofile=8) == 1
