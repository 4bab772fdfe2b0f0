"""The leak watcher's state as one S3 object: read whole at takeover, written only conditionally.

`[leakwatch] state_file = "s3://bucket/key"`. The same document as the state file
(daemon/state.py), with the writer's fence (`{"holder", "token"}`: the lease's holder
id and fencing token) inside and as object metadata. The rules:

* **Read whole at takeover** (`fetch`): GetObject, remembering its ETag (none when
  the object does not exist yet). An object that cannot be used (not JSON, another
  shape, too big) is not moved anywhere: the bucket is versioned, so it stays as a
  noncurrent version, named in one warning, and the watcher starts afresh.
* **Claimed at once**: the document read is written straight back under our fence,
  with `If-Match` its ETag (`If-None-Match: *` when there was none). From then on a
  write by anyone holding an older ETag is refused. A claim refused (412, or 409
  when writes collide) means someone wrote between our read and our claim: read
  again, claim again, a few times.
* **Every save** is a PutObject with `If-Match` the ETag of our own last write.
  Refused (412): the object was written by someone else since (a leader that took
  over while this one was cut off), or by us, if an earlier save's answer was lost.
  HeadObject tells which (the writer's fence is in the metadata): our own, and the
  save is repeated on the new ETag; another's, and this store is **fenced**: every
  later save is refused without a request, counted as
  `selfcheckd_state_saves_total{result="fenced"}`, and `on_fenced` is told (the
  daemon steps down: a newer leader exists).
* **A store that did not answer** at takeover raises `StateUnreadable`: the caller
  retries and reads no line meanwhile (saving over a state it has not read would
  lose it).

Every call has a deadline (the caller's), and botocore makes one attempt per call
here: the callers retry on their own schedule. Without `[ha] endpoint_url`, the
client follows the SDK's settings (`AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import aiohttp
import structlog
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from daemon.logwatch.config import S3Location
from daemon.metrics import Metrics
from daemon.state import (
    MAX_STATE_BYTES,
    MAX_WRITE_BYTES,
    LeakwatchState,
    StateTooLargeError,
    StateUnreadable,
    encode,
    parse_state,
    repair,
)

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

log = structlog.get_logger("daemon.state")

# The S3 actions this store calls (GetObject, HeadObject: s3:GetObject; PutObject:
# s3:PutObject); deploy/ecs/iam-task-role-policy.json grants exactly these (and
# s3:ListBucket on the bucket, so a missing object answers 404, not 403).
IAM_ACTIONS = ("s3:GetObject", "s3:PutObject")
# One call's connect and read timeouts (the callers' deadlines are usually shorter).
CALL_TIMEOUT = 30.0
# Reads and claims at takeover: tries before giving up (someone keeps writing).
CLAIM_ATTEMPTS = 3
# Object metadata carrying the writer's fence (x-amz-meta-*).
META_HOLDER = "selfcheckd-holder"
META_TOKEN = "selfcheckd-token"  # noqa: S105 - a metadata key, no secret
_CALL_ERRORS = (BotoCoreError, ClientError, aiohttp.ClientError, OSError)
_REFUSED = frozenset({"PreconditionFailed", "ConditionalRequestConflict"})
_ABSENT = frozenset({"NoSuchKey", "404", "NotFound"})


def create_s3_client(region: str | None, endpoint_url: str | None, timeout: float) -> Any:
    """An aiobotocore S3 client: one attempt per call, each within `timeout` s."""
    config = AioConfig(retries={"mode": "standard", "total_max_attempts": 1},
                       connect_timeout=timeout, read_timeout=timeout)
    return get_session().create_client("s3", region_name=region, endpoint_url=endpoint_url,
                                       config=config)


class _Refused(Exception):  # noqa: N818 - an answer, not a failure
    """A conditional write was refused (412 or 409)."""


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _text(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = error.get("Code") or _status(exc)
        message = str(error.get("Message", "")).strip()
        if code in ("AccessDenied", 403, "403"):
            return (f"access denied ({message or code}): the role needs s3:GetObject and "
                    "s3:PutObject on the object, and s3:ListBucket on the bucket (without it "
                    "a missing object is answered 403, not 404)")
        return f"{code}: {message}" if message else str(code)
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    return f"{type(exc).__name__}: {exc}"


class S3StateStore:
    """Load (whole, at takeover) and save (conditionally) the state as one S3 object."""

    def __init__(
        self,
        location: S3Location,
        metrics: Metrics,
        *,
        region: str | None = None,
        endpoint_url: str | None = None,
        holder: str | None = None,
        token: int | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.path = location  # the store is configured (never None) and says where
        self.metrics = metrics
        self._region = region
        self._endpoint = endpoint_url
        self.holder = holder
        self.token = token
        self._wall = wall
        self._lock = asyncio.Lock()
        self.etag: str | None = None  # of the version read or last written by us
        self.fetched = False
        self._document: bytes | None = None  # as read at takeover (None: no object)
        self._unusable: str | None = None  # why what was read is not a state (too big)
        self._version: str | None = None
        self.fenced: str | None = None  # why every save is refused from now on
        self.on_fenced: Callable[[str], None] | None = None
        self.last_error: str | None = None
        self.last_saved_at: float | None = None
        # One client for the store's life (made at the first call, closed by `close`):
        # making one costs tens of milliseconds, a hand-over's save should not.
        self._clients = contextlib.AsyncExitStack()
        self._client: S3Client | None = None

    async def _open(self) -> S3Client:
        if self._client is None:
            client: S3Client = await self._clients.enter_async_context(
                create_s3_client(self._region, self._endpoint, CALL_TIMEOUT))
            self._client = client
            return client
        return self._client

    async def close(self) -> None:
        """Close the client (the store may be used again: a new one is made)."""
        clients, self._clients = self._clients, contextlib.AsyncExitStack()
        self._client = None
        await clients.aclose()

    @property
    def needs_fetch(self) -> bool:
        """The state must be read (awaited) before `load`: True until `fetch` succeeded."""
        return not self.fetched

    def fence(self) -> dict[str, Any] | None:
        """The fence written into every document (None without a holder)."""
        if self.holder is None:
            return None
        return {"holder": self.holder, "token": self.token}

    def _metadata(self) -> dict[str, str]:
        if self.holder is None:
            return {}
        return {META_HOLDER: self.holder, META_TOKEN: str(self.token)}

    # -- takeover ---------------------------------------------------------------------

    async def fetch(self, timeout: float) -> None:
        """Read the object whole and claim it under our fence; StateUnreadable if S3 did
        not answer (or refused) within `timeout` s, or others kept writing meanwhile."""
        try:
            async with asyncio.timeout(timeout):
                client = await self._open()
                for _ in range(CLAIM_ATTEMPTS):
                    document = await self._read(client)
                    try:
                        await self._claim(client, document)
                    except _Refused:
                        log.info("state_object_claim_raced", location=str(self.path),
                                 consequence="read again: someone wrote it since our read")
                        continue
                    self._document, self.fetched = document, True
                    return
        except TimeoutError:
            raise StateUnreadable(f"{self.path}: S3 did not answer within {timeout:g}s"
                                  ) from None
        except _CALL_ERRORS as exc:
            raise StateUnreadable(f"{self.path}: {_text(exc)}") from None
        raise StateUnreadable(f"{self.path}: written by someone else at each of "
                              f"{CLAIM_ATTEMPTS} claims")

    async def _read(self, client: S3Client) -> bytes | None:
        bucket, key = self.path.bucket, self.path.key
        try:
            answer = await client.get_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if _code(exc) in _ABSENT or _status(exc) == 404:
                self.etag, self._version = None, None
                log.info("state_object_absent", location=str(self.path))
                return None
            raise
        self.etag = answer.get("ETag")
        self._version = answer.get("VersionId")
        length = int(answer.get("ContentLength") or 0)
        async with answer["Body"] as body:
            if length > MAX_STATE_BYTES:  # not read: that much memory for what is not ours
                self._unusable = _too_big(length)
                return b""
            data = await body.read()
        self._unusable = None
        return data

    async def _claim(self, client: S3Client, document: bytes | None) -> None:
        """Write `document` (re-fenced), or an empty state, on the ETag just read."""
        payload = self._refence(document)
        await self._put(client, payload, self.etag)

    def _refence(self, document: bytes | None) -> bytes:
        """The document as read, with our fence; an unusable or absent one as empty."""
        try:
            data = json.loads(document) if document and self._unusable is None else None
            parse_state(data)  # only a document we would load is written back as it is
        except (ValueError, RecursionError):
            data = None
        if not isinstance(data, dict):
            data = {}
        data.pop("version", None)
        if (fence := self.fence()) is not None:
            data["fence"] = fence
        else:
            data.pop("fence", None)
        return encode(data, None)

    async def _put(self, client: S3Client, payload: bytes, etag: str | None) -> None:
        """PutObject on `etag` (If-None-Match: * without one); _Refused on 412/409."""
        try:
            if etag is not None:
                answer = await client.put_object(
                    Bucket=self.path.bucket, Key=self.path.key, Body=payload, IfMatch=etag,
                    ContentType="application/json", Metadata=self._metadata())
            else:
                answer = await client.put_object(
                    Bucket=self.path.bucket, Key=self.path.key, Body=payload, IfNoneMatch="*",
                    ContentType="application/json", Metadata=self._metadata())
        except ClientError as exc:
            if _code(exc) in _REFUSED or _status(exc) in (409, 412):
                raise _Refused from None
            raise
        self.etag = answer.get("ETag")

    def load(self) -> LeakwatchState | None:
        """The state read by `fetch` (None: there was none, or it was unusable)."""
        if not self.fetched:
            raise StateUnreadable(f"{self.path}: not read yet")
        document, self._document = self._document, None  # the bytes are not kept
        if self._unusable is not None:
            self.quarantine(self._unusable)
            return None
        if document is None:
            return None
        try:
            state = parse_state(json.loads(document))
        except ValueError as exc:  # bad JSON, bad UTF-8 and a wrong shape are all ValueErrors
            self.quarantine(f"{type(exc).__name__}: {exc}"[:300])
            return None
        except RecursionError:
            self.quarantine("nested too deeply")
            return None
        if mended := repair(state, self._wall()):
            log.warning("state_file_repaired", path=str(self.path), mended="; ".join(mended))
        if state.fence is not None and self.token is not None and state.fence.token is not None \
                and state.fence.token > self.token:
            log.warning("state_object_newer_token", location=str(self.path),
                        written_by=state.fence.holder, written_token=state.fence.token,
                        token=self.token,
                        why="the lease item was created afresh (its token counter restarted)")
        return state

    def quarantine(self, why: str) -> None:
        """An unusable object: kept as a noncurrent version (versioned bucket), not moved."""
        if self._version not in (None, "null"):
            log.warning("state_file_quarantined", path=str(self.path), reason=why,
                        kept_as_version=self._version, consequence="starting afresh")
        else:
            log.warning("state_file_unusable", path=str(self.path), reason=why,
                        consequence="starting afresh; the bucket is not versioned, so the "
                                    "first save replaces the object")

    # -- saves --------------------------------------------------------------------------

    async def save(self, document: dict[str, Any] | bytes,
                   timeout: float | None = None) -> bool:
        """Write `document` (or bytes from `encode`) on our last ETag within `timeout` s;
        False if not (failed, or refused because another leader wrote since)."""
        if self.fenced is not None:
            return self._refused(self.fenced)
        if not self.fetched:
            return self._failed("not written: the state was not read at takeover")
        try:
            payload = document if isinstance(document, bytes) else encode(
                {**document, **({"fence": f} if (f := self.fence()) else {})})
            if len(payload) > MAX_WRITE_BYTES:
                raise StateTooLargeError(len(payload), MAX_WRITE_BYTES)
            async with asyncio.timeout(timeout), self._lock:
                client = await self._open()
                try:
                    await self._put(client, payload, self.etag)
                except _Refused:
                    if not await self._was_ours(client):
                        return self._refused(self.fenced or "written by another leader")
                    await self._put(client, payload, self.etag)  # on our own latest write
        except _Refused:
            return self._refused("written by another leader")
        except TimeoutError:
            return self._failed(f"not written within {timeout:g}s")
        except StateTooLargeError as exc:
            return self._failed(str(exc))
        except _CALL_ERRORS as exc:
            return self._failed(_text(exc))
        if self.last_error is not None:
            log.info("state_file_write_recovered", path=str(self.path))
        self.last_error = None
        self.last_saved_at = self._wall()
        self.metrics.state_saves.labels(result="ok").inc()
        return True

    async def _was_ours(self, client: S3Client) -> bool:
        """After a refused save: is the object's current version our own write (whose
        answer we lost)? Then adopt its ETag. Else fence this store."""
        head = await client.head_object(Bucket=self.path.bucket, Key=self.path.key)
        meta = {k.lower(): v for k, v in (head.get("Metadata") or {}).items()}
        holder, token = meta.get(META_HOLDER), meta.get(META_TOKEN)
        if self.holder is not None and holder == self.holder and token == str(self.token):
            self.etag = head.get("ETag")
            log.info("state_object_adopted", location=str(self.path),
                     why="an earlier save of ours went through but its answer was lost")
            return True
        self.fenced = (f"written by {holder or 'another writer'}"
                       + (f" under token {token}" if token else "")
                       + (f" (ours: {self.token})" if self.token is not None else ""))
        return False

    def _refused(self, why: str) -> bool:
        self.metrics.state_saves.labels(result="fenced").inc()
        if self.last_error != why:
            log.error("state_save_refused", path=str(self.path), why=why,
                      consequence="this task is no longer the leader: it saves nothing more "
                                  "and stops leading")
            self.last_error = why
            if self.on_fenced is not None:
                self.on_fenced(why)
        return False

    def _failed(self, error: str) -> bool:
        self.metrics.state_saves.labels(result="failed").inc()
        if self.last_error is None:  # once per episode; the counter says the rest
            log.error("state_file_write_failed", path=str(self.path), error=error)
        self.last_error = error
        return False


def _too_big(size: int) -> str:
    return f"{size} bytes, more than the {MAX_STATE_BYTES} a state can hold"
