"""Send alerts to a Cabalmail alert_sink compatible webhook.

POST `{"summary", "severity", "source"}` with header `X-Alert-Secret`. Alerts
are queued (never blocking the log reader), deduplicated by key, retried with
exponential backoff on 5xx/408/429/network errors, and rate limited: past
`rate_limit` alerts per `rate_period`, the rest are counted and folded into one
summary alert once the window frees up.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
import structlog

from daemon.logwatch.config import AlertWebhook
from daemon.metrics import Metrics

log = structlog.get_logger()

MAX_QUEUED = 1000
MAX_REMEMBERED_KEYS = 10_000
_RETRY_STATUSES = frozenset({408, 425, 429})


@dataclass(slots=True, frozen=True)
class Alert:
    summary: str
    severity: str
    key: str


class AlertSender:
    """Owns the webhook queue; `run()` is the worker task."""

    def __init__(
        self,
        cfg: AlertWebhook,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.clock = clock
        self.sleep = sleep
        self.queue: asyncio.Queue[Alert] = asyncio.Queue(maxsize=MAX_QUEUED)
        self._keys: OrderedDict[str, None] = OrderedDict()
        self._sent_at: deque[float] = deque()
        self.suppressed = 0

    def _count(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.leakwatch_alerts.labels(result=result).inc()

    def submit(self, summary: str, severity: str | None = None, key: str | None = None) -> None:
        """Queue an alert unless one with the same key was queued before; never blocks."""
        dedupe = key if key is not None else summary
        if dedupe in self._keys:
            self._count("duplicate")
            return
        self._keys[dedupe] = None
        while len(self._keys) > MAX_REMEMBERED_KEYS:
            self._keys.popitem(last=False)
        try:
            self.queue.put_nowait(Alert(summary, severity or self.cfg.severity, dedupe))
        except asyncio.QueueFull:
            self.suppressed += 1
            self._count("dropped")

    def _window_wait(self) -> float:
        """Seconds until another alert may go out (0 if now)."""
        now = self.clock()
        while self._sent_at and now - self._sent_at[0] >= self.cfg.rate_period:
            self._sent_at.popleft()
        if len(self._sent_at) < self.cfg.rate_limit:
            return 0.0
        return self.cfg.rate_period - (now - self._sent_at[0])

    async def run(self) -> None:
        """Deliver queued alerts until cancelled."""
        timeout = aiohttp.ClientTimeout(total=self.cfg.timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                wait = self._window_wait()
                if wait > 0:
                    # Rate limited: count what piles up, send one roll-up later.
                    try:
                        async with asyncio.timeout(wait):
                            await self.queue.get()
                        self.suppressed += 1
                        self._count("rate_limited")
                    except TimeoutError:
                        pass
                    continue
                if self.suppressed:
                    count, self.suppressed = self.suppressed, 0
                    await self._deliver(session, Alert(
                        f"{count} further selfcheckd leak watcher alert(s) were not sent "
                        "individually (rate limit); see the sinkhole_leak_detected log lines",
                        self.cfg.severity, "rollup"))
                    continue
                alert = await self.queue.get()
                await self._deliver(session, alert)

    async def _deliver(self, session: aiohttp.ClientSession, alert: Alert) -> bool:
        self._sent_at.append(self.clock())
        body = {"summary": alert.summary, "severity": alert.severity, "source": self.cfg.source}
        headers = {}
        if self.cfg.secret is not None:
            headers["X-Alert-Secret"] = self.cfg.secret.get_secret_value()
        delay = self.cfg.backoff
        problem = ""
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                await self.sleep(delay)
                delay *= 2
            try:
                async with asyncio.timeout(self.cfg.timeout), session.post(
                    self.cfg.url, json=body, headers=headers
                ) as resp:
                    await resp.read()
                    if resp.status < 300:
                        self._count("sent")
                        return True
                    problem = f"HTTP {resp.status}"
                    if resp.status < 500 and resp.status not in _RETRY_STATUSES:
                        break  # the sink refused it (bad secret, bad body): retrying won't help
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                problem = type(exc).__name__
        self._count("failed")
        # The URL may carry a token and the secret is a secret: log neither.
        log.error("leakwatch_alert_failed", problem=problem, attempts=attempt + 1,
                  summary=alert.summary)
        return False
