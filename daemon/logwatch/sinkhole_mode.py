"""Watch the SSM parameter that sets the sinkhole's behaviour (/cabal/sinkhole_mode).

The runbook parks the sinkhole in `defer`; `accept` / `accept-log` make mail to
the sinkhole succeed silently, so staying there too long is worth a warning,
once per episode (a new one starts whenever the mode changes). This is the
`sinkhole-mode` component: a failed read is counted, reported down and retried
with backoff.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import structlog
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session

from daemon.aws_errors import error_reason
from daemon.logwatch.config import SinkholeModeWatch
from daemon.logwatch.sources.cloudwatch import BOTO_ATTEMPTS, RETRYABLE, call_deadline
from daemon.metrics import Metrics
from daemon.retry import Backoff
from daemon.supervisor import Progress

log = structlog.get_logger()


class BadAnswerError(Exception):
    """GetParameter answered something that is not a parameter."""

KNOWN_MODES = ("defer", "accept", "accept-log", "bounce", "greylist")
ACCEPTING = frozenset({"accept", "accept-log"})

Warn = Callable[[str, str], None]  # (summary, dedupe key)


class SinkholeModeWatcher:
    name = "sinkhole-mode"

    def __init__(
        self,
        cfg: SinkholeModeWatch,
        metrics: Metrics,
        warn: Warn = lambda _summary, _key: None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.warn = warn
        self.clock = clock
        self._sleep = sleep
        self._backoff = Backoff(initial=cfg.interval, maximum=max(cfg.interval, 300.0))
        # Three missed readings (each a slow call at worst) plus the longest backoff.
        self.progress_deadline = (3 * cfg.interval + call_deadline(cfg.request_timeout)
                                  + self._backoff.maximum)
        self.mode: str | None = None
        self.accepting_since: float | None = None
        self.warned = False
        self._written: float | None = None  # LastModifiedDate of the last reading

    def _client(self) -> Any:
        config = AioConfig(
            retries={"mode": "standard", "max_attempts": BOTO_ATTEMPTS},
            connect_timeout=min(self.cfg.request_timeout, 10.0),
            read_timeout=self.cfg.request_timeout,
        )
        return get_session().create_client(
            "ssm", region_name=self.cfg.region, endpoint_url=self.cfg.endpoint_url, config=config
        )

    def observe(self, value: str, modified: object) -> None:
        """Record one reading of the parameter; export it; warn if accepting too long."""
        mode = value.strip().lower()
        label = mode if mode in KNOWN_MODES else "other"
        for known in (*KNOWN_MODES, "other"):
            self.metrics.sinkhole_mode.labels(mode=known).set(1 if known == label else 0)
        now = self.clock()
        # botocore gives a datetime; anything else (a proxy or stub answering oddly) is
        # treated as unknown rather than crashing the watch on every poll.
        written = modified.timestamp() if isinstance(modified, datetime) else None
        rewritten = (written is not None and self._written is not None
                     and written != self._written)
        self._written = written
        if mode != self.mode or (rewritten and mode in ACCEPTING):
            # A new value, or the same accepting value written again (accept, defer,
            # accept between two reads): a new episode, warned about again if it lasts.
            self.mode = mode
            self.warned = False
            # LastModifiedDate tells how long it has really been in this mode,
            # even across our own restarts.
            self.accepting_since = (
                (written if written is not None else now) if mode in ACCEPTING else None
            )
            log.info("sinkhole_mode", mode=label)
        if self.accepting_since is None or self.warned:
            return
        stuck_for = now - self.accepting_since
        if stuck_for > self.cfg.max_accept_duration:
            self.warned = True
            log.warning("sinkhole_mode_accepting_too_long", mode=label,
                        seconds=round(stuck_for), max_seconds=self.cfg.max_accept_duration,
                        hint=f"park it again: aws ssm put-parameter --name {self.cfg.parameter} "
                             "--value defer --overwrite")
            self.warn(f"sinkhole mode has been {label} for {round(stuck_for)} s "
                      f"(more than {round(self.cfg.max_accept_duration)} s): mail to the "
                      "sinkhole now succeeds silently; set it back to defer",
                      f"sinkhole_mode {label} {self.accepting_since}")

    async def _read(self, client: Any) -> dict[str, Any]:
        """The parameter object of one GetParameter call; BadAnswerError if malformed."""
        try:
            async with asyncio.timeout(call_deadline(self.cfg.request_timeout)):
                resp = await client.get_parameter(Name=self.cfg.parameter)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            # botocore could not parse what came back (a LastModifiedDate that is no
            # date): the endpoint misbehaves, which is a failed read, not our crash.
            raise BadAnswerError(f"{type(exc).__name__}: {exc}") from exc
        param = resp.get("Parameter") if isinstance(resp, dict) else None
        if not isinstance(param, dict):
            raise BadAnswerError("the answer holds no Parameter object")
        return param

    async def run(self, progress: Progress) -> None:
        """Poll until cancelled; a failed read is counted, reported and retried with backoff."""
        failures = 0
        while True:
            try:
                async with self._client() as client:
                    while True:
                        param = await self._read(client)
                        self.observe(str(param.get("Value", "")), param.get("LastModifiedDate"))
                        progress.progress()
                        progress.up()
                        failures = 0
                        await self._sleep(self.cfg.interval)
            except (*RETRYABLE, BadAnswerError) as exc:
                failures += 1
                reason = ("ssm_bad_answer" if isinstance(exc, BadAnswerError)
                          else f"ssm_{error_reason(exc)}")
                self.metrics.leakwatch_errors.labels(reason=reason).inc()
                progress.retrying(f"{reason}: {type(exc).__name__}", reason)
                delay = round(self._backoff.delay(failures), 3)
                log.warning("sinkhole_mode_read_failed", reason=reason,
                            parameter=self.cfg.parameter, error=type(exc).__name__,
                            retry_in=delay)
                await self._sleep(delay)
