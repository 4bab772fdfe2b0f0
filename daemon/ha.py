"""Two tasks, one leader: the DynamoDB lease, and the leader's work started and stopped by it.

Every task runs; the one holding the lease does the leader's work (the round
trips, heartbeats, the leak watcher, the drill, the DNS checks: every component
but the HTTP server and the lease's own), the
others stand by, serve /metrics, /healthz and /status, and try for the lease
every `renew_every`. docs/ha.md tells the whole story; the rules, in order:

* **The lease** is one item of a DynamoDB table (hash key `key` = `lease_key`):
  `holder`, `token`, `expires` (epoch seconds) and `ttl`. It is written only
  with condition expressions: taken when it has no holder or its `expires` is
  past (by the taker's clock), renewed only while `holder` and `token` are
  ours, released only while `holder` is ours. `token`, the fencing token, goes
  up by one at every acquisition (`ADD`), and is never reset by a release: a
  release removes the holder and keeps the item. `ttl` (a week past `expires`)
  lets DynamoDB's TTL remove a lease nobody has held for a week; TTL deletes
  days late, so the lease's own expiry is never left to it.
* **Holder ids are unique per process**: the ECS task ARN (from the task
  metadata endpoint) or the host name, then the pid and a random part, so
  two tasks on one host, or a container restarted inside its task, never
  share one. A release can therefore match on the holder alone.
* **Stepping down before the lease can expire.** Every request's send time is
  taken on the monotonic clock. A leader acts only until `lease_duration -
  renew_every` has passed since the send time of its last successful renewal
  (`valid_until`): the other `renew_every` seconds of the lease are the margin
  for clocks that differ between hosts and for stopping the work. A renewal
  that fails is retried every `renew_every / 5` until then. `leading()` is a
  function of the clock, not of the loop, so the leadership loop stops the
  work on time even while a renewal hangs.
* **A standby** tries every `renew_every`, and right after the expiry it last
  saw if that comes first: a leader that died is replaced within
  `lease_duration` (plus one call) of its last renewal.
* **Every call has a deadline**: a renewal's is what is left before
  `valid_until`, an acquisition's is `renew_every`. botocore does not retry
  (one attempt per call); this loop does, on its own schedule.
* **Release at SIGTERM**: the daemon stops the leader's work, then asks this
  loop to release (a conditional write), so a standby takes over at its next
  attempt, within `renew_every`.

`LeaseKeeper` is the `lease` component (the loop that talks to DynamoDB),
`Leadership` the `leadership` component: it starts the leader's work when the
lease is won and stops it when it is lost, one at a time, never both at once.
The work itself (what to start and stop) is the daemon's (`LeaderWork`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import secrets
import socket
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp
import structlog
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
)

from daemon.aws_errors import error_reason as aws_error_reason
from daemon.metrics import Metrics
from daemon.supervisor import Progress
from daemon.threads import in_daemon_thread

if TYPE_CHECKING:
    from types_aiobotocore_dynamodb import DynamoDBClient

    from daemon.config import HaConfig

log = structlog.get_logger("daemon.ha")

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

# A lease nobody renewed for this long after its expiry may be removed by DynamoDB's TTL.
TTL_AFTER_EXPIRY = 7 * 86400
# The ECS task metadata endpoint answers within this, or the host name is used instead.
METADATA_TIMEOUT = 2.0
# A failed renewal is retried this often (a fraction of renew_every) until valid_until.
RENEW_RETRIES_PER_PERIOD = 5
# A standby tries again this long after the expiry it last saw (not exactly at it:
# the condition is `expires < now`), and never sooner than MIN_ATTEMPT_GAP.
EXPIRY_SLACK = 0.05
MIN_ATTEMPT_GAP = 0.05
# The leadership loop wakes at least this often (its progress tick).
LEADERSHIP_TICK = 10.0
# Stopping or starting the leader's work takes at most about this long (each of its
# steps is bounded); the leadership loop's progress deadline allows for it.
TRANSITION_BOUND = 60.0
# The DynamoDB actions selfcheckd calls on the lease table (UpdateItem: take, renew,
# release; GetItem: `config-check --connect`): the task role grants exactly these.
IAM_ACTIONS = ("dynamodb:UpdateItem", "dynamodb:GetItem")
_NAMES = {"#key": "key", "#holder": "holder", "#token": "token", "#expires": "expires",
          "#ttl": "ttl"}


# -- who we are ------------------------------------------------------------------------


def _task_arn(uri: str, timeout: float) -> str | None:
    """TaskARN from the ECS task metadata endpoint (v4), or None."""
    request = urllib.request.Request(f"{uri.rstrip('/')}/task",  # noqa: S310 - ECS's own URI
                                     headers={"Accept": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as answer:  # noqa: S310
        body = json.loads(answer.read(1 << 20))
    arn = body.get("TaskARN") if isinstance(body, dict) else None
    return arn if isinstance(arn, str) and arn.startswith("arn:") else None


def local_holder_id() -> str:
    """A holder id without the task metadata: `<host name>#<pid>-<random>`."""
    return f"{socket.gethostname()}#{os.getpid()}-{secrets.token_hex(4)}"


async def holder_id(environ: Mapping[str, str] | None = None,
                    timeout: float = METADATA_TIMEOUT) -> str:
    """This process's holder id: `<task ARN or host name>#<pid>-<random>`.

    The ECS task ARN names the task an operator finds in the console; the pid
    and the random part make the id unique per process even on one host, or
    for a container that ECS restarted inside its task.
    """
    env = os.environ if environ is None else environ
    suffix = f"{os.getpid()}-{secrets.token_hex(4)}"
    uri = env.get("ECS_CONTAINER_METADATA_URI_V4", "").strip()
    if uri:
        try:
            arn = await asyncio.wait_for(
                in_daemon_thread(_task_arn, uri, timeout, name="ecs-metadata"), timeout + 0.5)
        except (OSError, ValueError, TimeoutError) as exc:
            log.warning("ha_task_arn_unknown", error=f"{type(exc).__name__}: {exc}",
                        consequence="the holder id names the host instead of the task")
        else:
            if arn is not None:
                return f"{arn}#{suffix}"
            log.warning("ha_task_arn_unknown", error="no TaskARN in the metadata",
                        consequence="the holder id names the host instead of the task")
    return f"{socket.gethostname()}#{suffix}"


# -- the table -------------------------------------------------------------------------


@dataclass(frozen=True)
class LeaseRecord:
    """The lease item as last read: who holds it, its fencing token, its expiry (epoch s)."""

    holder: str | None
    token: int
    expires: float

    def as_dict(self, wall: float) -> dict[str, Any]:
        return {"holder": self.holder, "token": self.token, "expires_at": self.expires,
                "expires_in": round(self.expires - wall, 3) if self.holder else None}


class LeaseError(Exception):
    """A call failed (unreachable, throttled, denied, no table): not an answer about the lease.

    `reason` is a bounded label for selfcheckd_lease_errors_total.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class LeaseTakenError(Exception):
    """The lease is held by someone else (`record`) and has not expired."""

    def __init__(self, record: LeaseRecord | None) -> None:
        super().__init__(f"held by {record.holder if record else '?'}")
        self.record = record


