"""CloudWatch Logs source: FilterLogEvents polling that misses nothing and repeats nothing.

Each poll asks for [cursor - overlap, now], where the cursor is the newest event
timestamp seen. The overlap catches events ingested late with older
timestamps (PutLogEvents accepts them up to 14 days old); event ids seen in the
overlap are remembered (bounded, evicted once they fall out of the window) so
nothing is emitted twice. Paging follows `nextToken` until it is absent, even
through empty pages. A failed poll raises `SourceError`; the watcher's loop
backs off and the next poll retries the same window.

A batch is unsettled from the read that returned it until the watcher calls
`settle()` (every leak in it is in the alert outbox): meanwhile `state()`, what
the state file saves, still reads that batch again (the cursor where the read
began, the batch's event ids left out of the seen ones). With a filter pattern
the watcher looks senders up between the two, for seconds; a kill then re-reads
the batch rather than losing its leaks.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING, Any

import aiohttp
import structlog
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
)

from daemon.aws_errors import error_reason
from daemon.logwatch.config import CloudWatchSource
from daemon.logwatch.parser import QueueAdd, parse_line
from daemon.logwatch.sources import SourceError

if TYPE_CHECKING:
    from types_aiobotocore_logs import CloudWatchLogsClient
    from types_aiobotocore_logs.type_defs import FilterLogEventsRequestTypeDef

log = structlog.get_logger()

ErrorSink = Callable[[str], None]
# Guard against a server that never stops handing out tokens.
MAX_PAGES_PER_QUERY = 10_000
# botocore's own retries (standard mode) absorb short throttling bursts; its
# backoff between attempts is at most 20 s, so a call's deadline allows for it.
BOTO_ATTEMPTS = 3
BOTO_MAX_RETRY_DELAY = 20.0


def call_deadline(request_timeout: float) -> float:
    """Deadline of one API call including botocore's retries and their backoff."""
    return request_timeout * BOTO_ATTEMPTS + BOTO_MAX_RETRY_DELAY * (BOTO_ATTEMPTS - 1)


# What a poll may raise that is worth a retry (everything else is a bug).
RETRYABLE = (BotoCoreError, ClientError, aiohttp.ClientError, OSError, TimeoutError)


def create_logs_client(cfg: CloudWatchSource) -> Any:
    """An aiobotocore logs client context manager (botocore's standard retry mode)."""
    config = AioConfig(
        retries={"mode": "standard", "max_attempts": BOTO_ATTEMPTS},
        connect_timeout=min(cfg.request_timeout, 10.0),
        read_timeout=cfg.request_timeout,
        inject_host_prefix=cfg.endpoint_url is None,
    )
    return get_session().create_client(
        "logs", region_name=cfg.region, endpoint_url=cfg.endpoint_url, config=config
    )


