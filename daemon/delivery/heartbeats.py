"""Heartbeats: tell an outside monitor how selfchecks go, without ever holding up a check.

Three kinds of target (`heartbeat[].kind`):

- `updown` (default, the seed's behaviour): after each *successful* run, POST
  `{"send_time": ..., "reception_time": ...}` to the URL; nothing on failure,
  so the missing pulse raises the alarm (updown.io pulses and the like).
- `healthchecks`: `<url>/start` before a run (with `send_start`), `<url>` on
  success, `<url>/fail` on failure; `?rid=` pairs start and end of a run.
- `uptime-kuma`: a push with `status=up|down`, `msg=` and `ping=` (ms).

A target speaks for the routes it covers (`routes`, default every route): it
reports success only while the latest completed run of each covered route
succeeded. So one failing route silences an updown target however often the
other routes succeed; healthchecks and Uptime Kuma get a failure naming the
failing routes. A covered route that has not completed a run yet holds back a
success without reporting a failure (at start-up, routes finish one by one).

`run_started`/`run_finished` only queue the pings and return: the
`heartbeats` component delivers them, each as a task of its own task group,
with bounded retries (stamina). Each (target, route) has at most one delivery
in flight; a newer ping drops an older one that is still retrying, so a dead
receiver costs a bounded number of sockets, and a late `/start` never lands
after its `/fail`. Heartbeats are not persisted: a pulse is about now.
Pulse URLs embed tokens, so logs only ever show `redact_url(url)`.

Redirects are not followed, as by the alert outbox: a ping counts as delivered
only when its own URL answers 2xx. A moved or hijacked endpoint answering 3xx
is a failed ping whose reason names where it pointed (scheme://host only), and
never gets a request sent on from inside the network.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal
from urllib.parse import quote, unquote_plus, urlencode, urlsplit, urlunsplit

import aiohttp
import structlog
from yarl import URL

from daemon.checks.result import CheckResult
from daemon.config import HeartbeatKind, HeartbeatTarget
from daemon.config_base import scrub as scrub_pieces
from daemon.config_base import url_secret_pieces
from daemon.delivery import SessionFactory, default_session
from daemon.logs import shorten
from daemon.metrics import Metrics
from daemon.retry import Backoff
from daemon.supervisor import MAX_REASON, Progress
from daemon.wakeup import Waker

log = structlog.get_logger("daemon.heartbeat")

# healthchecks keeps this much of a ping body (self-hosted default PING_BODY_LIMIT).
BODY_LIMIT = 10_000
# Uptime Kuma's msg travels in the query string: keep URLs short.
MSG_LIMIT = 200
# However large `backoff` and `retries`, one wait never exceeds this.
MAX_BACKOFF = 300.0
# Reading a little of the response lets the connection be reused; we never need more.
_RESPONSE_READ_LIMIT = 1024
# Backstop over aiohttp's own ClientTimeout, in case a step escapes it.
_DEADLINE_SLACK = 1.0
# How long cancelled deliveries get to unwind at close().
_CANCEL_WAIT = 1.0
# The component's loop wakes at least this often (its progress tick).
TICK = 10.0
# Fixed namespace: the start and the end of a run derive the same healthchecks rid.
_RID_NAMESPACE = uuid.UUID("5d0c7e53-6a43-4c4e-9d55-3c1f1f0f6b7e")

Signal = Literal["start", "success", "fail", "up", "down"]


@dataclass(frozen=True)
class Ping:
    """One HTTP request to make (with retries) to a target."""

    signal: Signal
    method: str
    url: str
    body: bytes | None = None
    content_type: str | None = None


# -- what to send --------------------------------------------------------------------------


def redact_url(url: str) -> str:
    """`scheme://host[:port]/…`: the path and query of pulse URLs carry the token."""
    try:
        parts = urlsplit(url)
        host = parts.netloc.rpartition("@")[2]  # drop user:password@
    except ValueError:
        return "<invalid url>"
    if not parts.scheme or not host:
        return "<invalid url>"
    return f"{parts.scheme}://{host}/…"


def run_uuid(route: str, run_id: str) -> str:
    """The healthchecks `rid` of a run: a UUID, as healthchecks requires, derived from run_id."""
    try:
        return str(uuid.UUID(run_id))
    except ValueError:
        return str(uuid.uuid5(_RID_NAMESPACE, f"{route}/{run_id}"))


def start_ping(target: HeartbeatTarget, route: str, run_id: str) -> Ping | None:
    """The ping due when a run starts, if the target wants one."""
    if target.kind is HeartbeatKind.HEALTHCHECKS and target.send_start:
        url = edit_url(target_url(target), "/start", {"rid": run_uuid(route, run_id)})
        return Ping("start", "POST", url)
    return None


def finish_ping(
    target: HeartbeatTarget, result: CheckResult,
    failing: Sequence[CheckResult] = (), waiting: Sequence[str] = (),
) -> Ping | None:
    """The ping due when a run of a covered route ends, or None.

    `failing`: the latest runs of the target's other routes that failed;
    `waiting`: its other routes without a completed run yet.
    """
    url = target_url(target)
    if result.success and failing:
        result = _others_failed(result, failing)
    elif result.success and waiting:
        return None  # not every covered route has spoken yet: no success, no failure
    if target.kind is HeartbeatKind.HEALTHCHECKS:
        return _healthchecks_ping(url, result)
    if target.kind is HeartbeatKind.UPTIME_KUMA:
        return _uptime_kuma_ping(url, result)
    return _updown_ping(url, result)


def _others_failed(result: CheckResult, failing: Sequence[CheckResult]) -> CheckResult:
    """This run succeeded, but the target also covers routes whose latest run failed."""
    worst = failing[0]
    named = ", ".join(f"{r.route} ({_reason(r)})" for r in failing)
    combined = dataclasses.replace(result, success=False, reason=worst.reason,
                                   error=f"failing routes: {named}")
    return combined


def _updown_ping(url: str, result: CheckResult) -> Ping | None:
    if not result.success:
        return None  # the missing pulse is the alarm
    timings = {"send_time": _round(result.send_time),
               "reception_time": _round(result.reception_time)}
    return Ping("success", "POST", url, json.dumps(timings).encode(), "application/json")


def _healthchecks_ping(url: str, result: CheckResult) -> Ping:
    rid = {"rid": run_uuid(result.route, result.run_id)}
    if result.success:
        summary = {"route": result.route, "run_id": result.run_id,
                   "send_time": _round(result.send_time),
                   "reception_time": _round(result.reception_time)}
        return Ping("success", "POST", edit_url(url, "", rid),
                    json.dumps(summary).encode(), "application/json")
    text = (f"route={result.route} run_id={result.run_id} reason={_reason(result)}\n"
            f"{result.error or ''}\n")
    return Ping("fail", "POST", edit_url(url, "/fail", rid),
                truncate_utf8(text, BODY_LIMIT), "text/plain; charset=utf-8")


def _uptime_kuma_ping(url: str, result: CheckResult) -> Ping:
    if result.success:
        params = {"status": "up", "msg": "ok"}
    else:
        params = {"status": "down", "msg": _short(f"{_reason(result)}: {result.error or ''}")}
    if result.reception_time is not None:
        params["ping"] = str(round(result.reception_time * 1000))
    # The push URL Uptime Kuma displays ends in `?status=up&msg=OK&ping=`: ours replace those.
    return Ping("up" if result.success else "down", "GET",
                edit_url(url, "", params, remove=("ping",)))


def target_url(target: HeartbeatTarget) -> str:
    if target.url is None:  # the config validator forbids this
        raise ValueError(f"heartbeat {target.name!r}: url: required")
    return target.url.get_secret_value()


def edit_url(
    url: str, path_suffix: str, params: dict[str, str], remove: Iterable[str] = (),
) -> str:
    """Append to the path, set `params`, drop `remove`; other query items stay byte for byte."""
    parts = urlsplit(url)
    path = parts.path.rstrip("/") + path_suffix if path_suffix else parts.path
    dropped = {*params, *remove}
    kept = [item for item in parts.query.split("&")
            if item and unquote_plus(item.partition("=")[0]) not in dropped]
    # %20, not +: every receiver decodes it the same way.
    query = "&".join([*kept, urlencode(params, quote_via=quote)] if params else kept)
    return urlunsplit(parts._replace(path=path, query=query))


def truncate_utf8(text: str, limit: int) -> bytes:
    """At most `limit` bytes of UTF-8, never cutting a character in half."""
    return text.encode()[:limit].decode(errors="ignore").encode()


def _short(text: str) -> str:
    return text if len(text) <= MSG_LIMIT else text[: MSG_LIMIT - 1] + "…"


def _reason(result: CheckResult) -> str:
    return result.reason.value if result.reason is not None else "unknown"


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def scrub(text: str, url: str) -> str:
    """`text` with any piece of `url`'s path, query or credentials replaced by `…`."""
    return scrub_pieces(text, url_secret_pieces(url))


