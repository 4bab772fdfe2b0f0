"""Bounds on the HTTP listener: how many connections it holds, and one log line per flood.

aiohttp closes a connection that has not sent a complete request within its
`keepalive_timeout` (we pass `[server] header_timeout`), but it has no cap on
how many connections it holds: 1,100 idle sockets took every fd of a
1,024-fd task, and the round trip and the leak watcher died with the
listener. `ConnectionGuard` wraps each accepted connection before aiohttp sees
it and keeps at most `cap` of them:

* a new connection past the cap closes the oldest *idle* one (no request
  being handled: a slowloris, a keep-alive connection between scrapes) that
  has been held at least `EVICT_GRACE`, so a fresh client (a Prometheus
  scrape) gets in and the attacker's own sockets make room for it, and once in
  it has time to send its request before a burst of newer ones could push it
  out; if no held connection qualifies, the new one is refused. Either way the
  socket is aborted before aiohttp allocates anything for it;
* when the listener is not on loopback, `LOOPBACK_RESERVE` more connections
  are kept for loopback peers: the ECS health check runs inside the task, so a
  flood from the network cannot make it fail and get the task replaced;
* the listener's fds are bounded by `RLIMIT_NOFILE // 4`: `cap` (at most
  `[server] max_connections`) plus the accept backlog (asyncio accepts up to
  `backlog` sockets in one go and closes the shed ones a loop turn later) plus
  the loopback reserve; the other three quarters stay for the components (SMTP
  and IMAP connections, the log file, CloudWatch and webhook sessions, saves);
* the guard counts what it sheds; the `http` component's loop calls `report()`
  and a flood is logged once per `FLOOD_LOG_INTERVAL` with the counts, never
  a line per connection.
"""

from __future__ import annotations

import asyncio
import ipaddress
import resource
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web

from daemon.metrics import Metrics

log = structlog.get_logger("daemon.http")

# One line per flood per minute, however many connections it sheds.
FLOOD_LOG_INTERVAL = 60.0
# The listener may use this share of RLIMIT_NOFILE; the rest is the components'.
FD_SHARE = 4
# The most sockets accepted in one go (asyncio's accept loop takes up to `backlog`).
MAX_BACKLOG = 128
# Connections kept for loopback peers (the health check) past the cap.
LOOPBACK_RESERVE = 8
# A connection younger than this is not shed for a newer one (loop seconds).
EVICT_GRACE = 0.25


def _nofile() -> int:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def accept_backlog(nofile: int | None = None) -> int:
    """The listen backlog, which is also how many sockets one accept burst may hold."""
    share = (nofile or _nofile()) // FD_SHARE
    return max(1, min(MAX_BACKLOG, (share - LOOPBACK_RESERVE) // 2))


def connection_cap(max_connections: int, nofile: int | None = None) -> int:
    """How many connections the listener holds: the configured number, and at most what
    is left of a quarter of the soft fd limit after the backlog and the loopback
    reserve (never fewer than one)."""
    nofile = nofile or _nofile()
    share = nofile // FD_SHARE - accept_backlog(nofile) - LOOPBACK_RESERVE
    return max(1, min(max_connections, share))


class _Connection(asyncio.Protocol):
    """One accepted connection: admitted by the guard before aiohttp's handler sees it."""

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol) -> None:
        self._guard = guard
        self._inner = inner
        self.transport: asyncio.Transport | None = None
        self.admitted = False
        self.busy = 0  # requests being handled
        self.since = 0.0  # loop time of the accept
        self.reserved = False  # held in the loopback reserve

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.since = asyncio.get_running_loop().time()
        if self._guard.admit(self):
            self.admitted = True
            self._inner.connection_made(transport)
        else:
            transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.admitted:
            self.admitted = False
            self._guard.forget(self)
            self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.admitted:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self.admitted else None

    def pause_writing(self) -> None:
        if self.admitted:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self.admitted:
            self._inner.resume_writing()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class ConnectionGuard:
    """Admits connections up to `cap`, shedding the oldest idle one past it."""

    def __init__(self, cap: int, metrics: Metrics, clock: Callable[[], float],
                 loopback_reserve: int = 0) -> None:
        self.cap = cap
        self._metrics = metrics
        self._clock = clock
        self._reserve = loopback_reserve
        self._reserved: set[_Connection] = set()
        self._open: OrderedDict[_Connection, None] = OrderedDict()  # oldest first
        self._by_transport: dict[Any, _Connection] = {}
        self._evicted = 0  # since the last report
        self._refused = 0
        self._reported_at: float | None = None
        self.set_cap(cap)

    def set_cap(self, cap: int) -> None:
        """A reload's new cap: held connections past it go as new ones come."""
        self.cap = cap
        self._metrics.http_connection_cap.set(cap)

    @property
    def open(self) -> int:
        return len(self._open)

    def protocol_factory(self, make_handler: Callable[[], asyncio.Protocol],
                         ) -> Callable[[], asyncio.Protocol]:
        return lambda: _Connection(self, make_handler())

    def admit(self, conn: _Connection) -> bool:
        if len(self._open) >= self.cap and len(self._reserved) < self._reserve \
                and _from_loopback(conn.transport):
            conn.reserved = True
            self._reserved.add(conn)
            self._by_transport[conn.transport] = conn
            return True
        while len(self._open) >= self.cap:
            old = conn.since - EVICT_GRACE
            idle = next((c for c in self._open if not c.busy and c.since <= old), None)
            if idle is None:
                self._refused += 1
                self._metrics.http_connections_shed.labels("refused").inc()
                return False
            self._evicted += 1
            self._metrics.http_connections_shed.labels("evicted").inc()
            # aiohttp's handler of it learns at its connection_lost, soon; it is
            # forgotten here so the new connection counts at once.
            self.forget(idle)
            idle.abort()
        self._open[conn] = None
        self._by_transport[conn.transport] = conn
        self._metrics.http_connections.set(len(self._open))
        return True

    def forget(self, conn: _Connection) -> None:
        if conn.reserved:
            self._reserved.discard(conn)
            self._by_transport.pop(conn.transport, None)
        elif conn in self._open:
            del self._open[conn]
            self._by_transport.pop(conn.transport, None)
            self._metrics.http_connections.set(len(self._open))

    @web.middleware
    async def middleware(
        self, request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        """Marks the connection busy while its request is handled: never shed mid-request."""
        conn = self._by_transport.get(request.transport)
        if conn is not None:
            conn.busy += 1
        try:
            return await handler(request)
        finally:
            if conn is not None:
                conn.busy -= 1

    def report(self) -> None:
        """Log what was shed since the last line, at most once per FLOOD_LOG_INTERVAL."""
        if not (self._evicted or self._refused):
            return
        now = self._clock()
        if self._reported_at is not None and now - self._reported_at < FLOOD_LOG_INTERVAL:
            return
        log.warning("http_connections_shed", evicted=self._evicted, refused=self._refused,
                    open=len(self._open), cap=self.cap,
                    why="more connections than [server] max_connections (or a quarter of "
                        "the fd limit); idle ones are closed first")
        self._evicted = self._refused = 0
        self._reported_at = now


def _from_loopback(transport: asyncio.Transport | None) -> bool:
    peer = None if transport is None else transport.get_extra_info("peername")
    if not peer:
        return False
    try:
        return ipaddress.ip_address(peer[0]).is_loopback
    except ValueError:
        return False
