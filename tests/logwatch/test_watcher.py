"""The leak watcher as components: file source, state file, outbox, blindness, sinkhole mode."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import io
import json
import re
import threading
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiobotocore.session import get_session
from aiohttp import web
from structlog.testing import capture_logs

from daemon.delivery.outbox import Alert
from daemon.logwatch.config import LeakWatchConfig, SinkholeModeWatch
from daemon.logwatch.saving import fit
from daemon.logwatch.sinkhole_mode import SinkholeModeWatcher
from daemon.logwatch.sources.stdin import StdinReader
from daemon.logwatch.watcher import LeakWatch, SourceLoop
from daemon.metrics import Metrics
from daemon.state import MAX_WRITE_BYTES, StateFile
from daemon.state_io import VolumeIO
from daemon.supervisor import Supervisor
from tests.fake_time import FakeClock
from tests.logwatch.aws_fakes import AWS_ENV
from tests.logwatch.harness import advance_until, until, watching
from tests.logwatch.receiver import Sink, alert_sink

REAL = (Path(__file__).parent / "fixtures" / "sendmail_real.log").read_text()
LEAK = ("2026-11-23T19:31:53.567357+00:00 vm sendmail[11287]: {qid}: to=<{rcpt}>, "
        "delay=00:00:00, xdelay=00:00:00, mailer=smtp, pri=30237, relay=25, dsn=5.1.2, "
        "stat=Deferred\n")


def leak_line(qid: str, rcpt: str = "nobody@sinkhole.test") -> str:
    return LEAK.format(qid=qid, rcpt=rcpt)


def file_config(log: Path, **extra: Any) -> dict[str, Any]:
    return {"source": "file", "file": {"path": str(log), "poll_interval": 0.02}, **extra}


def append(path: Path, text: str) -> None:
    with path.open("a") as f:
        f.write(text)


def leaks_in(logs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(e["queue_id"], e["recipient"]) for e in logs
            if e["event"] == "sinkhole_leak_detected"]


async def test_file_source_alerts_once_per_leak_and_exports_metrics(tmp_path: Path) -> None:
    """Leaks in a followed file are logged, counted and delivered to the webhook once each."""
    log = tmp_path / "maillog"
    log.write_text("")
    secret_file = tmp_path / "secret"
    secret_file.write_text("from-a-file\n")
    async with alert_sink() as sink:
        config = file_config(log, allowed_senders=["qp-test@*"],
                             alert={"url": sink.url, "secret_file": str(secret_file)})
        with capture_logs() as logs:
            async with watching(config) as w:
                await until(lambda: w.value("leakwatch_last_poll_success_timestamp_seconds"))
                append(log, REAL)
                append(log, REAL)  # tail -F restarts re-send lines: no second alert
                await until(lambda: len(sink.accepted) == 5)
    leaks = [e for e in logs if e["event"] == "sinkhole_leak_detected"]
    assert [e["recipient"] for e in leaks] == [
        "nobody-2@sinkhole.test", "nobody-3@sinkhole.test", "nobody-4@sinkhole.test",
        "nobody-9@sinkhole.test", "nobody-8@sinkhole.test"]
    assert all(e["log_level"] == "error" and e["sender"] == "unknown" for e in leaks)
    assert {s for _, s in sink.requests} == {"from-a-file"}
    assert len(sink.requests) == 5
    assert "nobody-2@sinkhole.test" in sink.requests[0][0]["summary"]
    assert w.value("sinkhole_leaked_recipients_total") == 5
    assert w.value("sinkhole_test_recipients_total") == 2
    assert w.value("maillog_lines_total", kind="to") == 10
    assert w.value("maillog_lines_total", kind="from") == 4
    assert w.value("maillog_last_delivery_line_timestamp_seconds") == 1795462313.567357
    assert w.value("leakwatch_lag_seconds") > 0


@pytest.mark.parametrize("document", [
    '{"version":1,"cloudwatch":{"seen":5}}',
    '{"version":1,"cloudwatch":[]}',
    '{"version":1,"detector":{"senders":[1,2]}}',
    # Well-formed but not applicable: one warning, naming the real reason.
    '{"version":2,"file":{"path":"LOG","device":1,"inode":-1,"offset":0,"fingerprint":"ab"}}',
])
async def test_state_file_of_the_wrong_shape_never_kills_the_watcher(
    tmp_path: Path, document: str,
) -> None:
    """A state file that is valid JSON of the wrong shape is moved aside; the watcher runs."""
    log, state = tmp_path / "maillog", tmp_path / "leakwatch.json"
    log.write_text("")
    document = document.replace("LOG", str(log))
    state.write_text(document)
    with capture_logs() as logs:
        async with watching(file_config(log, state_file=str(state))) as w:
            await until(lambda: w.value("leakwatch_last_poll_success_timestamp_seconds"))
            append(log, leak_line("6ANJVrcF011285"))
            await until(lambda: w.value("sinkhole_leaked_recipients_total") == 1)
            assert w.up("leakwatch-source") == 1
            assert w.supervisor.problems() == {}
    events = [e["event"] for e in logs]
    assert "state_file_quarantined" in events and "leakwatch_started" in events
    [warning] = [e for e in logs if e["log_level"] == "warning"]
    assert warning["event"] == "state_file_quarantined"
    assert "could not" not in warning["reason"]  # the cause, not that there was one
    [moved] = list(tmp_path.glob("leakwatch.json.corrupt-*"))  # noqa: ASYNC240
    assert moved.read_text() == document
    assert json.loads(state.read_text())["version"] == 2  # a fresh state was saved


@pytest.mark.parametrize("make_unreadable", ["missing", "directory"])
async def test_unreadable_file_source_is_down_and_degraded_not_dead(
    tmp_path: Path, make_unreadable: str,
) -> None:
    """A missing log file (or a directory) is down, never a successful poll, and degraded
    with its reason past the deadline: alive (it keeps retrying), not a /healthz problem."""
    log = tmp_path / "maillog"
    if make_unreadable == "directory":
        log.mkdir()
    clock = FakeClock()
    reason = "file_missing" if make_unreadable == "missing" else "not_a_file"

    async def reads_done() -> None:  # fake time moves only while no read is in its thread
        await until(lambda: not any(t.name == "leakwatch-file" for t in threading.enumerate()))
        await clock.settle()

    with capture_logs() as logs:
        async with watching(file_config(log), health_clock=clock, sleep=clock.sleep) as w:
            await until(lambda: w.value("leakwatch_errors_total", reason=reason) == 1)
            await advance_until(  # every failed read is counted, with a backoff between
                clock, lambda: w.value("leakwatch_errors_total", reason=reason) == 3, limit=10)
            assert w.up("leakwatch-source") == 0
            assert w.value("leakwatch_last_poll_success_timestamp_seconds") == 0
            for _ in range(int(2 * w.watch.source_loop.progress_deadline)):
                await reads_done()
                await clock.advance(1.0)
            await reads_done()
            problems = w.supervisor.problems()
            degraded = w.supervisor.degraded()
            if make_unreadable == "directory":
                log.rmdir()
            log.write_text(leak_line("6ANJVrcF011285"))
            await advance_until(clock, lambda: w.up("leakwatch-source") == 1, limit=60)
            assert w.supervisor.problems() == w.supervisor.degraded() == {}
    assert problems == {}
    assert list(degraded) == ["leakwatch-source"]
    code, why = degraded["leakwatch-source"]
    assert code == reason and str(log) in why
    assert len([e for e in logs if e["event"] == "leakwatch_poll_failed"
                and e["log_level"] == "warning"]) == 1


async def test_a_leak_written_while_the_daemon_is_down_is_seen_on_restart(tmp_path: Path) -> None:
    """The file position survives a restart: lines appended meanwhile are read, old ones not."""
    log, state = tmp_path / "maillog", tmp_path / "leakwatch.json"
    log.write_text("old noise\n")
    config = file_config(log, state_file=str(state))
    with capture_logs() as first:
        async with watching(config) as w:
            await until(lambda: w.value("leakwatch_last_poll_success_timestamp_seconds"))
            append(log, leak_line("6ANJUQna010773", "first@sinkhole.test"))
            await until(lambda: w.value("sinkhole_leaked_recipients_total") == 1)
    append(log, leak_line("6ANJUTfa010820", "while-down@sinkhole.test"))  # a deploy gap
    with capture_logs() as second:
        async with watching(config) as w:
            await until(lambda: w.value("sinkhole_leaked_recipients_total") == 1)
            await until(lambda: w.value("leakwatch_last_poll_success_timestamp_seconds"))
    assert leaks_in(first) == [("6ANJUQna010773", "first@sinkhole.test")]
    assert leaks_in(second) == [("6ANJUTfa010820", "while-down@sinkhole.test")]


async def test_a_first_start_on_a_quiet_log_saves_where_it_began(tmp_path: Path) -> None:
    """No state file yet and no line to read: the position is saved at the first poll, so
    a kill (no final save) before any line arrives still resumes there, not at the end."""
    log, state = tmp_path / "maillog", tmp_path / "leakwatch.json"
    log.write_text("old noise\n")
    config = file_config(log, state_file=str(state))
    async with watching(config) as w:
        await until(lambda: w.value("leakwatch_last_poll_success_timestamp_seconds"))
        await until(state.exists)
        killed = state.read_bytes()  # what a SIGKILL would leave: no save at the stop
    state.write_bytes(killed)
    append(log, leak_line("6ANJUTfa010820", "while-down@sinkhole.test"))
    with capture_logs() as logs:
        async with watching(config) as w:
            await until(lambda: w.value("sinkhole_leaked_recipients_total") == 1)
    assert leaks_in(logs) == [("6ANJUTfa010820", "while-down@sinkhole.test")]


async def test_copytruncate_and_refill_while_down_is_read_from_the_start(tmp_path: Path) -> None:
    """A log truncated and refilled past the saved offset while stopped is read from byte 0."""
    log, state = tmp_path / "maillog", tmp_path / "leakwatch.json"
    log.write_text("")
    config = file_config(log, state_file=str(state))
    async with watching(config) as w:
        await until(lambda: w.value("leakwatch_last_poll_success_timestamp_seconds"))
        append(log, "x" * 200 + "\n")
        await until(lambda: w.value("maillog_lines_total", kind="unparsed")
                    + w.value("maillog_lines_total", kind="other") == 1)
    with log.open("r+") as f:  # copytruncate, then more than 200 bytes of new lines
        f.truncate(0)
    append(log, leak_line("6ANJUTfa010820") + "y" * 300 + "\n")
    with capture_logs() as logs:
        async with watching(config) as w:
            await until(lambda: w.value("sinkhole_leaked_recipients_total") == 1)
    assert leaks_in(logs) == [("6ANJUTfa010820", "nobody@sinkhole.test")]


async def test_an_alert_pending_at_shutdown_is_delivered_after_restart(tmp_path: Path) -> None:
    """The outbox is saved at shutdown; the next process delivers it, and only it."""
    log, state = tmp_path / "maillog", tmp_path / "leakwatch.json"
    log.write_text("")
    async with alert_sink(default=503) as down:
        config = file_config(log, state_file=str(state), alert={"url": down.url})
        async with watching(config) as w:
            await until(lambda: w.value("leakwatch_last_poll_success_timestamp_seconds"))
            append(log, leak_line("6ANJUQna010773"))
            await until(lambda: len(down.requests) >= 1)
            assert w.watch.outbox is not None and len(w.watch.outbox.pending()) == 1
    saved = json.loads(state.read_text())
    assert [a["summary"] for a in saved["outbox"]] == [
        "sinkhole leak: mail to nobody@sinkhole.test from unknown (queue id 6ANJUQna010773, "
        "stat=Deferred)"]
    async with alert_sink() as up:
        config = file_config(log, state_file=str(state), alert={"url": up.url})
        async with watching(config) as w:
            await until(lambda: len(up.accepted) == 1)
            append(log, leak_line("6ANJUQna010773"))  # sendmail's retry: a duplicate
            await until(lambda: w.value("maillog_lines_total", kind="to") == 1)
            await asyncio.sleep(0.1)
    assert len(up.requests) == 1
    assert up.alert_ids == [saved["outbox"][0]["id"]] == [down.alert_ids[0]]
    assert json.loads(state.read_text())["outbox"] == []


FROM_LINE = "2026-11-23T19:30:26Z h sendmail[1]: 6ANJUQna010773: from=<a@b>, size=1"


def blind_after_60(alert_url: str, clock: FakeClock) -> LeakWatch:
    config = LeakWatchConfig.model_validate(
        {"source": "stdin", "blind_after": 60, "alert": {"url": alert_url}})
    return LeakWatch(config, Metrics(), clock=clock)


async def test_blindness_warning_is_sent_once_per_episode(tmp_path: Path) -> None:
    """Blind, seeing again, blind again: two warnings, each delivered."""
    clock = FakeClock()
    async with alert_sink() as sink:
        watch = blind_after_60(sink.url, clock)
        from_line = FROM_LINE
        to_line = "2026-11-23T19:30:26Z h sendmail[1]: 6ANJUQna010773: to=<a@b.org>, stat=Sent"

        async def tick(line: str) -> None:
            await clock.advance(30)
            await watch.handle_batch([line])
            watch.check_blindness()

        with capture_logs() as logs:
            for line in [from_line] * 4 + [to_line] + [from_line] * 4:
                await tick(line)
        assert watch.outbox is not None
        keys = [a.key for a in watch.outbox.pending()]
    assert [e["event"] for e in logs if e["event"].startswith("leakwatch_")] == [
        "leakwatch_blind", "leakwatch_sees_deliveries_again", "leakwatch_blind"]
    assert len(keys) == 2 and len(set(keys)) == 2


async def test_a_quiet_spell_does_not_end_a_blind_episode(tmp_path: Path) -> None:
    """Blind, then no sendmail line at all for a while, then from= lines again: still the
    same episode (no delivery line was ever seen), so one warning, not one per pause."""
    clock = FakeClock()
    async with alert_sink() as sink:
        watch = blind_after_60(sink.url, clock)
        with capture_logs() as logs:
            for lines in [[FROM_LINE]] * 4 + [[]] * 6 + [[FROM_LINE]] * 4:
                await clock.advance(30)
                await watch.handle_batch(lines)
                watch.check_blindness()
        assert watch.outbox is not None
        assert len(watch.outbox.pending()) == 1
    assert [e["event"] for e in logs if e["event"].startswith("leakwatch_blind")
            or e["event"] == "leakwatch_sees_deliveries_again"] == ["leakwatch_blind"]


def test_expired_leak_alert_lets_a_retry_alert_again() -> None:
    """When a leak alert expires undelivered, the detector forgets it was reported."""
    config = LeakWatchConfig.model_validate({"source": "stdin",
                                             "alert": {"url": "http://127.0.0.1:9/a"}})
    watch = LeakWatch(config, Metrics())
    [finding] = watch.processor.feed(leak_line("6ANJUQna010773").rstrip("\n"))
    assert watch.processor.feed(leak_line("6ANJUQna010773").rstrip("\n")) == []
    watch._expired(f"leak {finding.queue_id} {finding.recipient.lower()}")
    assert len(watch.processor.feed(leak_line("6ANJUQna010773").rstrip("\n"))) == 1


async def test_sinkhole_mode_from_ssm(moto_url: str) -> None:
    """The SSM parameter is exported as sinkhole_mode{mode} and accept for too long warns once."""
    async with get_session().create_client(
        "ssm", region_name="us-east-1", endpoint_url=moto_url
    ) as ssm:
        await ssm.put_parameter(Name="/cabal/sinkhole_mode", Value="accept", Type="String")
    metrics = Metrics()
    warnings: list[str] = []
    cfg = SinkholeModeWatch(enabled=True, endpoint_url=moto_url, region="us-east-1",
                            interval=0.05, max_accept_duration=3600)
    watcher = SinkholeModeWatcher(cfg, metrics, warn=lambda s, _k: warnings.append(s),
                                  clock=lambda: time.time() + 7200)
    sup = Supervisor(metrics)
    sup.start(watcher)
    with capture_logs() as logs:
        task = asyncio.create_task(sup.run())
        await until(lambda: metrics.sinkhole_mode.labels(mode="accept")._value.get() == 1)
        await until(lambda: len([e for e in logs if e["event"] == "sinkhole_mode"]) >= 1)
        await asyncio.sleep(0.2)
        sup.stop()
        await asyncio.wait_for(task, 5)
    assert metrics.sinkhole_mode.labels(mode="defer")._value.get() == 0
    assert len([e for e in logs if e["event"] == "sinkhole_mode_accepting_too_long"]) == 1
    assert len(warnings) == 1
    assert "set it back to defer" in warnings[0]


def test_sinkhole_accept_written_again_is_a_new_episode() -> None:
    """accept, then defer and accept again between two reads (only LastModifiedDate
    tells): a new episode, warned about again once it lasts; the same reading repeated,
    or a timestamp that is no datetime, is not."""
    now = [1_800_000_000.0]
    warnings: list[str] = []
    cfg = SinkholeModeWatch(enabled=True, region="us-east-1", max_accept_duration=600)
    watcher = SinkholeModeWatcher(cfg, Metrics(), warn=lambda s, _k: warnings.append(s),
                                  clock=lambda: now[0])
    first = datetime.fromtimestamp(now[0] - 3600, tz=UTC)
    watcher.observe("accept", first)
    watcher.observe("accept", first)
    assert len(warnings) == 1
    now[0] += 60
    again = datetime.fromtimestamp(now[0] - 30, tz=UTC)
    watcher.observe("accept", again)  # written again: the clock restarts, no warning yet
    assert len(warnings) == 1
    now[0] += 600
    watcher.observe("accept", again)
    assert len(warnings) == 2
    watcher.observe("accept", "2026-11-25 not a datetime")
    watcher.observe("accept", None)
    assert len(warnings) == 2


async def test_sinkhole_mode_missing_parameter_is_counted_and_down(moto_url: str) -> None:
    """A missing parameter is counted with a bounded reason and reported down, not a crash."""
    metrics = Metrics()
    cfg = SinkholeModeWatch(enabled=True, endpoint_url=moto_url, region="us-east-1",
                            interval=0.05)
    sup = Supervisor(metrics)
    sup.start(SinkholeModeWatcher(cfg, metrics))
    task = asyncio.create_task(sup.run())
    await until(lambda: metrics.leakwatch_errors.labels(reason="ssm_api_error")._value.get() >= 1)
    assert metrics.registry.get_sample_value(
        "selfcheckd_component_up", {"component": "sinkhole-mode"}) == 0
    assert metrics.registry.get_sample_value(
        "selfcheckd_component_restarts_total", {"component": "sinkhole-mode"}) == 0
    sup.stop()
    await asyncio.wait_for(task, 5)


@pytest.mark.parametrize("answer", [
    {"Parameter": {"Name": "/cabal/sinkhole_mode", "Value": "accept",
                   "LastModifiedDate": "not-a-time"}},
    {"Parameter": ["x"]},
], ids=["bad-date", "no-object"])
async def test_a_malformed_ssm_answer_is_a_failed_read_not_a_crash(
    answer: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An endpoint answering GetParameter with what botocore cannot parse (a date that is
    none) or no parameter object: counted, reported down, retried; never a crash loop."""
    for key, value in AWS_ENV.items():
        monkeypatch.setenv(key, value)

    async def get_parameter(_request: web.Request) -> web.Response:
        return web.json_response(answer, content_type="application/x-amz-json-1.1")

    app = web.Application()
    app.router.add_post("/", get_parameter)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    metrics = Metrics()
    cfg = SinkholeModeWatch(enabled=True, endpoint_url=f"http://127.0.0.1:{port}",
                            region="us-east-1", interval=0.05)
    sup = Supervisor(metrics)
    sup.start(SinkholeModeWatcher(cfg, metrics))
    task = asyncio.create_task(sup.run())
    try:
        await until(lambda: metrics.leakwatch_errors.labels(
            reason="ssm_bad_answer")._value.get() >= 1)
        value = metrics.registry.get_sample_value
        assert value("selfcheckd_component_up", {"component": "sinkhole-mode"}) == 0
        assert value("selfcheckd_component_restarts_total", {"component": "sinkhole-mode"}) == 0
    finally:
        sup.stop()
        await asyncio.wait_for(task, 5)
        await runner.cleanup()


