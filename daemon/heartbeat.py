"""Heartbeats: tell an outside monitor how selfchecks go, without ever holding up a check.

Three kinds of target (`heartbeat[].kind`):

- `updown` (default, the seed's behaviour): after each *successful* run, POST
  `{"send_time": ..., "reception_time": ...}` to the URL; nothing on failure,
  so the missing pulse raises the alarm (updown.io pulses and the like).
- `healthchecks`: `<url>/start` before a run (with `send_start`), `<url>` on
  success, `<url>/fail` on failure; `?rid=` pairs start and end of a run.
- `uptime-kuma`: a push with `status=up|down`, `msg=` and `ping=` (ms).

Deliveries are fire-and-forget: `run_started`/`run_finished` only create a task
and return. Each (target, route) has at most one delivery chain in flight; a
newer ping drops an older chain that is still retrying, so a dead receiver costs
a bounded number of sockets, and a late `/start` never lands after its `/fail`.
Pulse URLs embed tokens, so logs only ever show `redact_url(url)`.
"""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from types import TracebackType
from typing import Literal
from urllib.parse import quote, unquote_plus, urlencode, urlsplit, urlunsplit

import aiohttp
import structlog

from daemon import __version__
from daemon.config import HeartbeatKind, HeartbeatTarget
from daemon.metrics import Metrics
from daemon.roundtrip.result import CheckResult

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
# Fixed namespace: the start and the end of a run derive the same healthchecks rid.
_RID_NAMESPACE = uuid.UUID("5d0c7e53-6a43-4c4e-9d55-3c1f1f0f6b7e")

Signal = Literal["start", "success", "fail", "up", "down"]
SessionFactory = Callable[[], aiohttp.ClientSession]


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


def finish_ping(target: HeartbeatTarget, result: CheckResult) -> Ping | None:
    """The ping due when a run ends; None when the kind signals by silence (updown)."""
    url = target_url(target)
    if target.kind is HeartbeatKind.HEALTHCHECKS:
        return _healthchecks_ping(url, result)
    if target.kind is HeartbeatKind.UPTIME_KUMA:
        return _uptime_kuma_ping(url, result)
    return _updown_ping(url, result)


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


def backoff_delay(base: float, retry: int, rng: Callable[[], float] = random.random) -> float:
    """Wait before retry number `retry` (1-based): base * 2^(retry-1), jittered +-50%."""
    return min(MAX_BACKOFF, base * 2.0 ** (retry - 1) * (0.5 + rng()))


