"""The leak watcher's state file: one JSON document, written atomically, quarantined when unusable.

It holds everything that must survive a restart: the CloudWatch cursor and the
event ids seen in its overlap window, the followed file's position (device,
inode, offset, fingerprint), the detector's memory (senders by queue id,
(queue id, recipient) pairs already alerted), the alert outbox and the queue
tracker's messages (saved with the position, so a restart neither counts a line
twice nor forgets a deferred message).

A file that cannot be used (not JSON, another shape, an unknown version, a
section of the wrong type) is renamed to `<name>.corrupt-<UTC time>` with one
warning naming both paths; the watcher then starts afresh (CloudWatch from
`lookback`), never crashes on it. Writes go to a temporary file that is
fsynced and renamed over the old one, so a task killed mid-write leaves the
previous state intact; the temporary file's name is unique, so two writers (two
tasks overlapping on a shared volume) never mix their bytes: the last rename
wins. Every read and write of the volume runs in a worker process under a
deadline (daemon/state_io.py): one hung on a stalled NFS/EFS mount is abandoned
and costs the caller its timeout, never the process's exit; while it has not
ended, the next save waits a moment for it and then fails rather than start a
second writer beside it; and a file the volume would not hand over at start is
never written over.

The writer's bound (`MAX_WRITE_BYTES`) is half the reader's (`MAX_STATE_BYTES`): a
document that encodes bigger is not written at all (a failed save), so no file we
write is one we would refuse to read. Callers that can shed encode the document
themselves (daemon/logwatch/saving.py) and hand over the bytes.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import structlog
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from daemon.metrics import Metrics
from daemon.state_io import VolumeIO, VolumeStuckError, VolumeTimeoutError
from daemon.threads import in_daemon_thread

log = structlog.get_logger("daemon.state")

VERSION = 2  # 1: CloudWatch cursor and detector only (still read)
# Far more than the bounded sections ever take (20 000 queue messages: about 7.4 MB); a
# bigger file is not ours, and reading it whole would cost that much memory.
MAX_STATE_BYTES = 64 << 20
# The writer's bound: half the reader's, so a file we write is always one we read back.
MAX_WRITE_BYTES = MAX_STATE_BYTES // 2
# Our own clock wrote the cursor and the alerts' creation times: later than this past the
# clock now, the clock was wrong then (a cursor in the future would read nothing for ever,
# an alert from the future would never expire), and `repair` mends them.
FUTURE_SLACK = 86_400.0
# A save's temporary file older than this was left by a killed process, not in progress.
STALE_TEMPORARY = 600.0
# Reading the file at start, or moving it aside, may take this long (a hung volume).
READ_TIMEOUT = 10.0
# The detector's memory is bounded in the file too, so a write stays small.
MAX_PERSISTED_ENTRIES = 20_000


class _Section(BaseModel):
    # NaN and Infinity are not JSON, but Python's json reads them: an alert created at
    # NaN would never expire.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def _no_bool(value: Any) -> Any:
    # Documents are validated leniently (so JSON lists can become tuples), which reads
    # `true` as 1: never a cursor.
    if isinstance(value, bool):
        raise ValueError("must be a number, not true or false")
    return value


# Milliseconds since the epoch.
EpochMs = Annotated[int, BeforeValidator(_no_bool), Field(ge=0)]


class CloudWatchState(_Section):
    cursor_ms: EpochMs | None = None
    seen: list[tuple[str, EpochMs]] = Field(default_factory=list)


class FileState(_Section):
    path: str
    device: int
    inode: int
    offset: int = Field(ge=0)
    fingerprint: str


class DetectorState(_Section):
    senders: list[tuple[str, str]] = Field(default_factory=list)
    reported: list[str] = Field(default_factory=list)


class AlertState(_Section):
    id: str
    key: str
    summary: str
    severity: Literal["critical", "warning", "info"]
    created_at: float
    attempts: int = Field(default=0, ge=0)
    last_error: str | None = None
    admitted: bool = False
    folded: list[str] = Field(default_factory=list)
    # A digest: how many alerts it stands for, and the summaries it lists while open.
    count: int = Field(default=1, ge=1)
    examples: list[str] = Field(default_factory=list)


class QueueRecipientState(_Section):
    address: str
    result: Literal["sent", "deferred", "queued", "bounced", "other"]
    stat: str
    attempts: int = Field(ge=0)
    seen: float


class QueueMessageState(_Section):
    queue_id: str = Field(min_length=1)
    sender: str | None = None
    first_seen: float
    last_seen: float
    hosts: list[str] = Field(default_factory=list)
    log_streams: list[str] = Field(default_factory=list)
    # Absent in files written before tasks were kept (the streams, else the hosts, then).
    tasks: list[str] = Field(default_factory=list)
    last_task: str | None = None
    recipients: list[QueueRecipientState] = Field(default_factory=list)


class QueueTaskState(_Section):
    task: str = Field(min_length=1)
    last_line: float


class QueueState(_Section):
    """The queue tracker's messages (daemon/logwatch/queue.py), least recently active first,
    and the tasks' latest lines, least recently heard first."""

    messages: list[QueueMessageState] = Field(default_factory=list)
    tasks: list[QueueTaskState] = Field(default_factory=list)


