"""The state file's I/O in worker processes: deadlines, abandonment, no write over an unread file.

A worker that never answers stands for a volume that hangs (tests/integration/
test_frozen_volume.py freezes a real one, which needs root): the same spawn, pipes,
deadline and SIGKILL run as against a stalled EFS mount.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from daemon.metrics import Metrics
from daemon.state import StateFile, StateUnreadable
from daemon.state_io import DEFAULT_COMMAND, VolumeIO
from daemon.state_worker import _json
from tests.fake_time import FakeClock
from tests.logwatch.harness import advance_until, until, watching
from tests.logwatch.receiver import alert_sink

# A worker that takes its arguments and never answers: the volume does not either.
HANGS = (sys.executable, "-I", "-S", "-c", "import signal; signal.pause()")
LEAK = ("2026-11-23T19:31:53.567357+00:00 vm sendmail[11287]: {qid}: to=<{rcpt}>, "
        "delay=00:00:00, xdelay=00:00:00, mailer=smtp, pri=30237, relay=25, dsn=5.1.2, "
        "stat=Deferred\n")


def failed_saves(metrics: Metrics) -> float:
    return metrics.registry.get_sample_value(
        "selfcheckd_state_saves_total", {"result": "failed"}) or 0.0


async def test_a_save_the_volume_never_answers_is_abandoned_at_its_deadline(
    tmp_path: Path,
) -> None:
    """A write with no answer fails at its deadline, counted and logged, its worker killed
    and left behind; the next save, once the volume answers, succeeds and says so."""
    metrics = Metrics()
    path = tmp_path / "state.json"
    state = StateFile(path, metrics, io=VolumeIO(HANGS))
    with capture_logs() as logs:
        assert not await state.save({"outbox": []}, timeout=0.3)
        await until(lambda: state.io.stuck() is None)  # SIGKILL ends a sleeping worker
        state.io.command = DEFAULT_COMMAND
        assert await state.save({"outbox": []}, timeout=10)
    assert failed_saves(metrics) == 1
    events = {e["event"]: e for e in logs}
    assert "not written within 0.3s; the write was abandoned (worker pid" in (
        events["state_file_write_failed"]["error"])
    assert "state_file_writer_abandoned" in events and "state_file_write_recovered" in events
    assert json.loads(path.read_text()) == {"version": 2, "outbox": []}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]  # noqa: ASYNC240


async def test_a_state_file_the_volume_does_not_hand_over_is_never_written_over(
    tmp_path: Path,
) -> None:
    """A load with no answer by its deadline is StateUnreadable, and until a load succeeds
    no save replaces the file (its pending alerts would be lost to a fresh state)."""
    path = tmp_path / "state.json"
    kept = json.dumps({"version": 2, "outbox": [
        {"id": "a1", "key": "k", "summary": "s", "severity": "critical", "created_at": 1.0}]})
    path.write_text(kept)
    metrics = Metrics()
    state = StateFile(path, metrics, io=VolumeIO(HANGS))
    with pytest.raises(StateUnreadable, match=r"no answer from the state volume within 0\.3s"):
        await state.load(timeout=0.3)
    state.io.command = DEFAULT_COMMAND
    assert not await state.save({"outbox": []}, timeout=10)
    assert "could not be read at start" in str(state.last_error)
    assert path.read_text() == kept
    loaded = await state.load()
    assert loaded is not None and [a.key for a in loaded.outbox] == ["k"]
    assert await state.save({"outbox": []}, timeout=10)


async def test_the_watcher_reads_nothing_until_its_state_file_is_read(tmp_path: Path) -> None:
    """Started while the volume does not hand the state file over, the leakwatch-state
    component is degraded (reason and counter) and nothing is read; once the file is read
    the watcher resumes from the saved position (a leak written meanwhile is found) and
    delivers the alert left pending."""
    log, path = tmp_path / "maillog", tmp_path / "state.json"
    log.write_text("")
    config: dict[str, Any] = {
        "source": "file", "state_file": str(path),
        "file": {"path": str(log), "poll_interval": 0.02}}
    async with alert_sink(default=503) as down:
        config["alert"] = {"url": down.url}
        async with watching(config) as w:
            await until(lambda: w.value("leakwatch_last_poll_success_timestamp_seconds"))
            with log.open("a") as fh:
                fh.write(LEAK.format(qid="6ANJUQna010773", rcpt="first@sinkhole.test"))
            await until(lambda: len(down.requests) >= 1)
    saved = path.read_bytes()
    with log.open("a") as fh:
        fh.write(LEAK.format(qid="6ANJUTfa010820", rcpt="meanwhile@sinkhole.test"))
    clock = FakeClock()
    async with alert_sink() as up:
        config["alert"] = {"url": up.url}
        with capture_logs() as logs:
            async with watching(config, state_io=VolumeIO(HANGS), read_timeout=0.3,
                                health_clock=clock, sleep=clock.sleep) as w:
                await advance_until(
                    clock, lambda: w.value("leakwatch_errors_total", reason="state_read") >= 2,
                    limit=60)
                assert w.up("leakwatch-state") == 0
                assert "leakwatch-source" not in w.supervisor.names()
                assert w.supervisor.problems() == {}  # degraded, not dead: no restart loop
                code, reason = w.supervisor.degraded()["leakwatch-state"]
                assert code == "state_read" and "state not read" in reason
                assert w.value("maillog_lines_total", kind="to") == 0
                assert path.read_bytes() == saved
                w.watch.state.io.command = DEFAULT_COMMAND  # the volume answers again
                await advance_until(clock, lambda: len(up.accepted) == 2, limit=120)
    summaries = sorted(body["summary"] for body in up.accepted)
    assert "first@sinkhole.test" in summaries[0] and "meanwhile@sinkhole.test" in summaries[1]
    events = [e["event"] for e in logs]
    assert events.count("state_file_unreadable") == 1 and "state_file_read" in events
    detected = [e["recipient"] for e in logs if e["event"] == "sinkhole_leak_detected"]
    assert detected == ["meanwhile@sinkhole.test"]  # the first one was known already


@given(st.text(), st.one_of(st.none(), st.integers(), st.booleans()))
def test_a_worker_answer_is_json_whatever_its_text(text: str, value: int | bool | None) -> None:
    """A worker's answer (any error text: quotes, backslashes, control characters) is
    JSON the daemon reads back as written; the worker builds it without importing json."""
    answer = {"ok": False, "error": text, "errno": value}
    assert json.loads(_json(answer)) == answer