class LeaseLostError(Exception):
    """Our renewal was refused: the lease is no longer ours (`record`: who has it)."""

    def __init__(self, record: LeaseRecord | None) -> None:
        super().__init__(f"now held by {record.holder if record else 'nobody'}")
        self.record = record


class LeaseTable(Protocol):
    """The conditional writes the lease is made of (DynamoDB's, or a test's)."""

    def opened(self) -> contextlib.AbstractAsyncContextManager[None]:
        """The client's lifetime: every call below happens inside it."""

    async def acquire(self, holder: str, expires: float, now: float) -> int:
        """Take the lease if it has no holder or expired before `now`; the new token.

        LeaseTakenError if someone else holds it; LeaseError if the call failed.
        """

    async def renew(self, holder: str, token: int, expires: float) -> None:
        """Move the expiry on, only while `holder` and `token` are ours (else LeaseLostError)."""

    async def release(self, holder: str) -> bool:
        """Remove the holder if it is `holder`; True if it was ours."""

    async def read(self) -> LeaseRecord | None:
        """The lease item (a strongly consistent read), None if there is none."""


def create_dynamodb_client(cfg: HaConfig, timeout: float) -> Any:
    """An aiobotocore DynamoDB client: one attempt per call, each within `timeout` s.

    Without `endpoint_url`, botocore's standard settings apply (AWS_ENDPOINT_URL,
    AWS_ENDPOINT_URL_DYNAMODB, the shared config file).
    """
    config = AioConfig(retries={"mode": "standard", "total_max_attempts": 1},
                       connect_timeout=timeout, read_timeout=timeout)
    return get_session().create_client("dynamodb", region_name=cfg.region,
                                       endpoint_url=cfg.endpoint_url, config=config)


