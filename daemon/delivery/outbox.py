"""The alert outbox: an alert is delivered at least once, or it is still pending.

Alerts go to a Cabalmail alert_sink compatible webhook: POST
`{"summary", "severity", "source", "id"}` with headers `X-Alert-Id` and
`X-Alert-Secret`. An alert counts as delivered only when the webhook answered
2xx. Until then it stays in the outbox, which the leak watcher's state file
persists, so it survives restarts. Each pending alert is retried with capped
exponential backoff and jitter until it is delivered or `max_age` passes; an
expired alert is counted and logged as an error (the one way an alert is
lost, and a loud one). Deliveries run concurrently, at most `max_concurrent`
requests at a time, so one hanging request never holds back another alert.
The id is stable (derived from the alert's key), so a receiver can drop the
rare duplicate that at-least-once delivery brings.

Rate limit: at most `rate_limit` alerts start their first delivery per
`rate_period`. Alerts beyond that wait; when the window frees up and more are
waiting than it has room for, they are folded into one digest alert.

Flood: at most `max_pending` alerts are held (a leak flood while the webhook is
down would otherwise hold hundreds of thousands, and the state file with them).
The alerts beyond are folded as they arrive into one open digest, which counts
them and lists the first `DIGEST_SUMMARIES`; it is sealed (its text fixed, then
sent like any alert, under its own stable id) when the rate window lets it out
and the outbox has room for the next digest. So every alert is either its own
delivery or counted in a delivered digest, and memory stays bounded.

Age: an alert ages on the monotonic clock while the process runs (a step of the
wall clock expires nothing); its saved `created_at` is the wall time that age
corresponds to at the save, so across a restart it ages on from there.

What a save must hold for at-least-once delivery is the set of pending alerts;
their attempt counts are for the operator. So the outbox asks for a save when
that set changes (an alert admitted, a digest sealed, an alert sent or expired;
the leak watcher saves after the read that queued one), never after a failed
attempt.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import structlog

from daemon.delivery import SessionFactory, default_session
from daemon.logs import shorten
from daemon.logwatch.config import AlertWebhook
from daemon.metrics import Metrics
from daemon.retry import Backoff
from daemon.supervisor import Progress
from daemon.wakeup import Waker

log = structlog.get_logger("daemon.alerts")

# The loop wakes at least this often (its progress tick).
TICK = 10.0
# Keys of delivered alerts remembered in memory, so a re-submission is a duplicate.
MAX_REMEMBERED_KEYS = 10_000
# A digest lists this many of the summaries it stands for (and remembers their keys),
# then counts the rest.
DIGEST_SUMMARIES = 10
DIGEST_CHARS = 4000
# An alert's summary is cut here: a leak's comes from a log line, which may be 4 MiB.
SUMMARY_CHARS = 1000
DIGEST_PREFIX = "digest "
_RESPONSE_READ_LIMIT = 4096
_RETRY_STATUSES = frozenset({408, 425, 429})
_SEVERITY_RANK = {"info": 0, "warning": 1, "critical": 2}
_ID_NAMESPACE = uuid.UUID("0f3c5b1e-8d7a-4c1b-9a55-6a4f2e7d9b10")

def alert_id(source: str, key: str) -> str:
    """The same alert (same source and key) always gets the same id, across restarts."""
    return str(uuid.uuid5(_ID_NAMESPACE, f"{source}\n{key}"))


@dataclass
class Alert:
    """One pending alert, or a digest standing for `count` of them."""

    id: str
    key: str
    summary: str
    severity: str
    created_at: float  # wall clock, as saved: the age carried across a restart
    attempts: int = 0
    last_error: str | None = None
    admitted: bool = False  # counted against the rate limit; may be delivered
    folded: list[str] = field(default_factory=list)  # a digest: keys of the alerts it lists
    count: int = 1  # a digest: the alerts it stands for
    examples: list[str] = field(default_factory=list)  # an open digest: the summaries it lists
    born: float = 0.0  # monotonic: the age while this process runs; not persisted
    next_at: float = 0.0  # monotonic; not persisted (a restart retries at once)
    held: bool = False  # found the rate window full; not persisted

    @property
    def is_digest(self) -> bool:
        return self.key.startswith(DIGEST_PREFIX)

    def as_dict(self) -> dict[str, Any]:
        out = {"id": self.id, "key": self.key, "summary": self.summary,
               "severity": self.severity, "created_at": self.created_at,
               "attempts": self.attempts, "last_error": self.last_error,
               "admitted": self.admitted, "folded": list(self.folded)}
        if self.is_digest:  # a plain alert is saved as earlier releases saved it
            out["count"] = self.count
            out["examples"] = list(self.examples)
        return out


def new_digest(source: str, first: Alert) -> Alert:
    """An empty open digest; its id is random once, then saved with it (stable)."""
    key = f"{DIGEST_PREFIX}{uuid.uuid4()}"
    return Alert(id=alert_id(source, key), key=key, summary="", severity=first.severity,
                 created_at=first.created_at, born=first.born, count=0)


def fold_into(digest: Alert, alert: Alert) -> None:
    """Count `alert` (a plain alert or a digest) in the open `digest`."""
    digest.count += alert.count
    digest.severity = max(digest.severity, alert.severity,
                          key=lambda s: _SEVERITY_RANK.get(s, 0))
    digest.created_at = min(digest.created_at, alert.created_at)
    digest.born = min(digest.born, alert.born)
    if alert.is_digest:  # an open one lists its examples; a sealed one is its summary
        examples = alert.examples or [shorten(alert.summary, SUMMARY_CHARS)]
        keys = alert.folded
    else:
        examples, keys = [alert.summary], [alert.key]
    digest.examples += examples[:DIGEST_SUMMARIES - len(digest.examples)]
    digest.folded += keys[:DIGEST_SUMMARIES - len(digest.folded)]


def render_digest(digest: Alert, why: str) -> str:
    """The digest's summary: how many, why, the first few."""
    shown = "; ".join(digest.examples)
    more = digest.count - len(digest.examples)
    summary = (f"{digest.count:,} further alerts were held back by {why}: {shown}"
               + (f"; and {more:,} more (see the daemon's log)" if more > 0 else ""))
    return shorten(summary, DIGEST_CHARS)