# -- delivery ------------------------------------------------------------------------------


# The pings that say "all covered routes are fine" (updown and healthchecks success,
# Uptime Kuma up).
_SUCCESS_SIGNALS = frozenset({"success", "up"})


class _RetryError(Exception):
    """An attempt failed in a way a retry may fix."""


@dataclass
class _Delivery:
    """One ping to deliver, and its task once started."""

    target: HeartbeatTarget
    route: str
    ping: Ping
    task: asyncio.Task[None] | None = None
    drop_reason: str = "cancelled"
    withdrawn: bool = False  # a success no longer true: skipped, not a failed delivery
    superseded: bool = False  # a newer ping of the same (target, route) replaced it
    failed_attempt: bool = False  # an attempt of it failed: the monitor did not take it

    @property
    def dropped_result(self) -> str:
        """How a drop counts: `failure` only if the monitor failed to take it.

        A ping replaced before any attempt of it failed (a healthchecks /start overtaken
        by its run's /fail) says nothing about the monitor: skipped."""
        if self.withdrawn or (self.superseded and not self.failed_attempt):
            return "skipped"
        return "failure"


class Heartbeats:
    """The `heartbeats` component: delivers every target's pings; never blocks the caller.

    Call `run_started(route, run_id)` and `run_finished(result)` from the runner;
    the supervisor runs `run()`. `close()` drains for a grace period and drops
    the rest (shutdown or a reload that replaces the targets).
    """

    name = "heartbeats"
    progress_deadline = 3 * TICK

    def __init__(
        self,
        targets: Iterable[HeartbeatTarget],
        metrics: Metrics,
        *,
        session_factory: SessionFactory = default_session,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        routes: Iterable[str] | None = None,
    ) -> None:
        self.targets = list(targets)
        # Every configured route (a target without `routes` covers them all);
        # None: each run speaks only for its own route.
        self.routes: list[str] | None = None if routes is None else list(routes)
        self._latest: dict[str, CheckResult] = {}
        self._metrics = metrics
        self._session_factory = session_factory
        self._queued: dict[tuple[str, str], _Delivery] = {}
        self._active: dict[tuple[str, str], _Delivery] = {}
        self._group: asyncio.TaskGroup | None = None
        self._waker = Waker(sleep)
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False
        self._progress: Progress | None = None

    @property
    def may_finish(self) -> bool:
        """After close() the loop ends on purpose."""
        return self._closed

    # -- what callers see ------------------------------------------------------------------

    def carry_results_from(self, old: Heartbeats) -> None:
        """A reload replaced the targets: keep what each route's latest run said."""
        self._latest = {k: v for k, v in old._latest.items()
                        if self.routes is None or k in self.routes}

    def set_routes(self, routes: Iterable[str]) -> None:
        """The configured routes changed (a reload): forget results of removed ones."""
        self.routes = list(routes)
        self._latest = {k: v for k, v in self._latest.items() if k in self.routes}

    def covered(self, target: HeartbeatTarget, route: str) -> list[str]:
        """The routes `target` speaks for, as seen from a run of `route`."""
        if target.routes is not None:
            return list(target.routes)
        return list(self.routes) if self.routes is not None else [route]

    def run_started(self, route: str, run_id: str) -> None:
        """Queue the start pings of a run (healthchecks with send_start); returns at once."""
        for target in self.targets:
            if route not in self.covered(target, route):
                continue
            ping = start_ping(target, route, run_id)
            if ping is not None:
                self._queue(target, route, ping)

    def run_finished(self, result: CheckResult) -> None:
        """Queue each covering target's ping for a finished run; returns at once."""
        self._latest[result.route] = result
        for target in self.targets:
            covered = self.covered(target, result.route)
            if result.route not in covered:
                continue
            others = [r for r in covered if r != result.route]
            failing = [self._latest[r] for r in others
                       if r in self._latest and not self._latest[r].success]
            waiting = [r for r in others if r not in self._latest]
            if not result.success or failing:
                # A covered route is failing now: a success pulse still queued or being
                # retried from an earlier run must not reach the monitor after this.
                self._withdraw_successes(target)
            ping = finish_ping(target, result, failing, waiting)
            if ping is not None:
                self._queue(target, result.route, ping)
            elif result.success:
                # This run passed, yet the target stays silent: say why, or the missing
                # pulse looks like a delivery problem.
                log.info("heartbeat_withheld", target=target.name, route=result.route,
                         failing=",".join(r.route for r in failing) or None,
                         waiting=",".join(waiting) or None)

    @property
    def idle(self) -> bool:
        """Nothing queued or in flight."""
        return self._idle.is_set()

    async def drain(self, timeout: float) -> bool:
        """Wait up to `timeout` s until nothing is queued or in flight; True if so."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def close(self, grace: float = 2.0) -> None:
        """Stop accepting pings, give queued and in-flight ones `grace` s, drop the rest."""
        self._closed = True
        if not await self.drain(grace):
            for delivery in [*self._queued.values(), *self._active.values()]:
                delivery.drop_reason = "shutdown"
                self._drop(delivery)
            self._queued.clear()
            tasks = {d.task for d in self._active.values() if d.task is not None}
            if tasks:
                await asyncio.wait(tasks, timeout=_CANCEL_WAIT)
        self._waker.poke()

    # -- the component ------------------------------------------------------------------

    async def run(self, progress: Progress) -> None:
        self._progress = progress
        async with self._session_factory() as session, asyncio.TaskGroup() as group:
            self._group = group
            try:
                while not self._closed:
                    for key, delivery in list(self._queued.items()):
                        del self._queued[key]
                        self._active[key] = delivery
                        delivery.task = group.create_task(
                            self._deliver(session, key, delivery),
                            name=f"heartbeat:{delivery.target.name}:{delivery.route}")
                    self._update_idle()
                    progress.progress()
                    await self._waker.wait(TICK)
            finally:
                self._group = None

    # -- internals ------------------------------------------------------------------------

    def _queue(self, target: HeartbeatTarget, route: str, ping: Ping) -> None:
        if self._closed:
            self._count(target, "skipped")
            log.warning("heartbeat_skipped", target=target.name, signal=ping.signal,
                        reason="closed")
            return
        key = (target.name, route)
        for older in (self._queued.pop(key, None), self._active.get(key)):
            if older is not None:
                older.drop_reason = f"superseded by a newer {ping.signal} ping"
                older.superseded = True
                self._drop(older)
        self._queued[key] = _Delivery(target, route, ping)
        self._idle.clear()
        self._waker.poke()

    def _withdraw_successes(self, target: HeartbeatTarget) -> None:
        for table in (self._queued, self._active):
            for key, delivery in list(table.items()):
                if key[0] == target.name and delivery.ping.signal in _SUCCESS_SIGNALS:
                    delivery.drop_reason = "withdrawn: a covered route failed since"
                    delivery.withdrawn = True
                    if table is self._queued:
                        del table[key]
                    self._drop(delivery)
        self._update_idle()

    def _drop(self, delivery: _Delivery) -> None:
        """Give up on a delivery (counted by `dropped_result`); its task, if any, is cancelled."""
        if delivery.task is not None:
            delivery.task.cancel()  # _deliver counts and logs it
            return
        self._count(delivery.target, delivery.dropped_result)
        log.warning("heartbeat_dropped", target=delivery.target.name,
                    url=redact_url(delivery.ping.url), signal=delivery.ping.signal,
                    reason=delivery.drop_reason)

    def _update_idle(self) -> None:
        if not self._queued and not self._active:
            self._idle.set()

    def _count(self, target: HeartbeatTarget, result: str) -> None:
        self._metrics.heartbeats.labels(target=target.name, result=result).inc()

    def _report(self, ok: bool, target: HeartbeatTarget, error: str | None = None) -> None:
        if self._progress is None:
            return
        if ok:
            self._progress.up()
        else:
            self._progress.down(f"heartbeat {target.name}: {error}", "heartbeat")

    async def _deliver(
        self, session: aiohttp.ClientSession, key: tuple[str, str], delivery: _Delivery,
    ) -> None:
        """One ping with bounded retries; counts and logs its outcome, even when dropped."""
        target, ping = delivery.target, delivery.ping
        try:
            await self._attempts(session, delivery)
        except asyncio.CancelledError:
            self._count(target, delivery.dropped_result)
            log.warning("heartbeat_dropped", target=target.name, url=redact_url(ping.url),
                        signal=ping.signal, reason=delivery.drop_reason)
            # Dropped on purpose (superseded, shutdown): this task ends here.
        except Exception as exc:  # a bug here must not take the component down
            self._count(target, "failure")
            log.error("heartbeat_failed", target=target.name, url=redact_url(ping.url),
                      signal=ping.signal, attempt=0,
                      error=scrub(f"internal error: {type(exc).__name__}: {exc}", ping.url))
        finally:
            if self._active.get(key) is delivery:
                del self._active[key]
            self._update_idle()

    async def _attempts(self, session: aiohttp.ClientSession, delivery: _Delivery) -> None:
        target, ping = delivery.target, delivery.ping
        context = {"target": target.name, "url": redact_url(ping.url), "signal": ping.signal}
        attempts = target.retries + 1
        policy = Backoff(initial=target.backoff, maximum=MAX_BACKOFF)
        error: str | None = None
        try:
            async for attempt in policy.retrying(on=_RetryError, attempts=attempts):
                with attempt:
                    error, retryable = await self._attempt(session, target, ping)
                    if error is None:
                        self._count(target, "success")
                        self._report(True, target)
                        log.debug("heartbeat_sent", **context, attempt=attempt.num)
                        return
                    delivery.failed_attempt = True
                    again = retryable and attempt.num < attempts
                    log.warning("heartbeat_failed", **context, attempt=attempt.num,
                                attempts=attempts, error=error,
                                retry_in=round(attempt.next_wait, 3) if again else None)
                    if again:
                        raise _RetryError(error)
        except _RetryError:
            pass  # out of attempts: counted below
        self._count(target, "failure")
        self._report(False, target, error)

    async def _attempt(
        self, session: aiohttp.ClientSession, target: HeartbeatTarget, ping: Ping,
    ) -> tuple[str | None, bool]:
        """(None, _) on a 2xx; else (error, whether a retry may help)."""
        headers = {"Content-Type": ping.content_type} if ping.content_type else None
        try:
            async with asyncio.timeout(target.timeout + _DEADLINE_SLACK):
                async with session.request(
                    ping.method, ping.url, data=ping.body, headers=headers,
                    allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=target.timeout),
                ) as response:
                    await response.content.read(_RESPONSE_READ_LIMIT)
                    status = response.status
                    location = response.headers.get("Location")
        except TimeoutError:  # also aiohttp's ServerTimeoutError
            return f"no response within {target.timeout:g}s", True
        except aiohttp.ClientError as exc:
            # A garbage answer is quoted whole by aiohttp ("Bad status line ..."): cut.
            return shorten(scrub(f"{type(exc).__name__}: {exc}", ping.url), MAX_REASON), True
        if 200 <= status < 300:
            return None, True
        if 300 <= status < 400:
            # The monitor did not get the ping; whoever answered may be anyone. A retry
            # gets the same answer.
            return f"HTTP {status} redirect to {redirect_target(ping.url, location)} " \
                   "(not followed)", False
        # 4xx (bad token, deleted check) will not heal on retry; 5xx, 408, 429 may.
        return f"HTTP {status}", status >= 500 or status in (408, 429)


def redirect_target(url: str, location: str | None) -> str:
    """Where a 3xx answer to `url` pointed, as scheme://host/… (the rest may carry tokens)."""
    if not location:
        return "nowhere (no Location header)"
    try:
        target = URL(url).join(URL(location.strip()))
    except (ValueError, TypeError):
        return "<invalid url>"
    return redact_url(str(target))
