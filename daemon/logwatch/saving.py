"""What the leak watcher saves, and when: one write at a time, and never a file too big to read.

Saves are asked for often and from two loops (the source after a read, the outbox
after a change). `Saver` runs at most one write at a time; requests that come
while it writes are served together by one more write, which snapshots the state
when it starts ("save the latest"). So a burst of requests costs two writes, and
never two copies of the state in memory at once; a slow volume delays saves
instead of piling them up.

A request returns once a write that began after it has finished (True if that
write succeeded), or after its timeout (False; the write still happens, and a
failed write is counted by the state file). The snapshot is taken on the event
loop; encoding and writing run in threads.

`fit` keeps the document within the writer's bound (daemon.state.MAX_WRITE_BYTES,
half the reader's). The bounded sections stay below it (at the defaults about
10 MB: 20 000 queue messages, 20 000 senders and reported pairs, at most
`max_pending` alerts of at most 4 000 characters; plus up to 15 MB of CloudWatch
event ids, `max_seen_events`); should something still exceed
it, the least needed entries are shed first, each counted in
`selfcheckd_state_shed_total{section}` and logged, and pending alerts are never
dropped: they are folded into a digest that keeps their count.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from daemon.delivery.outbox import fold_saved
from daemon.metrics import Metrics
from daemon.state import MAX_WRITE_BYTES, StateFile, StateTooLargeError, encode
from daemon.state_s3 import S3StateStore
from daemon.threads import in_daemon_thread

log = structlog.get_logger("daemon.leakwatch")

# A write (encoding included) may take this long; a hung volume costs this per write.
SAVE_TIMEOUT = 10.0
# Shedding aims this far below the bound, so the next saves do not shed again at once.
SHED_TARGET = 0.75
# Alerts kept as they are when the outbox itself must shrink (the rest become a digest).
SHED_KEEP_ALERTS = 100
SHED_WHY = "the state file's size bound"

Snapshot = Callable[[], dict[str, Any]]


@dataclass(frozen=True)
class Shed:
    """Entries left out of one save to keep it within the bound."""

    section: str
    entries: int
    consequence: str


@dataclass(frozen=True)
class _Section:
    name: str
    path: tuple[str, ...]
    consequence: str


# Least needed first. The outbox is last and is folded, never dropped.
_SHEDDABLE = (
    _Section("cloudwatch.seen", ("cloudwatch", "seen"),
             "after a restart, events in the overlap window may be read again (the detector "
             "still drops repeated leaks it remembers)"),
    _Section("detector.senders", ("detector", "senders"),
             "after a restart, leaks of the oldest queue ids are alerted with sender unknown"),
    _Section("detector.reported", ("detector", "reported"),
             "after a restart, sendmail's retries of the oldest leaks alert again (same id)"),
    _Section("queue.messages", ("queue", "messages"),
             "after a restart, queue health forgets the least recently active messages"),
)


def _entries(document: dict[str, Any], path: tuple[str, ...]) -> list[Any] | None:
    node: Any = document
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node if isinstance(node, list) else None


def _size(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":")))


def fit(document: dict[str, Any], source: str,
        limit: int = MAX_WRITE_BYTES) -> tuple[bytes, list[Shed]]:
    """`document` encoded within `limit` bytes if shedding can make it so, and what was shed.

    The document (a fresh snapshot) is changed in place. When even the folded outbox
    leaves it too big, the bytes returned are over the bound and the state file
    refuses them (a failed save, counted and logged)."""
    try:
        return encode(document, limit), []
    except StateTooLargeError as exc:
        size = exc.size
    sheds: list[Shed] = []
    target = int(limit * SHED_TARGET)
    for section in _SHEDDABLE:
        entries = _entries(document, section.path)
        if not entries:
            continue
        # Drop the oldest (every one of these lists is oldest first), as many as the
        # excess takes at this section's average entry size.
        per_entry = _size(entries) / len(entries)
        drop = min(len(entries), math.ceil((size - target) / per_entry))
        del entries[:drop]
        sheds.append(Shed(section.name, drop, section.consequence))
        try:
            return encode(document, limit), sheds
        except StateTooLargeError as exc:
            size = exc.size
    alerts = document.get("outbox")
    if isinstance(alerts, list) and len(alerts) > SHED_KEEP_ALERTS + 1:
        document["outbox"] = fold_saved(alerts, SHED_KEEP_ALERTS, source, SHED_WHY)
        sheds.append(Shed("outbox", len(alerts) - SHED_KEEP_ALERTS,
                          "pending alerts folded into one digest that keeps their count"))
    try:
        return encode(document, limit), sheds
    except StateTooLargeError:
        return encode(document, None), sheds


class Saver:
    """One write at a time; the requests made meanwhile share the next write."""

    def __init__(
        self,
        state: StateFile | S3StateStore,
        snapshot: Snapshot,
        metrics: Metrics,
        *,
        source: str,
        on_saved: Callable[[dict[str, Any]], None],
        on_failed: Callable[[], None],
        timeout: float = SAVE_TIMEOUT,
    ) -> None:
        self._state = state
        self._snapshot = snapshot
        self._metrics = metrics
        self._source = source
        self._on_saved = on_saved
        self._on_failed = on_failed
        self._timeout = timeout
        self._requested = 0  # requests so far
        self._written = 0  # requests served by the last finished write
        self._ok = True  # how that write went
        self._finished = asyncio.Event()  # replaced after each write, once set
        self._writer: asyncio.Task[None] | None = None
        self._shedding = False  # the first save of an episode logs at warning

    @property
    def writing(self) -> bool:
        return self._writer is not None and not self._writer.done()

    async def save(self, timeout: float | None = SAVE_TIMEOUT) -> bool:
        """Have the state as it is now written; True once a write that began after this
        request succeeded, False if it failed or `timeout` passed first."""
        if self._state.path is None:
            return True
        self._requested += 1
        ticket = self._requested
        if not self.writing:
            self._writer = asyncio.get_running_loop().create_task(
                self._drain(), name="leakwatch-state-save")
        try:
            async with asyncio.timeout(timeout):
                while self._written < ticket:
                    await self._finished.wait()
        except TimeoutError:
            return False  # still queued: it is written when the write in progress ends
        return self._ok

    async def close(self, timeout: float | None) -> None:
        """Wait up to `timeout` s for the writes asked for, then stop (a write still in
        the volume's hands is the state file's to bound)."""
        writer = self._writer
        if writer is None or writer.done():
            return
        done, _ = await asyncio.wait({writer}, timeout=timeout)
        if not done:
            writer.cancel()
            await asyncio.wait({writer})

    async def _drain(self) -> None:
        """Write until every request so far is served."""
        while self._written < self._requested:
            through = self._requested
            try:
                ok = await self._write_latest()
            except Exception:  # a bug: the saves after it must still happen
                log.exception("state_save_crashed")
                self._metrics.internal_errors.labels(kind="state_save").inc()
                ok = False
            if not ok:
                self._on_failed()
            self._written, self._ok = through, ok
            finished, self._finished = self._finished, asyncio.Event()
            finished.set()

    async def _write_latest(self) -> bool:
        document = self._snapshot()
        payload, sheds = await in_daemon_thread(fit, document, self._source,
                                                name="state-encode")
        self._report(sheds, len(payload))
        ok = await self._state.save(payload, self._timeout)
        if ok:
            self._on_saved(document)
        return ok

    def _report(self, sheds: list[Shed], size: int) -> None:
        for shed in sheds:
            self._metrics.state_shed.labels(section=shed.section).inc(shed.entries)
            level = log.debug if self._shedding else log.warning
            level("state_file_shed", section=shed.section, entries=shed.entries,
                  bytes=size, limit=MAX_WRITE_BYTES, consequence=shed.consequence)
        if sheds and not self._shedding:
            self._shedding = True
        elif not sheds and self._shedding:
            self._shedding = False
            log.info("state_file_fits_again", bytes=size, limit=MAX_WRITE_BYTES)
