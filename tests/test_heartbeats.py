"""Heartbeats against a real aiohttp receiver on 127.0.0.1: bodies, kinds, retries, blocking."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from structlog.testing import capture_logs

from daemon.checks.result import CheckResult, FailureReason
from daemon.config import ConfigError, HeartbeatTarget, load_config
from daemon.delivery.heartbeats import (
    BODY_LIMIT,
    Heartbeats,
    redact_url,
    run_uuid,
    scrub,
)
from daemon.metrics import Metrics
from daemon.supervisor import MAX_REASON, Supervisor
from tests.waiting import until

TOKEN = "s3cr3t-pulse-token-0123456789"
ROUTE = "local"
RUN_ID = "0a1b2c3d4e5f"
# An upper bound for "returns at once": far above a scheduling hiccup, far below any timeout.
IMMEDIATE = 0.5


@dataclass
class Seen:
    """One request as the receiver got it."""

    method: str
    path: str
    query: list[tuple[str, str]]
    body: bytes
    content_type: str | None


class Receiver:
    """A heartbeat endpoint: records requests, answers with scripted statuses, can stall."""

    def __init__(self) -> None:
        self.requests: list[Seen] = []
        self.statuses: list[int] = []  # popped per request; 200 once empty
        self.stall = 0.0
        self.release = asyncio.Event()
        self.port = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append(Seen(request.method, request.path, list(request.query.items()),
                                  await request.read(), request.headers.get("Content-Type")))
        if self.stall:
            with suppress(TimeoutError):
                await asyncio.wait_for(self.release.wait(), self.stall)
        status = self.statuses.pop(0) if self.statuses else 200
        return web.Response(status=status, text="OK")

    def url(self, path_and_query: str) -> str:
        return f"http://127.0.0.1:{self.port}{path_and_query}"


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", rec.handle)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    rec.port = runner.addresses[0][1]
    yield rec
    rec.release.set()
    await runner.cleanup()


Factory = Callable[..., Awaitable[Heartbeats]]


@pytest.fixture
async def supervisor(metrics: Metrics) -> AsyncIterator[Supervisor]:
    sup = Supervisor(metrics)
    task = asyncio.create_task(sup.run())
    await sup.started()
    yield sup
    sup.stop()
    await asyncio.wait_for(task, 5)


@pytest.fixture
async def make_heartbeats(metrics: Metrics, supervisor: Supervisor) -> AsyncIterator[Factory]:
    """Run a Heartbeats component for target dicts; all are closed at teardown."""
    started: list[Heartbeats] = []

    async def factory(*targets: dict[str, Any], routes: list[str] | None = None) -> Heartbeats:
        hb = Heartbeats([HeartbeatTarget.model_validate(t) for t in targets], metrics,
                        routes=routes)
        supervisor.start(hb)
        started.append(hb)
        return hb

    yield factory
    for hb in started:
        await hb.close(grace=0.1)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


def count(metrics: Metrics, target: str, result: str) -> float:
    value = metrics.registry.get_sample_value(
        "selfcheck_heartbeats_total", {"target": target, "result": result})
    return value or 0.0


def succeeded(route: str = ROUTE, **kw: Any) -> CheckResult:
    return CheckResult(route=route, run_id=RUN_ID, success=True,
                       send_time=0.150_49, reception_time=2.340_4, **kw)


def failed(error: str = "probe not received within 60s", route: str = ROUTE) -> CheckResult:
    result = CheckResult(route=route, run_id=RUN_ID)
    result.fail(FailureReason.RECEIVE_TIMEOUT, error)
    result.send_time = 0.2
    return result


# -- updown (the seed's webhook) ---------------------------------------------------------


async def test_updown_posts_seed_body_after_success(
    receiver: Receiver, make_heartbeats: Factory, metrics: Metrics,
) -> None:
    """A successful run POSTs exactly {"send_time", "reception_time"} (3 decimals) as JSON."""
    hb = await make_heartbeats({"url": receiver.url(f"/{TOKEN}/key")})
    hb.run_finished(succeeded())
    assert await hb.drain(5.0)
    [req] = receiver.requests
    assert (req.method, req.path, req.content_type) == ("POST", f"/{TOKEN}/key", "application/json")
    assert req.body == b'{"send_time": 0.15, "reception_time": 2.34}'
    assert count(metrics, "default", "success") == 1


async def test_updown_sends_nothing_after_failure(
    receiver: Receiver, make_heartbeats: Factory, metrics: Metrics,
) -> None:
    """A failed run sends no request at all: the missing pulse is the alarm."""
    hb = await make_heartbeats({"url": receiver.url(f"/{TOKEN}")})
    hb.run_finished(failed())
    hb.run_started(ROUTE, RUN_ID)
    assert await hb.drain(5.0)
    await asyncio.sleep(0.05)
    assert receiver.requests == []
    assert count(metrics, "default", "success") == count(metrics, "default", "failure") == 0


async def test_routes_do_not_supersede_each_other(
    receiver: Receiver, make_heartbeats: Factory,
) -> None:
    """Two routes finishing together each get their pulse delivered."""
    hb = await make_heartbeats({"url": receiver.url(f"/{TOKEN}")})
    hb.run_finished(succeeded())
    hb.run_finished(CheckResult(route="other", run_id="ffffffffffff", success=True,
                                send_time=0.1, reception_time=0.2))
    assert await hb.drain(5.0)
    assert len(receiver.requests) == 2


# -- targets and the routes they cover -----------------------------------------------------


async def test_a_failing_route_silences_a_target_that_covers_it(
    receiver: Receiver, make_heartbeats: Factory,
) -> None:
    """updown pulses only while the latest run of every covered route succeeded."""
    hb = await make_heartbeats({"url": receiver.url(f"/{TOKEN}")}, routes=["good", "bad"])
    with capture_logs() as logs:
        hb.run_finished(succeeded("good"))  # "bad" has not completed a run yet: no pulse
        hb.run_finished(failed(route="bad"))
        for _ in range(3):
            hb.run_finished(succeeded("good"))  # every other route fine, "bad" still failing
    assert await hb.drain(5.0)
    assert receiver.requests == []
    # Each silent success says why, so the missing pulse is not taken for a lost one.
    withheld = [(e["waiting"], e["failing"]) for e in logs if e["event"] == "heartbeat_withheld"]
    assert withheld == [("bad", None)] + [(None, "bad")] * 3
    hb.run_finished(succeeded("bad"))
    hb.run_finished(succeeded("good"))
    assert await hb.drain(5.0)
    assert len(receiver.requests) == 2


async def test_a_target_tied_to_one_route_ignores_the_others(
    receiver: Receiver, make_heartbeats: Factory,
) -> None:
    """A target with routes = ["good"] pulses for good's successes whatever "bad" does."""
    hb = await make_heartbeats({"url": receiver.url(f"/{TOKEN}"), "routes": ["good"]},
                               routes=["good", "bad"])
    hb.run_finished(failed(route="bad"))
    hb.run_finished(succeeded("good"))
    hb.run_finished(succeeded("bad"))
    assert await hb.drain(5.0)
    assert [r.body for r in receiver.requests] == [
        b'{"send_time": 0.15, "reception_time": 2.34}']


