"""The state file: atomic writes, version 1 still read, unusable files quarantined."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from daemon.metrics import Metrics
from daemon.state import MAX_STATE_BYTES, StateFile, parse_state
from daemon.state_io import DEFAULT_COMMAND, VolumeIO
from tests.waiting import until

WALL = 1795462313.0  # 2026-11-23T19:31:53Z
# A state worker that never answers: a volume that does not either.
HANGS = (sys.executable, "-I", "-S", "-c", "import signal; signal.pause()")


def state_file(path: Path) -> StateFile:
    return StateFile(path, Metrics(), wall=lambda: WALL)


@pytest.mark.parametrize("document", [
    '{"version":1,"cloudwatch":{"seen":5}}',
    '{"version":1,"cloudwatch":[]}',
    '{"version":1,"detector":{"senders":[1,2]}}',
    '{"version":2,"file":{"path":"/x","device":"a","inode":1,"offset":0,"fingerprint":""}}',
    '{"version":2,"outbox":[{"id":"x"}]}',
    '{"version":9}',
    '[1,2,3]',
    '{"version":2,"cursor":',
    # Well-formed JSON, but no value of ours: the watcher would fail every poll on a
    # negative cursor and never expire a NaN alert.
    '{"version":2,"cloudwatch":{"cursor_ms":true}}',
    '{"version":2,"cloudwatch":{"cursor_ms":-5}}',
    '{"version":2,"cloudwatch":{"cursor_ms":5,"seen":[["e1",-1]]}}',
    *(f'{{"version":2,"outbox":[{{"id":"a1","key":"k","summary":"s","severity":"critical",'
      f'"created_at":{when}}}]}}' for when in ("NaN", "Infinity")),
])
async def test_unusable_file_is_moved_aside_with_one_warning(tmp_path: Path, document: str) -> None:
    """Valid JSON of the wrong shape, or no JSON, is quarantined and reads as no state."""
    path = tmp_path / "leakwatch.json"
    path.write_text(document)
    with capture_logs() as logs:
        assert await state_file(path).load() is None
    moved = tmp_path / "leakwatch.json.corrupt-20261123T193153Z"
    assert moved.read_text() == document and not path.exists()
    [warning] = [e for e in logs if e["log_level"] == "warning"]
    assert warning["event"] == "state_file_quarantined"
    assert warning["moved_to"] == str(moved) and warning["path"] == str(path)


async def test_version_1_checkpoint_is_still_read(tmp_path: Path) -> None:
    """A checkpoint written by the previous release loads: cursor, seen ids, detector memory."""
    path = tmp_path / "leakwatch.json"
    path.write_text(json.dumps({
        "version": 1, "cloudwatch": {"cursor_ms": 5, "seen": [["e1", 4]]},
        "detector": {"senders": [["Q1", "a@b"]], "reported": ["Q1 x@sinkhole.test"]}}))
    state = await state_file(path).load()
    assert state is not None and state.cloudwatch is not None and state.detector is not None
    assert state.cloudwatch.cursor_ms == 5 and state.cloudwatch.seen == [("e1", 4)]
    assert state.detector.senders == [("Q1", "a@b")]
    assert state.outbox == []


async def test_temporaries_left_by_killed_saves_are_removed_but_fresh_ones_kept(
    tmp_path: Path,
) -> None:
    """Each kill mid-save left a `.leakwatch.json.*.tmp` as big as the state, for ever; old
    ones go at the next start, a fresh one (another task writing now) stays."""
    path = tmp_path / "leakwatch.json"
    old, fresh = tmp_path / ".leakwatch.json.a1.tmp", tmp_path / ".leakwatch.json.b2.tmp"
    other = tmp_path / ".other.json.c3.tmp"
    for temporary in (old, fresh, other):
        temporary.write_text("{}")
    os.utime(old, (WALL - 3600, WALL - 3600))
    os.utime(fresh, (WALL - 5, WALL - 5))
    os.utime(other, (WALL - 3600, WALL - 3600))
    assert await state_file(path).load() is None
    assert not old.exists() and fresh.exists() and other.exists()


async def test_save_is_atomic_and_round_trips(tmp_path: Path) -> None:
    """save() replaces the file whole (no temp file left) and load() reads it back."""
    path = tmp_path / "leakwatch.json"
    sf = state_file(path)
    document = {"detector": {"senders": [], "reported": ["Q1 a@sinkhole.test"]},
                "outbox": [{"id": "i", "key": "k", "summary": "s", "severity": "critical",
                            "created_at": 1.0}]}
    assert await sf.save(document)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["leakwatch.json"]  # noqa: ASYNC240
    loaded = await sf.load()
    assert loaded is not None and loaded.version == 2
    assert loaded.outbox[0].key == "k" and loaded.outbox[0].attempts == 0


async def test_a_missing_directory_is_created_on_the_first_save(tmp_path: Path) -> None:
    """/var/lib/selfcheckd need not exist on a fresh volume: the first save makes it."""
    path = tmp_path / "lib" / "selfcheckd" / "state.json"
    state = state_file(path)
    assert await state.save({"detector": {"senders": [], "reported": []}})
    assert json.loads(path.read_text())["detector"] == {"senders": [], "reported": []}
    assert path.parent.stat().st_mode & 0o777 == 0o700


async def test_failed_write_is_counted_and_logged_once(tmp_path: Path) -> None:
    """A state file that cannot be written counts every failure and logs the first."""
    metrics = Metrics()
    (tmp_path / "a-file").write_text("")
    sf = StateFile(tmp_path / "a-file" / "leakwatch.json", metrics)
    with capture_logs() as logs:
        assert not await sf.save({})
        assert not await sf.save({})
    assert metrics.registry.get_sample_value(
        "selfcheckd_state_saves_total", {"result": "failed"}) == 2
    assert [e["event"] for e in logs] == ["state_file_write_failed"]
    assert sf.last_error is not None


def test_parse_names_the_bad_section() -> None:
    """The ValueError says where the document went wrong."""
    with pytest.raises(ValueError, match=r"^cloudwatch"):
        parse_state({"version": 1, "cloudwatch": {"seen": 5}})


async def test_times_from_the_future_are_mended_not_the_file_dropped(tmp_path: Path) -> None:
    """A clock that ran ahead, then was put right: the cursor in the future is dropped (read
    from lookback, not nothing for ever) and the alerts from the future age from now, but
    the file is kept, so pending alerts and the detector's memory survive."""
    path = tmp_path / "leakwatch.json"
    alert = {"id": "a1", "key": "k", "summary": "s", "severity": "critical"}
    path.write_text(json.dumps({
        "version": 2, "cloudwatch": {"cursor_ms": int((WALL + 3 * 86400) * 1000)},
        "detector": {"senders": [["Q1", "a@b"]], "reported": []},
        "outbox": [{**alert, "created_at": WALL + 5 * 86400},
                   {**alert, "id": "a2", "created_at": WALL - 60}]}))
    with capture_logs() as logs:
        state = await state_file(path).load()
    assert state is not None and path.exists()
    assert state.cloudwatch is None
    assert [a.created_at for a in state.outbox] == [WALL, WALL - 60]
    assert state.detector is not None and state.detector.senders == [("Q1", "a@b")]
    [warning] = [e for e in logs if e["log_level"] == "warning"]
    assert warning["event"] == "state_file_repaired"
    assert "lookback" in warning["mended"] and "1 pending alert(s)" in warning["mended"]