def scrub(text: str, url: str) -> str:
    """`text` with any piece of `url`'s path, query or credentials replaced by `…`."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    pieces = {url, parts.path, parts.query, userinfo, *userinfo.split(":")}
    pieces.update(parts.path.split("/"))
    for item in parts.query.split("&"):
        pieces.update(item.split("="))
    # Short pieces ("api", "push") are not secrets and would garble the message.
    for piece in sorted((p for p in pieces if len(p) >= 6), key=len, reverse=True):
        text = text.replace(piece, "…")
    return text


# -- delivery ------------------------------------------------------------------------------


def default_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(headers={"User-Agent": f"selfcheckd/{__version__}"})


class _Chain:
    """One delivery task, and why it was cancelled (set by whoever cancels it)."""

    task: asyncio.Task[None]

    def __init__(self, target: HeartbeatTarget, ping: Ping) -> None:
        self.target = target
        self.ping = ping
        self.drop_reason = "cancelled"


class Heartbeats:
    """Sends the pings of every heartbeat target; never blocks the caller.

    Use `async with Heartbeats(targets, metrics) as hb:` (or `start()`/`close()`);
    call `run_started(route, run_id)` and `run_finished(result)` from the scheduler.
    """

    def __init__(
        self,
        targets: Iterable[HeartbeatTarget],
        metrics: Metrics,
        *,
        session_factory: SessionFactory = default_session,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self._targets = list(targets)
        self._metrics = metrics
        self._session_factory = session_factory
        self._rng = rng
        self._session: aiohttp.ClientSession | None = None
        self._chains: dict[tuple[str, str], _Chain] = {}
        self._closed = False

    async def start(self) -> None:
        """Open the HTTP session. Idempotent."""
        if self._session is None and self._targets and not self._closed:
            self._session = self._session_factory()

    async def close(self, grace: float = 2.0) -> None:
        """Stop accepting pings, give in-flight ones `grace` seconds, cancel the rest."""
        self._closed = True
        if not await self.drain(grace):
            pending = [c for c in self._chains.values() if not c.task.done()]
            for chain in pending:
                chain.drop_reason = "shutdown"
                chain.task.cancel()
            await asyncio.wait([c.task for c in pending], timeout=_CANCEL_WAIT)
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> Heartbeats:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def run_started(self, route: str, run_id: str) -> None:
        """Schedule the start pings of a run (healthchecks with send_start); returns at once."""
        for target in self._targets:
            ping = start_ping(target, route, run_id)
            if ping is not None:
                self._schedule(target, route, ping)

    def run_finished(self, result: CheckResult) -> None:
        """Schedule each target's ping for a finished run; returns at once."""
        for target in self._targets:
            ping = finish_ping(target, result)
            if ping is not None:
                self._schedule(target, result.route, ping)

    async def drain(self, timeout: float) -> bool:
        """Wait up to `timeout` s for in-flight deliveries; True if all of them finished."""
        pending = {c.task for c in self._chains.values() if not c.task.done()}
        if not pending:
            return True
        _done, not_done = await asyncio.wait(pending, timeout=timeout)
        return not not_done

    def _schedule(self, target: HeartbeatTarget, route: str, ping: Ping) -> None:
        if self._closed or self._session is None:
            why = "closed" if self._closed else "not started"
            self._count(target, "skipped")
            log.warning("heartbeat_skipped", target=target.name, signal=ping.signal, reason=why)
            return
        key = (target.name, route)
        old = self._chains.get(key)
        if old is not None and not old.task.done():
            old.drop_reason = f"superseded by a newer {ping.signal} ping"
            old.task.cancel()  # _forget counts it as a failure
        chain = _Chain(target, ping)
        chain.task = asyncio.get_running_loop().create_task(
            self._deliver(self._session, target, ping),
            name=f"heartbeat:{target.name}:{route}")
        self._chains[key] = chain
        chain.task.add_done_callback(partial(self._forget, key, chain))

    def _forget(self, key: tuple[str, str], chain: _Chain, task: asyncio.Task[None]) -> None:
        if self._chains.get(key) is chain:
            del self._chains[key]
        # Counted here, not in _deliver: a task cancelled before it ran never enters it.
        if task.cancelled():
            self._count(chain.target, "failure")
            log.warning("heartbeat_dropped", target=chain.target.name,
                        url=redact_url(chain.ping.url), signal=chain.ping.signal,
                        reason=chain.drop_reason)

    def _count(self, target: HeartbeatTarget, result: str) -> None:
        self._metrics.heartbeats.labels(target=target.name, result=result).inc()

    async def _deliver(
        self, session: aiohttp.ClientSession, target: HeartbeatTarget, ping: Ping,
    ) -> None:
        """One ping with bounded retries; counts and logs its outcome (unless cancelled)."""
        context = {"target": target.name, "url": redact_url(ping.url), "signal": ping.signal}
        attempts = target.retries + 1
        try:
            for attempt in range(1, attempts + 1):
                error, retryable = await self._attempt(session, target, ping)
                if error is None:
                    self._count(target, "success")
                    log.debug("heartbeat_sent", **context, attempt=attempt)
                    return
                delay = None
                if retryable and attempt < attempts:
                    delay = round(backoff_delay(target.backoff, attempt, self._rng), 3)
                log.warning("heartbeat_failed", **context, attempt=attempt, attempts=attempts,
                            error=error, retry_in=delay)
                if delay is None:
                    break
                await asyncio.sleep(delay)
            self._count(target, "failure")
        except Exception as exc:  # a bug here must not kill the daemon's loop quietly
            self._count(target, "failure")
            log.error("heartbeat_failed", **context, attempt=0, attempts=attempts,
                      error=scrub(f"internal error: {type(exc).__name__}: {exc}", ping.url))

    async def _attempt(
        self, session: aiohttp.ClientSession, target: HeartbeatTarget, ping: Ping,
    ) -> tuple[str | None, bool]:
        """(None, _) on a 2xx; else (error, whether a retry may help)."""
        headers = {"Content-Type": ping.content_type} if ping.content_type else None
        try:
            async with asyncio.timeout(target.timeout + _DEADLINE_SLACK):
                async with session.request(
                    ping.method, ping.url, data=ping.body, headers=headers,
                    timeout=aiohttp.ClientTimeout(total=target.timeout),
                ) as response:
                    await response.content.read(_RESPONSE_READ_LIMIT)
                    status = response.status
        except TimeoutError:  # also aiohttp's ServerTimeoutError
            return f"no response within {target.timeout:g}s", True
        except aiohttp.ClientError as exc:
            return scrub(f"{type(exc).__name__}: {exc}", ping.url), True
        if 200 <= status < 300:
            return None, True
        # 4xx (bad token, deleted check) will not heal on retry; 5xx, 408, 429 may.
        return f"HTTP {status}", status >= 500 or status in (408, 429)