def fold_saved(alerts: list[dict[str, Any]], keep: int, source: str,
               why: str) -> list[dict[str, Any]]:
    """Saved alerts with all but the first `keep` folded into one open digest (counts kept).

    For a state document that must shrink: the live outbox is not touched."""
    if len(alerts) <= keep + 1:
        return alerts
    rest = [Alert(**a) for a in alerts[keep:]]
    digest = new_digest(source, rest[0])
    for alert in rest:
        fold_into(digest, alert)
    digest.summary = render_digest(digest, why)
    return [*alerts[:keep], digest.as_dict()]


class Outbox:
    """The `leakwatch-alerts` component: owns pending alerts and their deliveries."""

    name = "leakwatch-alerts"
    progress_deadline = 3 * TICK

    def __init__(
        self,
        cfg: AlertWebhook,
        metrics: Metrics,
        *,
        on_change: Callable[[], Awaitable[object]] | None = None,
        on_expired: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        session_factory: SessionFactory = default_session,
    ) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self._on_change = on_change
        self._on_expired = on_expired
        self._clock = clock
        self._wall = wall
        self._session_factory = session_factory
        self._backoff = Backoff(initial=cfg.backoff, maximum=cfg.max_backoff)
        self._pending: dict[str, Alert] = {}  # by id, oldest first; at most max_pending
        self._open: Alert | None = None  # the digest a flood folds into (never in flight)
        self._keys: dict[str, str] = {}  # key -> id of the pending alert
        self._sent: OrderedDict[str, None] = OrderedDict()
        self._admissions: deque[float] = deque()
        self._in_flight: dict[str, asyncio.Task[None]] = {}
        self._waker = Waker(sleep)
        self._settled = asyncio.Event()  # set whenever a delivery attempt ends
        self._progress: Progress | None = None
        self.why_folded = (f"the rate limit ({cfg.rate_limit} per {cfg.rate_period:g}s) or "
                           f"the cap of {cfg.max_pending:,} pending alerts")

    # -- what the leak watcher sees --------------------------------------------------------

    def submit(self, summary: str, severity: str | None = None, key: str | None = None) -> bool:
        """Queue an alert unless one with the same key is pending or was delivered.

        Past `max_pending` it is counted in the open digest instead (still True)."""
        key = summary if key is None else key
        if key in self._keys or key in self._sent:
            self.metrics.alerts_suppressed.labels(reason="duplicate").inc()
            return False
        alert = Alert(id=alert_id(self.cfg.source, key), key=key,
                      summary=shorten(summary, SUMMARY_CHARS),
                      severity=severity or self.cfg.severity, created_at=self._wall(),
                      born=self._clock())
        if not self._hold(alert):
            self.metrics.alerts_suppressed.labels(reason="folded").inc()
        self._waker.poke()
        return True

    def pending(self) -> list[Alert]:
        self._render_open()
        return list(self._pending.values())

    def age(self, alert: Alert) -> float:
        """Seconds since `alert` was raised (on the monotonic clock; see the module doc)."""
        return max(0.0, self._clock() - alert.born)

    def snapshot(self) -> list[dict[str, Any]]:
        """The pending alerts as the state file keeps them, `created_at` set from their age."""
        self._render_open()
        wall = self._wall()
        saved = []
        for alert in self._pending.values():
            entry = alert.as_dict()
            entry["created_at"] = wall - self.age(alert)
            saved.append(entry)
        return saved

    def restore(self, alerts: Iterable[Alert]) -> None:
        """Take over alerts left pending by an earlier process (or before a reload).

        They age from their saved wall time; beyond `max_pending` they are folded."""
        now, wall = self._clock(), self._wall()
        for alert in alerts:
            if alert.id in self._pending or alert.key in self._keys:
                continue
            alert.next_at = 0.0
            alert.born = now - max(0.0, wall - alert.created_at)
            alert.summary = shorten(alert.summary, DIGEST_CHARS if alert.is_digest
                                    else SUMMARY_CHARS)
            if alert.is_digest:  # earlier releases listed every folded key, and no count
                alert.count = max(alert.count, sum(
                    1 for key in alert.folded if not key.startswith(DIGEST_PREFIX)))
                alert.folded = alert.folded[:DIGEST_SUMMARIES]
                alert.examples = alert.examples[:DIGEST_SUMMARIES]
                if not alert.admitted:  # an open digest: ours, or folded into ours
                    if self._open is None and len(self._pending) < self.cfg.max_pending:
                        self._open = alert
                        self._add(alert)
                    else:
                        self._fold([alert])
                    continue
            self._hold(alert)
        if self._pending:
            log.info("alerts_restored", pending=len(self._pending),
                     alerts=sum(a.count for a in self._pending.values()))
            self._waker.poke()

    async def flush(self, timeout: float) -> bool:
        """Try every deliverable alert once more, now; wait up to `timeout` s.

        True if no alert is left pending.
        """
        tried = {a.id: a.attempts for a in self._pending.values() if a.admitted}
        for alert in self._pending.values():
            alert.next_at = 0.0
        self._waker.poke()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            self._settled.clear()  # before the check, so an attempt ending now is not missed
            if not any(tried.get(a.id) == a.attempts for a in self._pending.values()):
                break
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                await asyncio.wait_for(self._settled.wait(), left)
            except TimeoutError:
                break
        return not self._pending

    # -- the component ------------------------------------------------------------------

    async def run(self, progress: Progress) -> None:
        self._progress = progress
        async with self._session_factory() as session, asyncio.TaskGroup() as group:
            while True:
                changed = self._expire()
                changed = self._admit() or changed
                if changed:
                    # Saved before anything new is sent: a digest delivered and then lost
                    # to a kill before its save came back as other alerts under new ids.
                    await self._save()
                self._dispatch(group, session)
                self._export()
                progress.progress()
                if not self._failing():
                    progress.up()
                await self._waker.wait(self._next_wake())

    # -- bookkeeping ----------------------------------------------------------------------

    def _hold(self, alert: Alert) -> bool:
        """Keep `alert` pending if the outbox has room beside a digest; else fold it.

        True if it is held on its own."""
        if len(self._pending) < self.cfg.max_pending - 1:
            self._add(alert)
            return True
        if self._open is None:
            log.warning("alerts_folded", max_pending=self.cfg.max_pending,
                        consequence="further alerts are counted in one digest until the "
                                    "webhook accepts the pending ones")
        self._fold([alert])
        return False

    def _fold(self, alerts: list[Alert]) -> Alert:
        """Count `alerts`, in order, in the open digest (opened now if there is none)."""
        digest = self._open
        if digest is None:
            digest = self._open = new_digest(self.cfg.source, alerts[0])
        for alert in alerts:
            if alert.id in self._pending:
                self._remove(alert)
            fold_into(digest, alert)
        self._add(digest)  # (again): its folded keys are its own now
        return digest

    def _render_open(self) -> None:
        if self._open is not None:
            self._open.summary = render_digest(self._open, self.why_folded)

    def _seal(self, digest: Alert) -> None:
        """The open digest goes out as it is now; later alerts fold into a new one."""
        self._render_open()
        digest.examples = []  # its summary lists them now
        self._open = None
        log.info("alert_digest_sealed", alert_id=digest.id, alerts=digest.count)

    def _add(self, alert: Alert) -> None:
        self._pending[alert.id] = alert
        for key in (alert.key, *alert.folded):  # a digest stands for its folded alerts
            self._keys[key] = alert.id
        self._export()

    def _remove(self, alert: Alert) -> None:
        self._pending.pop(alert.id, None)
        if alert is self._open:
            self._open = None
        for key in (alert.key, *alert.folded):
            if self._keys.get(key) == alert.id:
                del self._keys[key]
        self._export()

    def _failing(self) -> bool:
        return any(a.attempts and a.last_error for a in self._pending.values())

    def _export(self) -> None:
        # Read at scrape time, so the age keeps growing between deliveries.
        self.metrics.alerts_pending.set_function(lambda: len(self._pending))
        self.metrics.alerts_oldest_pending_age.set_function(self._oldest_age)

    def unbind_metrics(self) -> None:
        """Stop exporting this outbox (it is being replaced or removed): both read 0."""
        self.metrics.alerts_pending.set_function(lambda: 0.0)
        self.metrics.alerts_oldest_pending_age.set_function(lambda: 0.0)

    def _oldest_age(self) -> float:
        oldest = min((a.born for a in self._pending.values()), default=None)
        return 0.0 if oldest is None else max(0.0, self._clock() - oldest)

    async def _save(self) -> None:
        if self._on_change is not None:
            await self._on_change()

    def _expire(self) -> bool:
        now = self._clock()
        expired = [a for a in self._pending.values()
                   if a.id not in self._in_flight and now - a.born >= self.cfg.max_age]
        if expired:
            self._render_open()
        for alert in expired:
            self._remove(alert)
            self.metrics.alert_deliveries.labels(result="expired").inc()
            log.error("alert_expired", alert_id=alert.id, summary=alert.summary,
                      alerts=alert.count, attempts=alert.attempts,
                      last_error=alert.last_error, max_age=self.cfg.max_age)
            if self._on_expired is not None:
                for key in (alert.key, *alert.folded):
                    self._on_expired(key)
        return bool(expired)

    def _window_free(self) -> int:
        now = self._clock()
        while self._admissions and now - self._admissions[0] >= self.cfg.rate_period:
            self._admissions.popleft()
        return self.cfg.rate_limit - len(self._admissions)

    def _admit(self) -> bool:
        """Let waiting alerts through the rate limit, in order.

        Alerts that found the window full are held; when it frees up and more are
        waiting than it has room for, they all go out folded into one digest. The open
        digest is sealed when admitted, if the outbox has room for the next one.
        """
        waiting = [a for a in self._pending.values() if not a.admitted]
        if not waiting:
            return False
        free = self._window_free()
        if free <= 0:
            for alert in waiting:
                alert.held = True
            return False
        if len(waiting) > free and any(a.held for a in waiting):
            self.metrics.alerts_suppressed.labels(reason="folded").inc(
                sum(1 for a in waiting if a is not self._open))
            # One digest of them all, in their order (the open one included: never sent,
            # so it may take a new id), so it lists the first ones.
            self._open = None
            waiting = [self._fold(waiting)]
        admitted = False
        for alert in waiting[:free]:
            if alert is self._open:
                if len(self._pending) >= self.cfg.max_pending:
                    alert.held = True  # no room for the next digest: it keeps counting
                    continue
                self._seal(alert)
            alert.admitted = True
            admitted = True
            self._admissions.append(self._clock())
        for alert in waiting[free:]:
            alert.held = True
        return admitted

    def _next_wake(self) -> float:
        """Seconds until something is due: a retry, a free rate window, an expiry."""
        now = self._clock()
        idle = [a for a in self._pending.values() if a.id not in self._in_flight]
        wake = TICK
        if len(self._in_flight) < self.cfg.max_concurrent:  # else a finishing one pokes us
            for alert in idle:
                if alert.admitted:
                    wake = min(wake, alert.next_at - now)
        if any(not a.admitted for a in idle) and self._admissions:
            wake = min(wake, self._admissions[0] + self.cfg.rate_period - now)
        for alert in idle:
            wake = min(wake, alert.born + self.cfg.max_age - now)
        return max(0.0, wake)

    # -- delivery -------------------------------------------------------------------------

    def _dispatch(self, group: asyncio.TaskGroup, session: aiohttp.ClientSession) -> None:
        now = self._clock()
        for alert in list(self._pending.values()):
            if len(self._in_flight) >= self.cfg.max_concurrent:
                return
            if alert.admitted and alert.id not in self._in_flight and alert.next_at <= now:
                self._in_flight[alert.id] = group.create_task(
                    self._deliver(session, alert), name=f"alert:{alert.id}")

    async def _deliver(self, session: aiohttp.ClientSession, alert: Alert) -> None:
        try:
            result, error, retry_after = await self._post(session, alert)
        except Exception as exc:  # a bug must not cost the alert: retry it like a failure
            log.exception("alert_delivery_crashed", alert_id=alert.id)
            result, error, retry_after = "failed", f"internal error: {type(exc).__name__}", None
        finally:
            self._in_flight.pop(alert.id, None)
        alert.attempts += 1
        self.metrics.alert_deliveries.labels(result=result).inc()
        if result == "sent":
            self._remove(alert)
            for key in (alert.key, *alert.folded):
                self._sent[key] = None
            while len(self._sent) > MAX_REMEMBERED_KEYS:
                self._sent.popitem(last=False)
            log.info("alert_delivered", alert_id=alert.id, attempts=alert.attempts,
                     severity=alert.severity, alerts=alert.count)
            if self._progress is not None and not self._failing():
                self._progress.up()
        else:
            alert.last_error = error
            delay = self._backoff.delay(alert.attempts)
            if retry_after is not None:
                delay = self._backoff.not_before(retry_after, alert.attempts)
            alert.next_at = self._clock() + delay
            # The URL may carry a token and the secret is a secret: log neither.
            log.warning("alert_delivery_failed", alert_id=alert.id, attempt=alert.attempts,
                        result=result, error=error, retry_in=round(delay, 3),
                        summary=alert.summary)
            if self._progress is not None:
                self._progress.down(f"webhook: {error}", "webhook")
        self._settled.set()
        self._waker.poke()
        if result == "sent":
            # The pending set changed. A failed attempt changed only its attempt count,
            # which at-least-once does not need: saving the outbox for it made a flood
            # rewrite the whole file on every retry.
            await self._save()

    async def _post(
        self, session: aiohttp.ClientSession, alert: Alert,
    ) -> tuple[str, str | None, float | None]:
        """(result, error, Retry-After seconds) of one POST."""
        body = {"summary": alert.summary, "severity": alert.severity,
                "source": self.cfg.source, "id": alert.id}
        headers = {"X-Alert-Id": alert.id}
        if self.cfg.secret is not None:
            headers["X-Alert-Secret"] = self.cfg.secret.get_secret_value()
        try:
            # No redirects: aiohttp would carry X-Alert-Secret to wherever they point.
            async with asyncio.timeout(self.cfg.timeout), session.post(
                self.cfg.url, json=body, headers=headers, allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=self.cfg.timeout),
            ) as resp:
                await resp.content.read(_RESPONSE_READ_LIMIT)
                status = resp.status
                retry_after = _seconds(resp.headers.get("Retry-After"))
        except TimeoutError:
            return "failed", f"no response within {self.cfg.timeout:g}s", None
        except (aiohttp.ClientError, OSError) as exc:
            return "failed", type(exc).__name__, None
        if 200 <= status < 300:
            return "sent", None, None
        if status >= 500 or status in _RETRY_STATUSES:
            return "failed", f"HTTP {status}", retry_after
        # The sink refused it (bad secret, bad body): keep it, an operator can fix the config.
        return "rejected", f"HTTP {status}", retry_after


def _seconds(value: str | None) -> float | None:
    """A Retry-After given in seconds (the HTTP-date form is ignored)."""
    if value is None or not value.strip().isdigit():
        return None
    return float(value.strip())