async def test_state_survives_a_handover() -> None:
    """A reload hands the detector memory and pending alerts to the new watcher."""
    config = LeakWatchConfig.model_validate({"source": "stdin",
                                             "alert": {"url": "http://127.0.0.1:9/a"}})
    old = LeakWatch(config, Metrics())
    old.processor.feed(leak_line("6ANJUQna010773").rstrip("\n"))
    assert old.outbox is not None
    old.outbox.submit("leak", key="leak 6ANJUQna010773 nobody@sinkhole.test")
    new = LeakWatch(config, Metrics())
    await new.open(handover=old.snapshot())
    assert new.processor.feed(leak_line("6ANJUQna010773").rstrip("\n")) == []
    assert new.outbox is not None
    assert [a.key for a in new.outbox.pending()] == ["leak 6ANJUQna010773 nobody@sinkhole.test"]


async def test_leaks_are_reported_even_if_a_sender_lookup_is_cut_short(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Cancelled during the CloudWatch sender lookup, the batch's leaks still reach the outbox."""
    for key, value in AWS_ENV.items():
        monkeypatch.setenv(key, value)
    connected = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connected.set()  # a CloudWatch endpoint that never answers
        await reader.read()
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    endpoint = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    config = LeakWatchConfig.model_validate({
        "source": "cloudwatch", "alert": {"url": "http://127.0.0.1:9/a"},
        "cloudwatch": {"endpoint_url": endpoint, "region": "us-east-1",
                       "filter_pattern": "sinkhole.test", "request_timeout": 30}})
    watch = LeakWatch(config, Metrics())
    try:
        async with watch.source.opened():
            task = asyncio.create_task(watch.handle_batch(
                [leak_line("6ANJUQna010773").rstrip("\n"),
                 leak_line("6ANJUTfa010820").rstrip("\n")]))
            await asyncio.wait_for(connected.wait(), 10)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
    finally:
        server.close()
    assert watch.outbox is not None
    assert [a.key for a in watch.outbox.pending()] == [
        "leak 6ANJUQna010773 nobody@sinkhole.test", "leak 6ANJUTfa010820 nobody@sinkhole.test"]


class _BrokenStream(io.RawIOBase):
    """A stream that yields one line, then fails as a reset socket does."""

    def __init__(self) -> None:
        self.lines = [b"2026-11-23T19:30:26Z h sendmail[1]: x: from=<a@b>, size=1\n"]

    def __iter__(self) -> Any:
        return self

    def __next__(self) -> bytes:
        if self.lines:
            return self.lines.pop()
        raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")


async def test_a_failing_standard_input_is_down_not_finished() -> None:
    """stdin that breaks (a reset socket) is a source down with its reason, counted, not a
    clean end of input that /healthz would accept for good."""
    config = LeakWatchConfig.model_validate({"source": "stdin"})
    async with watching(config, stdin=StdinReader(_BrokenStream())) as w:  # type: ignore[arg-type]
        await until(lambda: w.value("leakwatch_errors_total", reason="stdin_error") >= 1)
        assert w.up("leakwatch-source") == 0
        assert w.supervisor.states()["leakwatch-source"]["state"] == "running"
        assert "Connection reset by peer" in str(
            w.supervisor.states()["leakwatch-source"]["reason"])


async def test_a_removed_watcher_leaves_no_pending_alert_ageing_on_metrics(
    tmp_path: Path,
) -> None:
    """A reload that drops [leakwatch] with an alert pending: the gauges read 0 (they kept
    the old outbox's count and age, so SelfcheckdAlertDeliveryFailing fired for nothing
    that exists), while the alert stays in the state file."""
    state = tmp_path / "leakwatch.json"
    config = LeakWatchConfig.model_validate({
        "source": "stdin", "state_file": str(state),
        "alert": {"url": "http://127.0.0.1:9/alert"}})
    metrics = Metrics()
    watch = LeakWatch(config, metrics)
    await watch.open()
    await watch.handle_batch([leak_line("6ANJUQna010773").rstrip("\n")])
    value = metrics.registry.get_sample_value
    assert value("selfcheckd_alerts_pending") == 1
    await watch.close()
    assert value("selfcheckd_alerts_pending") == 0
    assert value("selfcheckd_alerts_oldest_pending_age_seconds") == 0
    assert len(json.loads(state.read_text())["outbox"]) == 1


class _ChattyStdin:
    """A positionless source (like standard input) with a from= line on every read."""

    kind = "stdin"
    poll_interval = 1.0
    max_backoff = 10.0
    more_pending = False

    def __init__(self) -> None:
        self.reads = 0

    @contextlib.asynccontextmanager
    async def opened(self) -> AsyncIterator[None]:
        yield

    async def read(self) -> list[str]:
        self.reads += 1
        return [f"2026-11-23T19:31:53+00:00 vm sendmail[1]: Q{self.reads:07d}: from=<a@b>"]

    def state(self) -> None:
        return None


class _Progress:
    def progress(self) -> None: ...
    def up(self) -> None: ...
    def down(self, why: str) -> None: ...


async def test_a_positionless_source_still_saves_what_it_learns(tmp_path: Path) -> None:
    """stdin has no position to compare: its lines still change the detector's and queue's
    memory, so that is saved every few seconds (a kill loses at most those seconds)."""
    now = [0.0]

    async def sleep(seconds: float) -> None:
        now[0] += seconds
        if now[0] > 60:
            raise asyncio.CancelledError
        await asyncio.sleep(0)

    config = LeakWatchConfig.model_validate(
        {"source": "stdin", "state_file": str(tmp_path / "state.json")})
    watch = LeakWatch(config, Metrics(), clock=lambda: now[0], sleep=sleep,
                      stdin=_ChattyStdin())  # type: ignore[arg-type]
    await watch.open()
    saves: list[float] = []
    save = watch.save

    async def counting_save(timeout: float | None = None) -> bool:
        saves.append(now[0])
        return await save(timeout)

    watch.save = counting_save  # type: ignore[method-assign]
    with contextlib.suppress(asyncio.CancelledError):
        await SourceLoop(watch, sleep, lambda: now[0]).run(_Progress())  # type: ignore[arg-type]
    assert len(saves) >= 10, saves  # the first batch at once, then every 5 s
    assert saves[0] == 0


def accounted(sink: Sink) -> int:
    """Leaks the receiver accepted, a digest counting what its summary says (by id)."""
    counts: dict[str, int] = {}
    for body in sink.accepted:
        m = re.match(r"([\d,]+) further alerts", body["summary"])
        counts[body["id"]] = int(m.group(1).replace(",", "")) if m else 1
    return sum(counts.values())


async def test_a_leak_flood_while_the_webhook_is_down_is_counted_in_full_after_a_restart(
        tmp_path: Path) -> None:
    """3,000 leaks while alert_sink answers 503: the state file holds at most max_pending
    alerts, which count all 3,000; the next process, the webhook healed, delivers them."""
    log, state = tmp_path / "maillog", tmp_path / "leakwatch.json"
    log.write_text("")
    alert = {"max_pending": 20, "backoff": 0.05, "max_backoff": 0.2, "rate_period": 1}
    async with alert_sink(default=503) as down:
        config = file_config(log, state_file=str(state), alert={"url": down.url, **alert})
        async with watching(config) as w:
            await until(lambda: w.value("leakwatch_last_poll_success_timestamp_seconds"))
            append(log, "".join(leak_line(f"6BF{i:011d}") for i in range(3000)))
            await until(lambda: w.value("sinkhole_leaked_recipients_total") == 3000, 30)
            await until(lambda: len(down.requests) >= 20)
            assert w.watch.outbox is not None and len(w.watch.outbox.pending()) <= 20
    saved = json.loads(state.read_text())["outbox"]
    assert len(saved) <= 20 and sum(a.get("count", 1) for a in saved) == 3000
    assert down.accepted == []
    async with alert_sink() as up:
        config = file_config(log, state_file=str(state), alert={"url": up.url, **alert})
        async with watching(config):
            await until(lambda: accounted(up) >= 3000, 30)
    assert accounted(up) == 3000
    assert json.loads(state.read_text())["outbox"] == []


class GatedIO(VolumeIO):
    """State writes wait for `gate` (a slow volume) before their worker runs; counted."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.writes = 0

    async def write(self, path: Path, payload: bytes, timeout: float | None) -> None:
        self.writes += 1
        await self.gate.wait()
        await super().write(path, payload, timeout)


async def test_saves_asked_for_during_a_write_share_one_more_write(tmp_path: Path) -> None:
    """Twenty saves asked for while one is written cost one more write, not twenty, and it
    holds the state as it was when it started."""
    state = tmp_path / "leakwatch.json"
    watch = LeakWatch(LeakWatchConfig.model_validate(
        file_config(tmp_path / "maillog", state_file=str(state))), Metrics())
    await watch.open()
    watch.state.io = gated = GatedIO()
    first = asyncio.create_task(watch.save())
    await until(lambda: gated.writes == 1)
    later = [asyncio.create_task(watch.save()) for _ in range(20)]
    watch.detector.reported.put("6BF1 late@sinkhole.test", "")
    await asyncio.sleep(0.05)
    gated.gate.set()
    assert all(await asyncio.gather(first, *later))
    assert gated.writes == 2
    assert "6BF1 late@sinkhole.test" in json.loads(state.read_text())["detector"]["reported"]
    await watch.close()


async def test_a_state_over_the_writers_bound_is_shed_counted_and_read_back(
        tmp_path: Path) -> None:
    """Detector memory that would encode past the reader's 64 MiB is shed, oldest first,
    counted and logged: the file stays within the writer's bound and loads again, pending
    alerts and the newest entries in it."""
    state = tmp_path / "leakwatch.json"
    config = file_config(tmp_path / "maillog", state_file=str(state),
                         alert={"url": "http://127.0.0.1:9/alert"})
    metrics = Metrics()
    watch = LeakWatch(LeakWatchConfig.model_validate(config), metrics)
    await watch.open()
    big = "sender-" + "x" * 4000 + "@example.com"
    for i in range(17_000):
        watch.detector.senders.put(f"6BF{i:011d}", big)
    assert watch.outbox is not None
    watch.outbox.submit("sinkhole leak: one", key="leak 6BF1 a@sinkhole.test")
    with capture_logs() as logs:
        assert await watch.save()
    assert state.stat().st_size <= MAX_WRITE_BYTES
    loaded = await StateFile(state, Metrics()).load()
    assert loaded is not None and loaded.detector is not None
    assert loaded.detector.senders[-1] == ("6BF00000016999", big)
    assert [a.summary for a in loaded.outbox] == ["sinkhole leak: one"]
    shed = metrics.registry.get_sample_value("selfcheckd_state_shed_total",
                                             {"section": "detector.senders"})
    assert shed is not None and 17_000 - len(loaded.detector.senders) == shed > 0
    [line] = [e for e in logs if e["event"] == "state_file_shed"]
    assert line["log_level"] == "warning" and line["section"] == "detector.senders"
    await watch.close()


def test_pending_alerts_shed_to_fit_the_bound_are_folded_keeping_their_count() -> None:
    """When even the shed document is too big, pending alerts become one digest counting
    them all (never dropped), and the encoding fits the bound."""
    alerts = [Alert(id=f"id{i}", key=f"leak Q{i} a@sinkhole.test", summary="s" * 900,
                    severity="critical", created_at=1000.0 + i).as_dict() for i in range(2000)]
    document: dict[str, Any] = {"outbox": alerts, "detector": {"senders": [["Q", "a@b"]]}}
    payload, sheds = fit(document, "selfcheckd-leakwatch", limit=200_000)
    assert len(payload) <= 200_000
    saved = json.loads(payload)["outbox"]
    assert len(saved) == 101 and sum(a.get("count", 1) for a in saved) == 2000
    assert saved[-1]["created_at"] == 1100.0 and saved[-1]["admitted"] is False
    assert [(s.section, s.entries) for s in sheds] == [("detector.senders", 1),
                                                        ("outbox", 1900)]
