"""The running leak watcher (`selfcheckd run`): source -> parser -> detector -> alerts.

`run_leakwatch` never raises on source trouble: errors are counted in
leakwatch_errors_total{reason}, backed off and retried. It returns promptly
once `stop` is set, after saving the checkpoint (if configured).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

import structlog

from daemon.logwatch.alerts import AlertSender
from daemon.logwatch.checkpoint import load_checkpoint, save_checkpoint, trim
from daemon.logwatch.config import LeakWatchConfig
from daemon.logwatch.detector import Finding, LeakDetector
from daemon.logwatch.parser import line_timestamp, timestamp_to_epoch
from daemon.logwatch.pipeline import LineCounts, LineProcessor
from daemon.logwatch.sinkhole_mode import SinkholeModeWatcher
from daemon.logwatch.sources.cloudwatch import CloudWatchPoller
from daemon.logwatch.sources.file import FileFollower
from daemon.logwatch.sources.stdin import StdinReader
from daemon.metrics import Metrics

log = structlog.get_logger()

LOGLEVEL_HINT = (
    "sendmail logs to= delivery lines only at LogLevel 9 (8 for stat=Sent): set "
    "define(`confLOG_LEVEL', `9') in sendmail.mc; until then the leak watcher is blind"
)


def format_sender(sender: str | None) -> str:
    if sender is None:
        return "unknown"
    return sender or "<>"


def leak_summary(f: Finding) -> str:
    return (
        f"sinkhole leak: mail to {f.recipient} from {format_sender(f.sender)} "
        f"(queue id {f.queue_id}, stat={f.stat})"
    )


class LeakWatcher:
    """One watcher instance: its source, detector memory, alert queue and metrics."""

    def __init__(self, config: LeakWatchConfig, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        self.detector = LeakDetector(
            config.domains, config.allowed_senders, config.max_tracked_queue_ids
        )
        self.processor = LineProcessor(self.detector)
        self.alerts = AlertSender(config.alert, metrics) if config.alert else None
        self.poller: CloudWatchPoller | None = None
        if config.source == "cloudwatch":
            self.poller = CloudWatchPoller(config.cloudwatch, on_error=self._count_error)
        self._flushed = LineCounts()
        self.started = time.monotonic()
        self._blind_warned = False
        self._silent_warned = False

    # -- errors, alerts, metrics ----------------------------------------------------------
    def _count_error(self, reason: str) -> None:
        self.metrics.leakwatch_errors.labels(reason=reason).inc()

    def _warn_webhook(self, summary: str, key: str) -> None:
        if self.alerts is not None and self.alerts.cfg.send_warnings:
            self.alerts.submit(summary, "warning", key)

    def report(self, f: Finding) -> None:
        if f.expected:
            self.metrics.test_recipients.inc()
            log.info("sinkhole_test_recipient", queue_id=f.queue_id, recipient=f.recipient,
                     sender=format_sender(f.sender), stat=f.stat)
            return
        self.metrics.leaked_recipients.inc()
        log.error("sinkhole_leak_detected", queue_id=f.queue_id, recipient=f.recipient,
                  sender=format_sender(f.sender), stat=f.stat)
        if self.alerts is not None:
            self.alerts.submit(leak_summary(f), key=f"leak {f.queue_id} {f.recipient.lower()}")

    def _flush_counts(self) -> None:
        now, was = self.processor.counts, self._flushed
        m = self.metrics.maillog_lines
        for kind, value in now.as_dict().items():
            delta = value - was.as_dict()[kind]
            if delta:
                m.labels(kind=kind).inc(delta)
        self._flushed = dataclasses.replace(now)
        ts = self.processor.last_delivery_timestamp
        if ts is not None:
            epoch = timestamp_to_epoch(ts)
            if epoch is not None:
                self.metrics.last_delivery_line.set(epoch)

    async def resolve_sender(self, f: Finding) -> Finding:
        """With a server-side filter, from= lines are not fetched: look the sender up."""
        poller = self.poller
        if f.sender is not None or poller is None or not poller.cfg.filter_pattern:
            return f
        epoch = timestamp_to_epoch(f.timestamp)
        before_ms = int((epoch if epoch is not None else time.time()) * 1000)
        sender = await poller.lookup_sender(f.queue_id, before_ms)
        if sender is None:
            return f
        self.detector.senders.put(f.queue_id, sender)
        return dataclasses.replace(f, sender=sender, expected=self.detector.is_allowed(sender))

    async def handle_batch(self, batch: list[str]) -> None:
        for finding in self.processor.feed_batch(batch):
            self.report(await self.resolve_sender(finding))
        self._flush_counts()
        now = time.time()
        self.metrics.leakwatch_last_poll_success.set(now)
        newest: float | None = None
        if self.poller is not None and self.poller.newest_event_ms is not None:
            newest = self.poller.newest_event_ms / 1000
        elif batch:
            ts = line_timestamp(batch[-1])
            newest = timestamp_to_epoch(ts) if ts else None
        if newest is not None:
            self.metrics.leakwatch_lag.set(max(0.0, now - newest))

    # -- checkpoint -----------------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, Any]:
        detector = self.detector.state()
        state: dict[str, Any] = {
            "detector": {"senders": trim(detector["senders"]),
                         "reported": trim(detector["reported"])},
        }
        if self.poller is not None:
            state["cloudwatch"] = self.poller.state()
        return state

    def restore(self) -> None:
        path = self.config.cloudwatch.state_file
        if path is None or self.poller is None:
            return
        data = load_checkpoint(path)
        if data is None:
            log.info("leakwatch_no_checkpoint", path=str(path),
                     lookback=self.config.cloudwatch.lookback)
            return
        self.poller.restore(data.get("cloudwatch", {}))
        self.detector.restore(data.get("detector", {}))
        log.info("leakwatch_checkpoint_loaded", path=str(path), cursor_ms=self.poller.cursor_ms)

    async def save(self) -> None:
        path = self.config.cloudwatch.state_file
        if path is None or self.poller is None:
            return
        try:
            await asyncio.to_thread(save_checkpoint, path, self.checkpoint_state())
        except OSError as exc:
            self._count_error("checkpoint_write")
            log.warning("leakwatch_checkpoint_write_failed", path=str(path), error=exc.strerror)

    # -- the loops ------------------------------------------------------------------------
    def batches(self) -> AsyncIterator[list[str]]:
        if self.poller is not None:
            return self.poller.batches()
        if self.config.source == "file":
            f = self.config.file
            return FileFollower(f.path, f.poll_interval, f.from_beginning,
                                on_error=self._count_error).batches()
        return StdinReader().batches()

    async def consume(self) -> None:
        backoff = 1.0
        while True:
            try:
                async for batch in self.batches():
                    await self.handle_batch(batch)
                    if batch:
                        await self.save()
                    backoff = 1.0
                log.info("leakwatch_source_ended", source=self.config.source)
                return
            except Exception as exc:  # a bug or an unforeseen error: never kill the daemon
                self._count_error("source_failed")
                log.error("leakwatch_source_failed", source=self.config.source,
                          error=f"{type(exc).__name__}: {exc}", retry_in=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 300.0)

    def check_blindness(self) -> None:
        """Warn (once per episode) when the watcher cannot see deliveries."""
        now = time.monotonic()
        window = self.config.blind_after
        p = self.processor
        last_to = p.last_delivery_seen if p.last_delivery_seen is not None else self.started
        mta_flowing = p.last_mta_seen is not None and now - p.last_mta_seen < window
        if mta_flowing and now - last_to > window:
            if not self._blind_warned:
                self._blind_warned = True
                log.warning("leakwatch_blind", reason="sendmail lines but no to= lines",
                            seconds=round(now - last_to), hint=LOGLEVEL_HINT)
                self._warn_webhook(
                    f"leak watcher is blind: sendmail logs lines but no delivery (to=) line "
                    f"for {round(now - last_to)} s; sendmail needs LogLevel 9", "blind")
        else:
            self._blind_warned = False
        last_line = p.last_line_seen if p.last_line_seen is not None else self.started
        if now - last_line > window:
            if not self._silent_warned:
                self._silent_warned = True
                log.warning("leakwatch_no_lines", source=self.config.source,
                            seconds=round(now - last_line))
        else:
            self._silent_warned = False

    async def watch_blindness(self) -> None:
        interval = min(60.0, self.config.blind_after / 4)
        while True:
            await asyncio.sleep(interval)
            self.check_blindness()

    async def run(self, stop: asyncio.Event) -> None:
        self.restore()
        tasks = [asyncio.create_task(self.consume(), name="leakwatch-source"),
                 asyncio.create_task(self.watch_blindness(), name="leakwatch-blindness")]
        if self.alerts is not None:
            tasks.append(asyncio.create_task(self.alerts.run(), name="leakwatch-alerts"))
        if self.config.sinkhole_mode.enabled:
            mode = SinkholeModeWatcher(self.config.sinkhole_mode, self.metrics,
                                       warn=self._warn_webhook)
            tasks.append(asyncio.create_task(mode.run(), name="leakwatch-sinkhole-mode"))
        log.info("leakwatch_started", source=self.config.source,
                 domains=",".join(self.config.domains))
        try:
            await stop.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            with contextlib.suppress(Exception):
                await self.save()
            log.info("leakwatch_stopped")


async def run_leakwatch(config: LeakWatchConfig, metrics: Metrics, stop: asyncio.Event) -> None:
    """Run the configured source (+ sinkhole mode watch) until `stop` is set."""
    await LeakWatcher(config, metrics).run(stop)