class FenceState(_Section):
    """Who wrote the document ([ha]): the lease holder and its fencing token."""

    holder: str = Field(min_length=1)
    token: int | None = Field(default=None, ge=0)


class LeakwatchState(_Section):
    """The whole document; every section is optional."""

    model_config = ConfigDict(extra="forbid", strict=True)

    version: Literal[1, 2]
    cloudwatch: CloudWatchState | None = None
    file: FileState | None = None
    detector: DetectorState | None = None
    outbox: list[AlertState] = Field(default_factory=list)
    queue: QueueState | None = None  # absent in files written before queue health
    fence: FenceState | None = None  # absent without [ha] and in files from before it


def parse_state(data: Any) -> LeakwatchState:
    """Validate a decoded document; ValueError names the first problem."""
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    try:
        # JSON has no tuples: lists of pairs validate as tuples in lax mode only.
        return LeakwatchState.model_validate(data, strict=False)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "document"
        raise ValueError(f"{where}: {first['msg']}") from None


def repair(state: LeakwatchState, now: float) -> list[str]:
    """Mend in place what no clock of ours can have written; what was mended.

    Only the parts are dropped, never the file: a clock put right after running ahead
    must not cost the pending alerts (at-least-once) nor the detector's memory.
    """
    latest = now + FUTURE_SLACK
    mended = []
    if state.cloudwatch is not None and (state.cloudwatch.cursor_ms or 0) > latest * 1000:
        # It would read nothing until that time comes: start from `lookback` instead.
        state.cloudwatch = None
        mended.append("cloudwatch.cursor_ms was in the future: reading from lookback")
    ahead = [a for a in state.outbox if a.created_at > latest]
    for alert in ahead:
        alert.created_at = now  # else it would never reach max_age
    if ahead:
        mended.append(f"{len(ahead)} pending alert(s) created in the future: aged from now")
    return mended


class StateUnreadable(Exception):  # noqa: N818 - a condition, as FileNotFoundError
    """The store did not hand the state over in time (a state volume within the read's
    deadline, S3): it is not known, so not written over."""


def trim(entries: list[Any]) -> list[Any]:
    return entries[-MAX_PERSISTED_ENTRIES:]


class StateTooLargeError(ValueError):
    """The document encodes to more than the writer's bound."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"{size} bytes, more than the {limit} a state file may be written with")
        self.size = size


def encode(document: dict[str, Any], limit: int | None = MAX_WRITE_BYTES) -> bytes:
    """The file's bytes for `document` (the version added); StateTooLargeError past `limit`."""
    payload = json.dumps({"version": VERSION, **document}, separators=(",", ":")).encode()
    if limit is not None and len(payload) > limit:
        raise StateTooLargeError(len(payload), limit)
    return payload