async def test_healthchecks_hears_which_covered_route_fails(
    receiver: Receiver, make_heartbeats: Factory,
) -> None:
    """A success of one route while another covered route fails is a /fail naming it."""
    hb = await make_heartbeats({"kind": "healthchecks", "url": receiver.url(f"/{TOKEN}")},
                               routes=["good", "bad"])
    hb.run_finished(succeeded("good"))  # "bad" not run yet: neither success nor failure
    assert await hb.drain(5.0)
    assert receiver.requests == []
    hb.run_finished(failed(route="bad"))
    assert await hb.drain(5.0)
    hb.run_finished(succeeded("good"))
    assert await hb.drain(5.0)
    assert [r.path for r in receiver.requests] == [f"/{TOKEN}/fail", f"/{TOKEN}/fail"]
    assert receiver.requests[1].body.decode().splitlines()[1] == (
        "failing routes: bad (receive_timeout)")


def test_a_target_naming_an_unknown_route_is_a_config_error(tmp_path: Path) -> None:
    """routes in [[heartbeat]] must name configured routes; the error lists the real ones."""
    path = tmp_path / "c.toml"
    path.write_text(
        '[[selfcheck.routes]]\nname = "good"\nfrom = "a@example.com"\nto = "b@example.com"\n'
        'smtp = { host = "smtp" }\nimap = { host = "imap" }\n'
        '[[heartbeat]]\nurl = "https://pulse.example/tok"\nroutes = ["good", "typo"]\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path, {})
    assert caught.value.problems == [
        "heartbeat[0].routes: no such route: typo (routes: good)"]


# -- healthchecks ------------------------------------------------------------------------


async def test_healthchecks_start_and_success_share_rid(
    receiver: Receiver, make_heartbeats: Factory,
) -> None:
    """send_start pings <url>/start, success pings <url>, both with the run's UUID as rid."""
    hb = await make_heartbeats({"kind": "healthchecks", "send_start": True,
                                "url": receiver.url(f"/ping/{TOKEN}")})
    hb.run_started(ROUTE, RUN_ID)
    assert await hb.drain(5.0)
    hb.run_finished(succeeded())
    assert await hb.drain(5.0)
    start, success = receiver.requests
    rid = run_uuid(ROUTE, RUN_ID)
    assert uuid.UUID(rid).version == 5
    assert (start.method, start.path, start.query) == ("POST", f"/ping/{TOKEN}/start",
                                                       [("rid", rid)])
    assert (success.path, success.query) == (f"/ping/{TOKEN}", [("rid", rid)])
    assert success.content_type == "application/json"
    assert json.loads(success.body) == {"route": ROUTE, "run_id": RUN_ID,
                                        "send_time": 0.15, "reception_time": 2.34}


async def test_healthchecks_fail_carries_reason_and_truncated_error(
    receiver: Receiver, make_heartbeats: Factory,
) -> None:
    """A failure pings <url>/fail with reason and error, cut to 10 kB on a UTF-8 boundary."""
    hb = await make_heartbeats({"kind": "healthchecks", "url": receiver.url(f"/{TOKEN}/")})
    hb.run_finished(failed("é" * 20_000))
    assert await hb.drain(5.0)
    [req] = receiver.requests
    assert (req.path, req.query) == (f"/{TOKEN}/fail", [("rid", run_uuid(ROUTE, RUN_ID))])
    assert req.content_type == "text/plain; charset=utf-8"
    assert len(req.body) <= BODY_LIMIT
    text = req.body.decode()  # strict: no half character at the cut
    assert text.startswith(f"route={ROUTE} run_id={RUN_ID} reason=receive_timeout\néé")


@pytest.mark.parametrize("in_flight", [False, True])
async def test_a_start_overtaken_by_its_runs_fail_is_skipped_not_failed(
    receiver: Receiver, make_heartbeats: Factory, metrics: Metrics, in_flight: bool,
) -> None:
    """A run that fails at once replaces its /start (queued, or on the wire to a slow
    monitor) with its /fail: the start counts as skipped; failure is for a monitor that
    did not take a ping, and this one took the /fail."""
    if in_flight:
        receiver.stall = 30.0
    hb = await make_heartbeats({"kind": "healthchecks", "send_start": True,
                                "url": receiver.url(f"/{TOKEN}")})
    with capture_logs() as logs:
        hb.run_started(ROUTE, RUN_ID)
        if in_flight:
            await until(lambda: len(receiver.requests) == 1)
        hb.run_finished(failed())
        receiver.release.set()
        assert await hb.drain(5.0)
    assert [r.path for r in receiver.requests][-1] == f"/{TOKEN}/fail"
    assert count(metrics, "default", "skipped") == 1
    assert count(metrics, "default", "failure") == 0
    assert count(metrics, "default", "success") == 1
    [dropped] = [e for e in logs if e["event"] == "heartbeat_dropped"]
    assert (dropped["signal"], dropped["reason"]) == ("start", "superseded by a newer fail ping")


async def test_a_ping_replaced_after_its_attempts_failed_counts_as_a_failure(
    receiver: Receiver, make_heartbeats: Factory, metrics: Metrics,
) -> None:
    """A pulse that met a 500 and waits for its retry when the next run's pulse replaces
    it: the monitor did not take it, so it is a failure, not skipped."""
    receiver.statuses = [500]
    hb = await make_heartbeats({"url": receiver.url(f"/{TOKEN}"), "retries": 5,
                                "backoff": 30})
    hb.run_finished(succeeded())
    await until(lambda: len(receiver.requests) == 1)
    hb.run_finished(succeeded())
    assert await hb.drain(5.0)
    assert (count(metrics, "default", "failure"), count(metrics, "default", "skipped"),
            count(metrics, "default", "success")) == (1, 0, 1)


async def test_healthchecks_without_send_start_sends_no_start(
    receiver: Receiver, make_heartbeats: Factory,
) -> None:
    """Without send_start, run_started sends nothing."""
    hb = await make_heartbeats({"kind": "healthchecks", "url": receiver.url(f"/{TOKEN}")})
    hb.run_started(ROUTE, RUN_ID)
    assert await hb.drain(5.0)
    assert receiver.requests == []


def test_run_uuid_keeps_uuid_run_ids() -> None:
    """A run_id that already is a UUID is used as the rid unchanged."""
    run_id = str(uuid.uuid4())
    assert run_uuid(ROUTE, run_id) == run_id
    assert run_uuid(ROUTE, RUN_ID) != run_uuid("other", RUN_ID)


# -- uptime kuma -------------------------------------------------------------------------


async def test_uptime_kuma_sets_status_msg_ping_and_keeps_other_query(
    receiver: Receiver, make_heartbeats: Factory,
) -> None:
    """The push sets status/msg/ping (replacing the UI's defaults) and keeps other query items."""
    url = receiver.url(f"/api/push/{TOKEN}?status=up&msg=OK&ping=&keep=a%20b")
    hb = await make_heartbeats({"kind": "uptime-kuma", "url": url})
    hb.run_finished(succeeded())
    assert await hb.drain(5.0)
    hb.run_finished(failed())
    assert await hb.drain(5.0)
    up, down = receiver.requests
    assert (up.method, up.path) == ("GET", f"/api/push/{TOKEN}")
    assert sorted(up.query) == [("keep", "a b"), ("msg", "ok"), ("ping", "2340"), ("status", "up")]
    assert sorted(down.query) == [("keep", "a b"), ("msg", "receive_timeout: probe not "
                                  "received within 60s"), ("status", "down")]


# -- retries and failures ----------------------------------------------------------------


async def test_a_pulse_being_retried_is_withdrawn_when_a_covered_route_fails(
    receiver: Receiver, make_heartbeats: Factory, metrics: Metrics,
) -> None:
    """Both routes fine, the pulse meets a 500 and waits for its retry; then a covered
    route fails: the retry is never sent (it reached updown after the failure)."""
    receiver.statuses = [500]
    hb = await make_heartbeats({"url": receiver.url(f"/{TOKEN}"), "retries": 5,
                                "backoff": 30}, routes=["good", "flaky"])
    hb.run_finished(succeeded("flaky"))
    hb.run_finished(succeeded("good"))
    await until(lambda: len(receiver.requests) == 1)
    hb.run_finished(failed(route="flaky"))
    assert await hb.drain(5.0)
    assert len(receiver.requests) == 1
    assert count(metrics, "default", "skipped") == 1
    assert count(metrics, "default", "success") == 0


async def test_retries_with_backoff_on_5xx_then_success(
    receiver: Receiver, make_heartbeats: Factory, metrics: Metrics,
) -> None:
    """500 and 503 are retried after a backoff; the later 200 counts as one success."""
    receiver.statuses = [500, 503]
    hb = await make_heartbeats({"url": receiver.url(f"/{TOKEN}"), "retries": 3, "backoff": 0.01})
    with capture_logs() as logs:
        hb.run_finished(succeeded())
        assert await hb.drain(5.0)
    assert len(receiver.requests) == 3
    assert count(metrics, "default", "success") == 1
    assert count(metrics, "default", "failure") == 0
    failures = [e for e in logs if e["event"] == "heartbeat_failed"]
    assert [(e["attempt"], e["error"]) for e in failures] == [(1, "HTTP 500"), (2, "HTTP 503")]
    assert all(e["retry_in"] > 0 for e in failures)


async def test_gives_up_after_retries(
    receiver: Receiver, make_heartbeats: Factory, metrics: Metrics,
) -> None:
    """After `retries` retries the delivery stops and counts one failure."""
    receiver.statuses = [500] * 10
    hb = await make_heartbeats({"url": receiver.url(f"/{TOKEN}"), "retries": 2, "backoff": 0.01})
    with capture_logs() as logs:
        hb.run_finished(succeeded())
        assert await hb.drain(5.0)
    assert len(receiver.requests) == 3
    assert count(metrics, "default", "failure") == 1
    assert count(metrics, "default", "success") == 0
    assert (logs[-1]["attempt"], logs[-1]["retry_in"]) == (3, None)


async def test_client_error_is_not_retried(
    receiver: Receiver, make_heartbeats: Factory, metrics: Metrics,
) -> None:
    """A 404 (wrong token, deleted check) fails at once: a retry cannot fix it."""
    receiver.statuses = [404]
    hb = await make_heartbeats({"url": receiver.url(f"/{TOKEN}"), "retries": 3, "backoff": 0.01})
    hb.run_finished(succeeded())
    assert await hb.drain(5.0)
    assert len(receiver.requests) == 1
    assert count(metrics, "default", "failure") == 1


async def test_down_receiver_never_blocks_and_counts_failures(
    closed_port: int, make_heartbeats: Factory, metrics: Metrics,
) -> None:
    """With the receiver down, run_finished returns at once; the superseded chain is dropped."""
    url = f"http://127.0.0.1:{closed_port}/{TOKEN}"
    hb = await make_heartbeats({"url": url, "retries": 3, "backoff": 0.05})
    with capture_logs() as logs:
        t0 = time.perf_counter()
        hb.run_finished(succeeded())
        t1 = time.perf_counter()
        hb.run_finished(succeeded())  # the first chain is still retrying: dropped
        t2 = time.perf_counter()
        assert await hb.drain(10.0)
    assert max(t1 - t0, t2 - t1) < IMMEDIATE
    # The first was replaced before any attempt: it says nothing about the receiver.
    assert count(metrics, "default", "failure") == 1
    assert count(metrics, "default", "skipped") == 1
    [dropped] = [e for e in logs if e["event"] == "heartbeat_dropped"]
    assert dropped["reason"].startswith("superseded")
    assert any("Cannot connect" in e.get("error", "") for e in logs)


async def test_slow_receiver_times_out_without_blocking(
    receiver: Receiver, make_heartbeats: Factory, metrics: Metrics,
) -> None:
    """A receiver that stalls past `timeout` costs the caller nothing and counts a failure."""
    receiver.stall = 30.0
    hb = await make_heartbeats({"url": receiver.url(f"/{TOKEN}"), "timeout": 0.2,
                                "retries": 0})
    with capture_logs() as logs:
        t0 = time.perf_counter()
        hb.run_finished(succeeded())
        assert time.perf_counter() - t0 < IMMEDIATE
        assert await hb.drain(10.0)
    assert count(metrics, "default", "failure") == 1
    assert [e["error"] for e in logs if e["event"] == "heartbeat_failed"] == [
        "no response within 0.2s"]


async def test_close_cancels_stalled_deliveries_and_skips_later_ones(
    receiver: Receiver, make_heartbeats: Factory, metrics: Metrics,
) -> None:
    """close() waits only its grace, drops what is in flight, and later pings are skipped."""
    receiver.stall = 30.0
    hb = await make_heartbeats({"url": receiver.url(f"/{TOKEN}"), "timeout": 20})
    with capture_logs() as logs:
        hb.run_finished(succeeded())
        await asyncio.sleep(0.05)
        t0 = time.perf_counter()
        await hb.close(grace=0.1)
        assert time.perf_counter() - t0 < 5.0
        hb.run_finished(succeeded())
    assert count(metrics, "default", "failure") == 1
    assert count(metrics, "default", "skipped") == 1
    [dropped] = [e for e in logs if e["event"] == "heartbeat_dropped"]
    assert dropped["reason"] == "shutdown"


async def test_failing_target_reports_the_component_down(
    receiver: Receiver, make_heartbeats: Factory, metrics: Metrics, supervisor: Supervisor,
) -> None:
    """A failed delivery sets selfcheckd_component_up{heartbeats} to 0; a success restores it."""
    receiver.statuses = [500]
    hb = await make_heartbeats({"url": receiver.url(f"/{TOKEN}"), "retries": 0})
    up = {"component": "heartbeats"}
    hb.run_finished(succeeded())
    assert await hb.drain(5.0)
    assert metrics.registry.get_sample_value("selfcheckd_component_up", up) == 0
    assert supervisor.states()["heartbeats"]["reason"] == "heartbeat default: HTTP 500"
    hb.run_finished(succeeded())
    assert await hb.drain(5.0)
    assert metrics.registry.get_sample_value("selfcheckd_component_up", up) == 1


async def test_a_target_answering_garbage_is_quoted_briefly(
    make_heartbeats: Factory, supervisor: Supervisor,
) -> None:
    """80 KB of non-HTTP bytes for an answer: aiohttp quotes them whole in its error; the
    log line and the component's reason on /status stay short (they were 560 KB)."""
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"\xff\xfe" * 40000 + b"\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(garbage, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        hb = await make_heartbeats({"url": f"http://127.0.0.1:{port}/{TOKEN}", "retries": 0})
        with capture_logs() as logs:
            hb.run_finished(succeeded())
            assert await hb.drain(5.0)
    finally:
        server.close()
        await server.wait_closed()
    [failed_line] = [e for e in logs if e["event"] == "heartbeat_failed"]
    assert len(failed_line["error"]) <= MAX_REASON
    assert len(supervisor.states()["heartbeats"]["reason"]) <= MAX_REASON


@pytest.mark.parametrize(("status", "absolute"), [(302, True), (307, True), (301, False)])
async def test_a_redirect_is_a_failed_ping_naming_where_it_pointed(
    receiver: Receiver, make_heartbeats: Factory, metrics: Metrics, supervisor: Supervisor,
    status: int, absolute: bool,
) -> None:
    """A pulse endpoint answering 3xx (moved, or hijacked towards an inside address) gets
    no request sent on: the ping fails, not retried, its reason naming scheme://host of the
    Location and none of its path (it followed 10 redirects and counted a success)."""
    moved_token = "moved-token-9876543210"

    async def moved(request: web.Request) -> web.Response:
        location = (receiver.url(f"/landing/{moved_token}?k={moved_token}") if absolute
                    else f"../landing/{moved_token}")
        return web.Response(status=status, headers={"Location": location})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", moved)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    pulse = f"http://127.0.0.1:{runner.addresses[0][1]}/{TOKEN}/key"
    try:
        hb = await make_heartbeats({"url": pulse, "retries": 3, "backoff": 0.01})
        with capture_logs() as logs:
            hb.run_finished(succeeded())
            assert await hb.drain(5.0)
    finally:
        await runner.cleanup()
    assert receiver.requests == []  # nothing followed the redirect
    assert (count(metrics, "default", "success"), count(metrics, "default", "failure")) == (0, 1)
    [line] = [e for e in logs if e["event"] == "heartbeat_failed"]
    where = f"127.0.0.1:{receiver.port}" if absolute else pulse.split("/")[2]
    assert line["error"] == f"HTTP {status} redirect to http://{where}/… (not followed)"
    assert line["retry_in"] is None
    assert supervisor.states()["heartbeats"]["reason"] == f"heartbeat default: {line['error']}"
    assert TOKEN not in repr(logs) and moved_token not in repr(logs)


@pytest.mark.parametrize(("location", "shown"), [
    (None, "nowhere (no Location header)"),
    ("http://[bad", "<invalid url>"),
    ("https://u:pw@10.0.0.7:8443/x?token=t", "https://10.0.0.7:8443/…"),
])
def test_redirect_target_shows_only_scheme_and_host(location: str | None, shown: str) -> None:
    """A Location is named by scheme://host[:port] only, relative ones resolved."""
    from daemon.delivery.heartbeats import redirect_target

    assert redirect_target("https://pulse.updown.io/tok/key", location) == shown


# -- secrets -----------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "redacted"), [
    ("https://pulse.updown.io/abc123/def456", "https://pulse.updown.io/…"),
    ("https://hc-ping.com/pingkey/slug?create=1", "https://hc-ping.com/…"),
    ("http://kuma.local:3001/api/push/tok?status=up", "http://kuma.local:3001/…"),
    ("https://user:pass@example.com/x", "https://example.com/…"),
    ("https://[::1]:8443/t", "https://[::1]:8443/…"),
    ("https://example.com", "https://example.com/…"),
    ("not a url", "<invalid url>"),
])
def test_redact_url_keeps_only_scheme_and_host(url: str, redacted: str) -> None:
    """redact_url keeps scheme://host[:port] and hides path, query and credentials."""
    assert redact_url(url) == redacted


