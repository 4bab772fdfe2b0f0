"""The state file on a volume that freezes for real (fsfreeze): saves give up, the daemon exits.

A write to a frozen file system waits in the kernel (D state) and no signal ends it
until the thaw, as on a stalled EFS hard mount. A save's thread stuck like that kept
`selfcheckd run` from exiting after SIGTERM; a save's worker process stuck like that
is abandoned and holds only itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from daemon.metrics import Metrics
from daemon.state import StateFile
from tests.logwatch.receiver import alert_sink
from tests.waiting import until

from .frozen_volume import FrozenVolume, stuck_in_kernel

LEAK = ("2026-11-23T19:31:53.567357+00:00 vm sendmail[11287]: 6ANJVrcF011285: "
        "to=<nobody@sinkhole.test>, delay=00:00:00, mailer=smtp, pri=30237, relay=25, "
        "dsn=4.0.0, stat=Deferred\n")


@pytest.fixture
def volume(tmp_path: Path) -> Iterator[FrozenVolume]:
    mounted = FrozenVolume.start(tmp_path)
    yield mounted
    mounted.stop()


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def family() -> list[int]:
    """This process and its children."""
    return [os.getpid(), *children(os.getpid())]


async def test_saves_on_a_frozen_volume_give_up_by_their_deadline_with_one_writer_at_most(
    volume: FrozenVolume,
) -> None:
    """Each save on a frozen volume fails by its deadline, counted; none leaves a thread of
    the daemon stuck in the kernel (each left one, and the process could not exit), and
    one stuck writer at most stays behind; after the thaw, saves succeed again."""
    metrics = Metrics()
    state = StateFile(volume.mount / "state.json", metrics)
    assert await state.save({"outbox": []}, timeout=10)
    try:
        with volume.frozen(), capture_logs() as logs:
            for _ in range(3):
                assert not await state.save({"outbox": []}, timeout=0.5)
            ours_stuck = stuck_in_kernel(os.getpid())
            stuck_children = [pid for pid in children(os.getpid()) if stuck_in_kernel(pid)]
    finally:  # thawed: whatever was stuck ends
        await until(lambda: not any(stuck_in_kernel(pid) for pid in family()), timeout=30)
    assert not ours_stuck
    assert len(stuck_children) == 1
    assert metrics.registry.get_sample_value(
        "selfcheckd_state_saves_total", {"result": "failed"}) == 3
    [failed] = [e for e in logs if e["event"] == "state_file_write_failed"]
    assert "not written within 0.5s" in failed["error"]
    assert [e["event"] for e in logs].count("state_file_writer_abandoned") == 1
    assert await state.save({"outbox": []}, timeout=10)


@pytest.fixture
async def failing_sink() -> AsyncIterator[str]:
    async with alert_sink(default=503) as sink:
        yield sink.url


async def test_sigterm_with_the_state_volume_frozen_exits_within_the_budget(
    volume: FrozenVolume, tmp_path: Path, failing_sink: str,
) -> None:
    """SIGTERM while a save is stuck on a frozen state volume: `selfcheckd run` exits 0
    within shutdown_grace + 5 s, saying the state was not saved and what was pending (it
    logged selfcheckd_stopped and then could not exit until the volume thawed)."""
    maillog, state = tmp_path / "maillog", volume.mount / "state.json"
    maillog.write_text("")
    config, log = tmp_path / "c.toml", tmp_path / "daemon.log"
    config.write_text(
        'shutdown_grace = 5\n[server]\nlisten = "127.0.0.1:0"\n'
        f'[leakwatch]\nsource = "file"\nstate_file = "{state}"\n'
        f'file = {{ path = "{maillog}", poll_interval = 0.1 }}\n'
        f'alert = {{ url = "{failing_sink}", backoff = 0.2 }}\n')
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "daemon.cli", "run", "--config", str(config),
            stdout=out, stderr=out)
    took: float | None = None
    try:
        await until(lambda: state.exists() or proc.returncode is not None, timeout=30)
        assert proc.returncode is None, log.read_text()
        with volume.frozen():
            with maillog.open("a") as fh:
                fh.write(LEAK)  # found: saved at once, and that save is stuck

            def save_stuck() -> bool:
                return stuck_in_kernel(proc.pid) or any(
                    stuck_in_kernel(pid) for pid in children(proc.pid))

            await until(save_stuck, timeout=30)
            proc.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            try:
                await asyncio.wait_for(proc.wait(), timeout=5 + 5 + 5)
                took = time.monotonic() - sent
            except TimeoutError:
                pass
            worker = re.search(r"stuck_worker=(\d+)", log.read_text())
            worker_still_stuck = worker is not None and stuck_in_kernel(int(worker[1]))
    finally:
        if proc.returncode is None:  # thawed by now: it can go
            proc.kill()
            await proc.wait()
    text = log.read_text()
    assert took is not None, f"still running 15 s after SIGTERM:\n{text}"
    assert proc.returncode == 0, text
    assert took < 5 + 5, text
    assert worker_still_stuck, text  # the kernel held the writer, not the daemon
    assert "leakwatch_state_not_saved" in text and "pending_alerts=1" in text, text
    assert text.rstrip().splitlines()[-1].startswith("selfcheckd_stopped"), text


async def test_a_start_on_a_frozen_volume_is_not_held_by_it(
    volume: FrozenVolume, tmp_path: Path,
) -> None:
    """Started with its state volume frozen (a killed save's temporary to remove there),
    `selfcheckd run` says it cannot read the state file, starts anyway and stops on SIGTERM
    (the start hung in the kernel for good: no start, no stop, not even by SIGKILL)."""
    maillog, state = tmp_path / "maillog", volume.mount / "state.json"
    maillog.write_text("")
    state.write_text('{"version": 2}')
    stale = volume.mount / ".state.json.a1b2c3.tmp"
    stale.write_text("{}")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    config, log = tmp_path / "c.toml", tmp_path / "daemon.log"
    config.write_text(
        'shutdown_grace = 5\n[server]\nlisten = "127.0.0.1:0"\n'
        f'[leakwatch]\nsource = "file"\nstate_file = "{state}"\n'
        f'file = {{ path = "{maillog}", poll_interval = 0.1 }}\n')
    took: float | None = None
    started = False
    try:
        with volume.frozen():
            with log.open("wb") as out:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "daemon.cli", "run", "--config", str(config),
                    stdout=out, stderr=out)
            with contextlib.suppress(TimeoutError):
                await until(lambda: "selfcheckd_started" in log.read_text()
                            or proc.returncode is not None, timeout=30)
                started = True
                proc.send_signal(signal.SIGTERM)
                sent = time.monotonic()
                await asyncio.wait_for(proc.wait(), timeout=15)
                took = time.monotonic() - sent
    finally:
        if proc.returncode is None:  # thawed by now: it can go
            proc.kill()
            await proc.wait()
    text = log.read_text()
    assert started, f"not started 30 s after launch:\n{text}"
    assert took is not None, f"still running 15 s after SIGTERM:\n{text}"
    assert proc.returncode == 0, text
    assert "state_file_unreadable" in text and "selfcheckd_started" in text, text
    assert state.read_text() == '{"version": 2}'  # never written over unread