class StateFile:
    """Load (with quarantine) and save (atomic, serialised) one state file.

    All of its I/O runs in worker processes (`VolumeIO`), each under a deadline.
    """

    def __init__(
        self, path: Path | None, metrics: Metrics, wall: Callable[[], float] = time.time,
        io: VolumeIO | None = None,
    ) -> None:
        self.path = path
        self.metrics = metrics
        self._wall = wall
        self.io = io if io is not None else VolumeIO()
        self._lock = asyncio.Lock()
        self.last_error: str | None = None
        self.last_saved_at: float | None = None
        # A load found the volume not answering: what the file holds is unknown, so a
        # save (a fresh state) must not replace it until a load succeeds.
        self.unread = False

    async def load(self, timeout: float = READ_TIMEOUT) -> LeakwatchState | None:
        """The saved state, or None when there is none or it was quarantined.

        StateUnreadable when the volume did not answer within `timeout` s.
        """
        if self.path is None:
            return None
        try:
            answer, data = await self.io.load(
                self.path, MAX_STATE_BYTES, self._wall() - STALE_TEMPORARY, timeout)
        except (VolumeTimeoutError, VolumeStuckError) as exc:
            self.unread = True
            raise StateUnreadable(str(exc)) from None
        except OSError as exc:  # the worker could not run or answer
            self.unread = True
            raise StateUnreadable(exc.strerror or str(exc)) from None
        self.unread = False
        self._report_temporaries(answer)
        if not answer.get("ok"):
            error = str(answer.get("error"))
            if answer.get("kind") == "absent":
                log.info("state_file_absent", path=str(self.path))
            elif answer.get("kind") == "unusable":
                await self.quarantine(error)
            else:
                await self.quarantine(f"cannot read: {error}")
            return None
        try:
            state = parse_state(json.loads(data))
        except ValueError as exc:  # bad JSON, bad UTF-8 and a wrong shape are all ValueErrors
            await self.quarantine(f"{type(exc).__name__}: {exc}"[:300])
            return None
        except RecursionError:
            await self.quarantine("nested too deeply")
            return None
        if mended := repair(state, self._wall()):
            log.warning("state_file_repaired", path=str(self.path), mended="; ".join(mended))
        return state

    def _report_temporaries(self, answer: dict[str, Any]) -> None:
        """Temporary files of saves a kill cut short are removed at each load."""
        if error := answer.get("temporaries_error"):
            log.warning("state_file_temporaries_not_removed", path=str(self.path), error=error)
        elif removed := answer.get("removed"):
            log.info("state_file_temporaries_removed", path=str(self.path), count=removed)

    async def quarantine(self, why: str, timeout: float = READ_TIMEOUT) -> Path | None:
        """Move the unusable file aside, with one warning naming both paths."""
        if self.path is None:
            return None
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self._wall()))
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        try:
            await self.io.rename(self.path, target, timeout)
        except OSError as exc:
            log.warning("state_file_unusable", path=str(self.path), reason=why,
                        moved_to=None, move_error=exc.strerror or str(exc),
                        consequence="starting afresh; the file is left where it is")
            return None
        log.warning("state_file_quarantined", path=str(self.path), reason=why,
                    moved_to=str(target), consequence="starting afresh")
        return target

    async def save(self, document: dict[str, Any] | bytes,
                   timeout: float | None = None) -> bool:
        """Write `document` (plus the version; or bytes from `encode`) atomically within
        `timeout` s; False if not.

        A failure is counted and logged once per episode.
        """
        if self.path is None:
            return True
        if self.unread:
            return self._failed("not written: the file could not be read at start (the "
                                "volume did not answer), and a save would replace it")
        if isinstance(document, bytes) and len(document) > MAX_WRITE_BYTES:
            return self._failed(str(StateTooLargeError(len(document), MAX_WRITE_BYTES)))
        abandoned = self.io.abandoned_total
        try:
            async with asyncio.timeout(timeout), self._lock:
                # A dict is a snapshot of fresh containers (taken on the event loop), so
                # it is encoded in a thread: a large queue costs the loop little.
                payload = document if isinstance(document, bytes) else (
                    await in_daemon_thread(encode, document, name="state-encode"))
                await self.io.write(self.path, payload, None)  # our deadline covers it
        except TimeoutError:
            return self._failed(f"not written within {timeout:g}s; "
                                + self._abandoned(self.io.abandoned_total > abandoned))
        except VolumeStuckError as exc:
            return self._failed(str(exc))
        except StateTooLargeError as exc:
            return self._failed(str(exc))
        except OSError as exc:
            return self._failed(exc.strerror or str(exc))
        if self.last_error is not None:
            log.info("state_file_write_recovered", path=str(self.path))
        self.last_error = None
        self.last_saved_at = self._wall()
        self.metrics.state_saves.labels(result="ok").inc()
        return True

    def _abandoned(self, now: bool) -> str:
        """What became of the write that missed its deadline; `now`: its worker was
        abandoned just now (else an earlier one had not ended yet)."""
        stuck = self.io.stuck()
        if stuck is None:
            return "the write was abandoned"
        if not now:
            return (f"an earlier write (worker pid {stuck[0]}, abandoned {stuck[1]:.0f}s ago) "
                    "has not ended: the volume is not answering")
        log.warning("state_file_writer_abandoned", path=str(self.path), pid=stuck[0],
                    consequence="killed and left behind; until it has ended (a frozen "
                                "volume holds it), every save fails at once")
        return f"the write was abandoned (worker pid {stuck[0]} killed)"

    def _failed(self, error: str) -> bool:
        self.metrics.state_saves.labels(result="failed").inc()
        if self.last_error is None:  # once per episode; the counter says the rest
            log.error("state_file_write_failed", path=str(self.path), error=error)
        self.last_error = error
        return False