def test_scrub_removes_url_pieces_from_error_text() -> None:
    """Error text that echoes the URL loses its path, query and credentials."""
    url = "https://user:hunter22@h.example/abcdef123456/key987654?token=qwerty123"
    text = scrub(f"InvalidURL: {url} (abcdef123456, qwerty123, hunter22)", url)
    for secret in ("abcdef123456", "key987654", "qwerty123", "hunter22"):
        assert secret not in text


async def test_logs_never_contain_the_token(
    closed_port: int, make_heartbeats: Factory,
) -> None:
    """Failure logs show the redacted URL; the token, query secret and password never appear."""
    url = f"http://user:pw-secret-99@127.0.0.1:{closed_port}/{TOKEN}/k?key=query-secret-77"
    hb = await make_heartbeats({"kind": "healthchecks", "send_start": True, "url": url,
                                "retries": 1, "backoff": 0.01})
    with capture_logs() as logs:
        hb.run_started(ROUTE, RUN_ID)
        assert await hb.drain(5.0)
        hb.run_finished(failed())
        assert await hb.drain(5.0)
    assert len([e for e in logs if e["event"] == "heartbeat_failed"]) == 4
    assert {e["url"] for e in logs} == {f"http://127.0.0.1:{closed_port}/…"}
    for secret in (TOKEN, "query-secret-77", "pw-secret-99"):
        assert secret not in repr(logs)