class CloudWatchPoller:
    """Polls the configured log groups; yields one batch of new lines per poll."""

    def __init__(
        self,
        cfg: CloudWatchSource,
        on_error: ErrorSink = lambda _reason: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.on_error = on_error
        self.clock = clock
        self.cursor_ms: int | None = None  # newest event timestamp seen
        self.seen: OrderedDict[str, int] = OrderedDict()  # eventId -> timestamp (ms)
        self.newest_event_ms: int | None = None
        # The log stream of each line the last take_new() (read()) returned, in order.
        self.last_streams: list[str] = []
        self.client: CloudWatchLogsClient | None = None
        # (cursor that reads the unsettled batch again, its event ids); None: settled.
        self._unsettled: tuple[int, frozenset[str]] | None = None

    # -- querying -------------------------------------------------------------------------
    async def _pages(
        self, client: CloudWatchLogsClient, group: str, start_ms: int, end_ms: int,
        filter_pattern: str,
    ) -> AsyncIterator[list[dict[str, Any]]]:
        kwargs: FilterLogEventsRequestTypeDef = {
            "logGroupName": group, "startTime": start_ms, "endTime": end_ms,
            "interleaved": True,
        }
        if self.cfg.stream_prefix:
            kwargs["logStreamNamePrefix"] = self.cfg.stream_prefix
        if filter_pattern:
            kwargs["filterPattern"] = filter_pattern
        if self.cfg.page_size:
            kwargs["limit"] = self.cfg.page_size
        for _ in range(MAX_PAGES_PER_QUERY):
            async with asyncio.timeout(call_deadline(self.cfg.request_timeout)):
                resp = await client.filter_log_events(**kwargs)
            yield [dict(e) for e in resp.get("events", [])]
            token = resp.get("nextToken")
            if not token:
                return
            kwargs["nextToken"] = token
        log.warning("leakwatch_paging_stopped", log_group=group, pages=MAX_PAGES_PER_QUERY)

    async def query(
        self, client: CloudWatchLogsClient, start_ms: int, end_ms: int, filter_pattern: str
    ) -> list[dict[str, Any]]:
        """All events of all groups in [start, end], sorted by timestamp."""
        events: list[dict[str, Any]] = []
        for group in self.cfg.log_groups:
            async for page in self._pages(client, group, start_ms, end_ms, filter_pattern):
                events.extend(page)
        events.sort(key=lambda e: (e.get("timestamp", 0), e.get("eventId", "")))
        return events

    def window(self) -> tuple[int, int]:
        now_ms = int(self.clock() * 1000)
        if self.cursor_ms is None:
            start = now_ms - int(self.cfg.lookback * 1000)
        else:
            start = self.cursor_ms - int(self.cfg.overlap * 1000)
        return start, now_ms

    def take_new(self, events: list[dict[str, Any]], start_ms: int) -> list[str]:
        """Drop events already emitted, remember the rest, advance the cursor.

        `last_streams` then names each returned line's log stream. The lines are
        unsettled until `settle()`.
        """
        lines: list[str] = []
        streams: list[str] = []
        fresh: set[str] = set()
        for event in events:
            event_id = str(event.get("eventId", ""))
            ts = int(event.get("timestamp", 0))
            if event_id in self.seen:
                continue
            self.seen[event_id] = ts
            fresh.add(event_id)
            lines.append(str(event.get("message", "")).rstrip("\r\n"))
            streams.append(str(event.get("logStreamName", "")))
            if self.cursor_ms is None or ts > self.cursor_ms:
                self.cursor_ms = ts
            if self.newest_event_ms is None or ts > self.newest_event_ms:
                self.newest_event_ms = ts
        self._evict(start_ms)
        self.last_streams = streams
        if fresh:
            # A cursor whose window starts where this read's did: [start, now] again.
            resume = start_ms + int(self.cfg.overlap * 1000)
            if self._unsettled is not None:  # never settled: keep reading that one too
                resume = min(resume, self._unsettled[0])
                fresh |= self._unsettled[1]
            self._unsettled = (max(0, resume), frozenset(fresh))
        return lines

    def settle(self) -> None:
        """The lines read so far are handled for good: the state may move past them."""
        self._unsettled = None

    def _evict(self, start_ms: int) -> None:
        # Ids older than the next window's start can never be returned again.
        horizon = min(start_ms, (self.cursor_ms or start_ms) - int(self.cfg.overlap * 1000))
        stale = [k for k, ts in self.seen.items() if ts < horizon]
        for k in stale:
            del self.seen[k]
        while len(self.seen) > self.cfg.max_seen_events:
            self.seen.popitem(last=False)

    async def poll_once(self, client: CloudWatchLogsClient) -> list[str]:
        start, end = self.window()
        events = await self.query(client, start, end, self.cfg.filter_pattern)
        return self.take_new(events, start)

    async def query_queue_id(
        self, client: CloudWatchLogsClient, queue_id: str, start_ms: int, end_ms: int
    ) -> list[dict[str, Any]]:
        """Every event in [start, end] that mentions `queue_id` (a server-side filter on it).

        The caller keeps the lines whose queue id field is `queue_id`: the filter also
        matches a line that merely names it (a DSN's parent, a remote's "queued as").
        """
        return await self.query(client, start_ms, end_ms, f'"{queue_id}"')

    async def lookup_sender(self, queue_id: str, before_ms: int) -> str | None:
        """Find the from= line of a queue id (needed when a filter pattern hides it)."""
        client = self.client
        if client is None or self.cfg.sender_lookup_window <= 0:
            return None
        start = before_ms - int(self.cfg.sender_lookup_window * 1000)
        end = before_ms + int(self.cfg.overlap * 1000)
        try:
            events = await self.query(client, start, end, f'"{queue_id}: from="')
        except RETRYABLE as exc:
            self.on_error(error_reason(exc))
            log.warning("leakwatch_sender_lookup_failed", queue_id=queue_id,
                        reason=error_reason(exc))
            return None
        for event in events:
            record = parse_line(str(event.get("message", "")).rstrip("\r\n"))
            if isinstance(record, QueueAdd) and record.queue_id == queue_id:
                return record.sender
        return None

    # -- as a LineSource -----------------------------------------------------------------
    kind = "cloudwatch"

    @property
    def poll_interval(self) -> float:
        return self.cfg.poll_interval

    @property
    def max_backoff(self) -> float:
        return self.cfg.max_backoff

    more_pending = False  # each read takes the whole window

    @asynccontextmanager
    async def opened(self) -> AsyncIterator[None]:
        """An aiobotocore client for the reads (and the sender lookups) inside."""
        stack = AsyncExitStack()
        try:
            self.client = await stack.enter_async_context(create_logs_client(self.cfg))
        except RETRYABLE as exc:  # creating the client failed (region, endpoint)
            await stack.aclose()
            raise SourceError(error_reason(exc), _describe(exc)) from None
        try:
            yield
        finally:
            self.client = None
            await stack.aclose()

    async def read(self) -> list[str]:
        """One poll of the window [cursor - overlap, now]."""
        if self.client is None:
            raise SourceError("other", "CloudWatch client not open")
        try:
            return await self.poll_once(self.client)
        except RETRYABLE as exc:
            raise SourceError(error_reason(exc), _describe(exc)) from None

    def state(self) -> dict[str, Any]:
        """The cursor and seen ids to save: an unsettled batch is read again from them."""
        if self._unsettled is None:
            return {"cursor_ms": self.cursor_ms, "seen": list(self.seen.items())}
        resume, fresh = self._unsettled
        return {"cursor_ms": resume,
                "seen": [(k, ts) for k, ts in self.seen.items() if k not in fresh]}

    def restore(self, cursor_ms: int | None, seen: list[tuple[str, int]]) -> None:
        self._unsettled = None
        self.cursor_ms = cursor_ms
        self.seen.clear()
        for event_id, ts in seen:
            self.seen[event_id] = ts


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        return f"{err.get('Code', 'ClientError')}: {err.get('Message', '')}"
    return f"{type(exc).__name__}: {exc}"