@pytest.mark.parametrize("kind", ["fifo", "device", "oversized"])
async def test_a_path_that_is_no_regular_file_or_too_big_is_moved_aside(
    tmp_path: Path, kind: str,
) -> None:
    """A FIFO (reading it blocked the start for ever), a link to /dev/zero (read until
    memory ran out) or a file past the size limit is moved aside without being read."""
    path = tmp_path / "leakwatch.json"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "device":
        path.symlink_to("/dev/zero")
    else:
        with path.open("wb") as fh:
            fh.truncate(MAX_STATE_BYTES + 1)  # sparse: costs no disk
    with capture_logs() as logs:
        assert await state_file(path).load() is None
    assert not path.exists()
    [warning] = [e for e in logs if e["log_level"] == "warning"]
    assert warning["event"] == "state_file_quarantined"
    assert ("regular file" if kind != "oversized" else "bytes, more than") in warning["reason"]


@pytest.mark.parametrize("content", [b"\xff\xfe not utf-8 \x80", b"[" * 100_000])
async def test_undecodable_or_absurdly_nested_file_is_quarantined(
    tmp_path: Path, content: bytes,
) -> None:
    """Bytes that are not UTF-8, or JSON nested past the recursion limit, are moved aside too."""
    path = tmp_path / "leakwatch.json"
    path.write_bytes(content)
    assert await state_file(path).load() is None
    assert (tmp_path / "leakwatch.json.corrupt-20261123T193153Z").read_bytes() == content


async def test_a_write_outliving_its_timeout_never_has_a_second_writer_beside_it(
        tmp_path: Path) -> None:
    """A save stuck past its timeout (a volume that does not answer) has its worker killed
    and gone before the next save starts one: never two writers, each with a copy of the
    state; once the volume answers, saves write again. (A worker the kernel holds past
    SIGKILL: tests/integration/test_frozen_volume.py.)"""
    metrics = Metrics()
    path = tmp_path / "state.json"
    store = StateFile(path, metrics, wall=lambda: WALL, io=VolumeIO(HANGS))
    assert not await store.save({"detector": {"reported": ["a"]}}, timeout=0.2)
    first = store.io.stuck()
    assert first is not None
    # The second waits (a moment, within its own timeout) for the first to end, then runs
    # a worker of its own, abandoned in turn.
    assert not await store.save({"detector": {"reported": ["b"]}}, timeout=2)
    second = store.io.stuck()
    assert second is not None and second[0] != first[0]
    assert f"worker pid {second[0]} killed" in str(store.last_error)
    assert metrics.registry.get_sample_value("selfcheckd_state_saves_total",
                                             {"result": "failed"}) == 2
    await until(lambda: store.io.stuck() is None)
    store.io.command = DEFAULT_COMMAND
    assert await store.save({"detector": {"reported": ["c"]}}, timeout=5)
    assert json.loads(path.read_text())["detector"]["reported"] == ["c"]


async def test_a_document_the_reader_would_refuse_is_never_written(tmp_path: Path) -> None:
    """A document encoding past the reader's 64 MiB is not written (a failed save, counted);
    the previous file stays and still loads."""
    path = tmp_path / "state.json"
    metrics = Metrics()
    store = StateFile(path, metrics, wall=lambda: WALL)
    assert await store.save({"detector": {"reported": ["Q1 a@sinkhole.test"]}})
    big = "x" * 4096
    with capture_logs() as logs:
        assert not await store.save(
            {"detector": {"senders": [[f"Q{i}", big] for i in range(17_000)]}})
    assert path.stat().st_size < 1000
    assert [e["event"] for e in logs] == ["state_file_write_failed"]
    assert metrics.registry.get_sample_value("selfcheckd_state_saves_total",
                                             {"result": "failed"}) == 1
    loaded = await state_file(path).load()
    assert loaded is not None and loaded.detector is not None
    assert loaded.detector.reported == ["Q1 a@sinkhole.test"]