ONE_ROUTE = ('[[selfcheck.routes]]\nname = "good"\nfrom = "a@example.com"\n'
             'to = "b@example.com"\nsmtp = { host = "smtp" }\nimap = { host = "imap" }\n')


@pytest.mark.parametrize(("heartbeats", "problem"), [
    # `routes = []` would never pulse (updown alarms for ever).
    ('[[heartbeat]]\nurl = "https://pulse.example/tok"\nroutes = []\n',
     "heartbeat[0].routes: must not be empty (leave the key out for the default)"),
    # Two targets with one name: which one, as for routes.
    ('[[heartbeat]]\nname = "updown"\nurl = "https://pulse.example/tok"\n'
     '[[heartbeat]]\nname = "updown"\nurl = "https://pulse.example/other"\n',
     "heartbeat: target names must be unique (repeated: updown)"),
    # send_start with updown (the default kind) was silently ignored.
    ('[[heartbeat]]\nurl = "https://pulse.example/tok"\nsend_start = true\n',
     'heartbeat[0].send_start: only for kind = "healthchecks"'),
], ids=["no-route", "repeated-name", "send-start-without-start-signal"])
def test_a_target_that_cannot_work_as_meant_is_a_config_error(
    tmp_path: Path, heartbeats: str, problem: str,
) -> None:
    """A target configured so it could never pulse, or not as written, is refused with one
    line naming the key and why."""
    path = tmp_path / "c.toml"
    path.write_text(ONE_ROUTE + heartbeats)
    with pytest.raises(ConfigError) as caught:
        load_config(path, {})
    assert caught.value.problems == [problem]