def error_reason(exc: BaseException) -> str:
    """A bounded label for selfcheckd_lease_errors_total{reason} (a missing table: no_table)."""
    reason = aws_error_reason(exc)
    return "no_table" if reason == "not_found" else reason


def error_text(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code, message = error.get("Code", "error"), str(error.get("Message", "")).strip()
        return f"{code}: {message}" if message else str(code)
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    return f"{type(exc).__name__}: {exc}"


def _number(value: float) -> dict[str, str]:
    return {"N": f"{value:.3f}" if not float(value).is_integer() else str(int(value))}


def _record(item: Mapping[str, Any] | None) -> LeaseRecord | None:
    if not item:
        return None
    try:
        holder = item["holder"]["S"] if "holder" in item else None
        token = int(item["token"]["N"]) if "token" in item else 0
        expires = float(item["expires"]["N"]) if "expires" in item else 0.0
    except (KeyError, TypeError, ValueError):
        return None  # not an item we wrote: shown as unknown
    return LeaseRecord(holder=holder, token=token, expires=expires)


# Errors of a DynamoDB call that are failures of the call, not answers.
_CALL_ERRORS = (ClientError, BotoCoreError, aiohttp.ClientError, OSError)


class DynamoLeaseTable:
    """The lease as one item of a DynamoDB table, written with condition expressions only."""

    def __init__(self, cfg: HaConfig, timeout: float | None = None) -> None:
        self.table = cfg.lease_table
        self.key = cfg.lease_key
        self._cfg = cfg
        self._timeout = cfg.renew_every if timeout is None else timeout
        self._client: DynamoDBClient | None = None

    @contextlib.asynccontextmanager
    async def opened(self) -> AsyncIterator[None]:
        """The client; LeaseError if it cannot be made (no region, no credentials)."""
        async with contextlib.AsyncExitStack() as stack:
            try:
                client = await stack.enter_async_context(
                    create_dynamodb_client(self._cfg, self._timeout))
            except _CALL_ERRORS as exc:
                raise self._failed(exc) from None
            self._client = client
            try:
                yield
            finally:
                self._client = None

    @property
    def client(self) -> DynamoDBClient:
        if self._client is None:
            raise LeaseError("other", "the DynamoDB client is not open")
        return self._client

    def _failed(self, exc: BaseException) -> LeaseError:
        return LeaseError(error_reason(exc), error_text(exc))

    async def acquire(self, holder: str, expires: float, now: float) -> int:
        try:
            answer = await self.client.update_item(
                TableName=self.table, Key={"key": {"S": self.key}},
                UpdateExpression="SET #holder = :me, #expires = :expires, #ttl = :ttl "
                                 "ADD #token :one",
                ConditionExpression="attribute_not_exists(#holder) OR #expires < :now",
                ExpressionAttributeNames=_names("#holder", "#expires", "#ttl", "#token"),
                ExpressionAttributeValues={
                    ":me": {"S": holder}, ":expires": _number(expires),
                    ":ttl": _number(math.ceil(expires) + TTL_AFTER_EXPIRY),
                    ":one": {"N": "1"}, ":now": _number(now)},
                ReturnValues="ALL_NEW", ReturnValuesOnConditionCheckFailure="ALL_OLD")
        except ClientError as exc:
            if _conditional(exc):
                raise LeaseTakenError(_record(_item(exc))) from None
            raise self._failed(exc) from None
        except _CALL_ERRORS as exc:
            raise self._failed(exc) from None
        record = _record(answer.get("Attributes"))
        if record is None or record.holder != holder:
            raise LeaseError("api_error", "the acquisition answered no lease of ours")
        return record.token

    async def renew(self, holder: str, token: int, expires: float) -> None:
        try:
            await self.client.update_item(
                TableName=self.table, Key={"key": {"S": self.key}},
                UpdateExpression="SET #expires = :expires, #ttl = :ttl",
                ConditionExpression="#holder = :me AND #token = :token",
                ExpressionAttributeNames=_names("#holder", "#expires", "#ttl", "#token"),
                ExpressionAttributeValues={
                    ":me": {"S": holder}, ":token": {"N": str(token)},
                    ":expires": _number(expires),
                    ":ttl": _number(math.ceil(expires) + TTL_AFTER_EXPIRY)},
                ReturnValuesOnConditionCheckFailure="ALL_OLD")
        except ClientError as exc:
            if _conditional(exc):
                raise LeaseLostError(_record(_item(exc))) from None
            raise self._failed(exc) from None
        except _CALL_ERRORS as exc:
            raise self._failed(exc) from None

    async def release(self, holder: str) -> bool:
        try:
            await self.client.update_item(
                TableName=self.table, Key={"key": {"S": self.key}},
                # The item and its token stay: the next holder's token is still higher.
                UpdateExpression="REMOVE #holder",
                ConditionExpression="#holder = :me",
                ExpressionAttributeNames=_names("#holder"),
                ExpressionAttributeValues={":me": {"S": holder}})
        except ClientError as exc:
            if _conditional(exc):
                return False
            raise self._failed(exc) from None
        except _CALL_ERRORS as exc:
            raise self._failed(exc) from None
        return True

    async def read(self) -> LeaseRecord | None:
        try:
            answer = await self.client.get_item(
                TableName=self.table, Key={"key": {"S": self.key}}, ConsistentRead=True)
        except _CALL_ERRORS as exc:
            raise self._failed(exc) from None
        return _record(answer.get("Item"))


def _names(*names: str) -> dict[str, str]:
    return {n: _NAMES[n] for n in names}


def _item(exc: ClientError) -> Mapping[str, Any] | None:
    """The item a failed condition returned (ReturnValuesOnConditionCheckFailure)."""
    item: Any = exc.response.get("Item")
    return item if isinstance(item, Mapping) else None


def _conditional(exc: ClientError) -> bool:
    return exc.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException"


# -- the lease loop --------------------------------------------------------------------


class LeaseKeeper:
    """The `lease` component: takes, renews and releases the lease.

    `leading()` is the fencing token while this process may act as leader, else
    None; `term` counts the leaderships won, so one lost and won again is a new
    term even with the same token. Time: `clock` (monotonic) times every
    deadline, `wall` (epoch) writes the expiry others compare with their clocks.
    """

    name = "lease"

    def __init__(
        self,
        cfg: HaConfig,
        table: LeaseTable,
        holder: str,
        metrics: Metrics,
        *,
        clock: Clock = time.monotonic,
        wall: Clock = time.time,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.cfg = cfg
        self.table = table
        self.holder = holder
        self.metrics = metrics
        self._clock = clock
        self._wall = wall
        self._sleep = sleep
        self.duration = cfg.lease_duration
        self.renew_every = cfg.renew_every
        # A leader may act this long after the send time of its last good renewal.
        self.act_for = cfg.lease_duration - cfg.renew_every
        # A failed renewal is tried again this often: several tries before valid_until.
        self.retry_every = cfg.renew_every / RENEW_RETRIES_PER_PERIOD
        # An attempt ends within renew_every, and one starts at least every renew_every.
        self.progress_deadline = max(30.0, 4 * cfg.renew_every)
        self.token: int | None = None
        self.term = 0
        self.valid_until = -math.inf
        self.renewed_at: float | None = None  # wall clock, for /status
        self.leader: LeaseRecord | None = None  # the holder as last seen (a standby's view)
        self.last_error: str | None = None
        self._failures = 0
        self._changed = asyncio.Event()
        self._poke = asyncio.Event()
        self._release_wanted = False
        self._released = asyncio.Event()
        self.released_ours = False
        metrics.lease_errors.labels(reason="connection")  # the family shows from the start
        for to in ("leader", "standby"):
            metrics.lease_transitions.labels(to=to)

    # -- what others see ------------------------------------------------------------------

    def leading(self) -> int | None:
        """The fencing token while this process may act as the leader; None otherwise."""
        if self.token is not None and self._clock() < self.valid_until:
            return self.token
        return None

    def valid_for(self) -> float:
        """Seconds the leader may still act without another renewal (0 if not leading)."""
        return max(0.0, self.valid_until - self._clock()) if self.token is not None else 0.0

    async def wait_changed(self, timeout: float) -> None:
        """Return when the lease was won or lost, or after `timeout` s."""
        waiter = asyncio.ensure_future(self._changed.wait())
        sleeper = asyncio.ensure_future(self._sleep(max(0.0, timeout)))
        try:
            await asyncio.wait({waiter, sleeper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (waiter, sleeper):
                task.cancel()
            await asyncio.wait({waiter, sleeper})
        self._changed.clear()

    def status(self) -> dict[str, Any]:
        wall = self._wall()
        token = self.leading()
        return {
            "role": "leader" if token is not None else "standby",
            "holder": self.holder,
            "token": token,
            "table": self.cfg.lease_table,
            "key": self.cfg.lease_key,
            "lease_duration": self.duration,
            "renew_every": self.renew_every,
            "leading_for": round(self.valid_for(), 3) if token is not None else None,
            "last_renewed_at": self.renewed_at if token is not None else None,
            "leader": None if self.leader is None else self.leader.as_dict(wall),
            "last_error": self.last_error,
        }

    # -- release (SIGTERM) ----------------------------------------------------------------

    async def release(self, timeout: float) -> bool:
        """Give the lease up now (after the leader's work stopped); True if it was released.

        The loop does it between two attempts, with its open client; the loop then
        takes the lease no more. Bounded by `timeout`.
        """
        self._release_wanted = True
        self._poke.set()
        try:
            await asyncio.wait_for(self._released.wait(), timeout)
        except TimeoutError:
            log.warning("ha_lease_not_released", waited=round(timeout, 3),
                        consequence="the standby takes over when the lease expires")
            return False
        return self.released_ours

    # -- the component --------------------------------------------------------------------

    async def run(self, progress: Progress) -> None:
        try:
            while not self._released.is_set():
                try:
                    async with self.table.opened():
                        await self._loop(progress)
                except LeaseError as exc:  # the client itself: no region, no credentials
                    self._error(exc, progress, "connect")
                    if self._release_wanted:
                        self._released.set()
                    await self._nap(self.renew_every)
            while True:  # released: nothing left to do until the daemon stops us
                progress.progress()
                await self._sleep(LEADERSHIP_TICK)
        finally:
            if self.token is not None and not self._released.is_set():
                # Nobody renews any more: stop acting now, not when the lease runs out.
                self._lose("the lease loop stopped")

    async def _loop(self, progress: Progress) -> None:
        while not self._released.is_set():
            if self._release_wanted:
                await self._release(progress)
                return
            wait = await self._attempt(progress)
            await self._nap(wait)

    async def _attempt(self, progress: Progress) -> float:
        """One acquisition or renewal; seconds until the next."""
        if self.token is not None:
            return await self._renew(progress)
        return await self._acquire(progress)

    async def _acquire(self, progress: Progress) -> float:
        sent = self._clock()
        wall = self._wall()
        try:
            async with asyncio.timeout(self.renew_every):
                token = await self.table.acquire(self.holder, wall + self.duration, wall)
        except LeaseTakenError as taken:
            self.leader = record = taken.record
            self._ok(progress)
            if record is not None and record.holder == self.holder:
                return await self._adopt(record.token, progress)
            if record is not None:
                # Try again at the expiry it shows if that comes first: a leader that
                # died leaves no gap of up to renew_every on top of its lease.
                return max(MIN_ATTEMPT_GAP, min(self.renew_every,
                                                record.expires - self._wall() + EXPIRY_SLACK))
            return self.renew_every
        except (LeaseError, TimeoutError) as exc:
            self._error(exc, progress, "acquire")
            return self.renew_every
        self._grant(token, sent, wall)
        self._ok(progress)
        return max(0.0, sent + self.renew_every - self._clock())

    async def _adopt(self, token: int, progress: Progress) -> float:
        """The lease is in our name: a renewal we gave up on went through after all.

        Nobody can have taken it since (the token is the same), so it is renewed
        and led again, as a new term: the work stopped for the old one is started
        afresh.
        """
        sent = self._clock()
        wall = self._wall()
        try:
            async with asyncio.timeout(self.renew_every):
                await self.table.renew(self.holder, token, wall + self.duration)
        except LeaseLostError as lost:
            self.leader = lost.record
            return self.renew_every
        except (LeaseError, TimeoutError) as exc:
            self._error(exc, progress, "renew")
            return self.renew_every
        self._grant(token, sent, wall)
        return max(0.0, sent + self.renew_every - self._clock())

    async def _renew(self, progress: Progress) -> float:
        assert self.token is not None
        sent = self._clock()
        if sent >= self.valid_until:
            self._lose(f"no renewal for {self.act_for:g}s (lease_duration - renew_every)")
            return 0.0
        wall = self._wall()
        try:
            async with asyncio.timeout(min(self.renew_every, self.valid_until - sent)):
                await self.table.renew(self.holder, self.token, wall + self.duration)
        except LeaseLostError as lost:
            self.leader = lost.record
            self._ok(progress)
            self._lose(f"the lease was taken by {lost.record.holder if lost.record else '?'}")
            return self.renew_every
        except (LeaseError, TimeoutError) as exc:
            self._error(exc, progress, "renew")
            return min(self.retry_every, self.valid_for())
        self.valid_until = sent + self.act_for
        self.renewed_at = wall
        self.leader = LeaseRecord(self.holder, self.token, wall + self.duration)
        self._ok(progress)
        return max(0.0, sent + self.renew_every - self._clock())

    def _grant(self, token: int, sent: float, wall: float) -> None:
        self.token = token
        self.term += 1
        self.valid_until = sent + self.act_for
        self.renewed_at = wall
        self.leader = LeaseRecord(self.holder, token, wall + self.duration)
        log.info("ha_lease_acquired", holder=self.holder, token=token, term=self.term,
                 act_for=self.act_for)
        self._changed.set()

    def lose(self, why: str) -> None:
        """Stop leading now (something outside the lease proved a newer leader exists)."""
        if self.token is not None:
            self._lose(why)

    def _lose(self, why: str) -> None:
        token, self.token = self.token, None
        self.valid_until = -math.inf
        self.renewed_at = None
        log.warning("ha_lease_lost", holder=self.holder, token=token, why=why)
        self._changed.set()

    def _ok(self, progress: Progress) -> None:
        if self._failures:
            log.info("ha_lease_calls_recovered", failures=self._failures)
        self._failures = 0
        self.last_error = None
        progress.progress()
        progress.up()

    def _error(self, exc: BaseException, progress: Progress, call: str) -> None:
        reason = exc.reason if isinstance(exc, LeaseError) else error_reason(exc)
        text = str(exc) if isinstance(exc, LeaseError) else error_text(exc)
        self._failures += 1
        self.metrics.lease_errors.labels(reason=reason).inc()
        self.last_error = f"{call}: {text}"
        progress.retrying(f"DynamoDB {self.cfg.lease_table}: {call}: {text}", f"lease_{reason}")
        if self._failures == 1:
            log.warning("ha_lease_call_failed", call=call, reason=reason, error=text,
                        leading=self.leading() is not None,
                        valid_for=round(self.valid_for(), 3))
        else:
            log.debug("ha_lease_call_failed", call=call, reason=reason, error=text,
                      failures=self._failures)

    async def _release(self, progress: Progress) -> None:
        # By holder alone (ids are unique per process): also frees a lease whose
        # acquisition answer we never saw.
        held = self.token
        try:
            async with asyncio.timeout(self.renew_every):
                self.released_ours = await self.table.release(self.holder)
        except (LeaseError, TimeoutError) as exc:
            self._error(exc, progress, "release")
        else:
            if self.released_ours or held is not None:
                log.info("ha_lease_released" if self.released_ours else "ha_lease_not_ours",
                         holder=self.holder, token=held)
        if held is not None:
            self._lose("released" if self.released_ours else "released (not ours any more)")
        self._released.set()

    async def _nap(self, seconds: float) -> None:
        """Sleep until the next attempt, or until a release is asked for."""
        if self.token is not None:
            seconds = min(seconds, self.valid_for())  # wake to step down on time
        poked = asyncio.ensure_future(self._poke.wait())
        sleeper = asyncio.ensure_future(self._sleep(max(0.0, seconds)))
        try:
            await asyncio.wait({poked, sleeper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (poked, sleeper):
                task.cancel()
            await asyncio.wait({poked, sleeper})
        self._poke.clear()


# -- the leader's work -------------------------------------------------------------------


class LeaderWork(Protocol):
    """What the leader does: started when the lease is won, stopped when it is lost."""

    async def start_leading(self, token: int) -> None:
        """Start the leader's work under fencing token `token`."""

    async def stop_leading(self, why: str, *, holding: bool) -> None:
        """Stop it at once; `holding`: the lease is still ours (a voluntary step-down)."""


class Leadership:
    """The `leadership` component: the leader's work runs exactly while the lease is ours.

    One transition at a time: the work of a lost term is stopped before a new
    term's is started. A start cut short by the loss of the lease is cancelled,
    then stopped like a finished one.
    """

    name = "leadership"
    progress_deadline = LEADERSHIP_TICK + TRANSITION_BOUND

    def __init__(self, keeper: LeaseKeeper, work: LeaderWork, metrics: Metrics) -> None:
        self.keeper = keeper
        self.work = work
        self.metrics = metrics
        self.active_term: int | None = None
        self.since: float | None = None  # wall clock of the last transition
        metrics.leader.set(0)

    @property
    def leading(self) -> bool:
        return self.active_term is not None

    def _wanted(self) -> tuple[int, int] | None:
        token = self.keeper.leading()
        return None if token is None else (self.keeper.term, token)

    async def run(self, progress: Progress) -> None:
        while True:
            progress.progress()
            wanted = self._wanted()
            if self.active_term is not None and (wanted is None or wanted[0] != self.active_term):
                await self.step_down("the lease was lost" if wanted is None
                                     else "the lease was won again")
                progress.progress()
                continue
            if wanted is not None and self.active_term is None:
                await self._start(*wanted)
                continue
            timeout = LEADERSHIP_TICK
            if self.active_term is not None:
                timeout = min(timeout, self.keeper.valid_for())
            await self.keeper.wait_changed(timeout)

    async def _start(self, term: int, token: int) -> None:
        self.active_term = term  # first: a start cut short is still stopped
        self.since = time.time()
        self.metrics.leader.set(1)
        self.metrics.lease_transitions.labels(to="leader").inc()
        log.info("ha_leading", token=token, term=term)
        starting = asyncio.ensure_future(self.work.start_leading(token))
        try:
            while not starting.done():
                if self._wanted() != (term, token):
                    starting.cancel()
                    await asyncio.wait({starting})
                    log.warning("ha_start_interrupted", token=token,
                                why="the lease was lost while the leader's work started")
                    return
                changed = asyncio.ensure_future(
                    self.keeper.wait_changed(self.keeper.valid_for()))
                try:
                    await asyncio.wait({starting, changed}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    changed.cancel()
                    await asyncio.wait({changed})
        except asyncio.CancelledError:
            starting.cancel()
            await asyncio.wait({starting})
            raise
        if (error := starting.exception()) is not None:
            # A bug: what did start is stopped, then this component crashes and is
            # restarted with backoff (which starts the work again).
            await self.step_down(f"the leader's work did not start: {type(error).__name__}")
            raise error

    async def step_down(self, why: str, *, holding: bool = False) -> None:
        """Stop the leader's work (if any) and count the transition."""
        if self.active_term is None:
            return
        log.warning("ha_stepping_down", why=why, holding=holding)
        try:
            await self.work.stop_leading(why, holding=holding)
        finally:
            self.active_term = None
            self.since = time.time()
            self.metrics.leader.set(0)
            self.metrics.lease_transitions.labels(to="standby").inc()
            log.info("ha_standby", why=why)
