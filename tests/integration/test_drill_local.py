"""The queue-persistence drill against real sendmail tasks over one queue directory.

The sinkhole is the shipped listener (daemon.sinkhole); its mode lives in moto's SSM
(or a file); the drill's local driver starts, stops and replaces the tasks; the
evidence is each task's real `mailq` and the cluster's real mail log.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import boto3
import pytest
from aiohttp import web

from daemon.drill.command import build_drill
from daemon.drill.journal import Journal
from daemon.drill.lab import LAB_BINARIES, drill_lab
from tests.logwatch.aws_fakes import AWS_ENV, moto_server

from .support import require_binaries, require_root

PARAMETER = "/cabal/sinkhole_mode"


@pytest.fixture(scope="module")
def moto_base() -> Iterator[str]:
    yield from moto_server()


@pytest.fixture
def ssm(moto_base: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """moto's SSM with the harness deployed: the mode parameter holds `defer`."""
    require_binaries(*LAB_BINARIES)
    require_root("run sendmail tasks in their own namespaces")
    for key, value in AWS_ENV.items():
        monkeypatch.setenv(key, value)
    client = boto3.client("ssm", endpoint_url=moto_base, region_name="us-east-1")
    client.put_parameter(Name=PARAMETER, Value="defer", Type="String", Overwrite=True)
    return client


def mode(ssm: Any) -> str:
    return str(ssm.get_parameter(Name=PARAMETER)["Parameter"]["Value"])


def step(journal: Journal, number: int) -> dict[str, Any]:
    return next(s for s in journal.as_dict()["steps"] if s["step"] == number)


@contextlib.asynccontextmanager
async def failing_ssm(upstream: str, fail_from_value: str,
                      failures: int | None) -> AsyncIterator[str]:
    """moto's SSM behind a proxy that, from the first PutParameter of `fail_from_value` on,
    answers 500 to `failures` calls (None: to every call)."""
    state = {"failing": False, "left": failures}
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if request.headers.get("X-Amz-Target", "").endswith("PutParameter") and \
                json.loads(body).get("Value") == fail_from_value:
            state["failing"] = True
        if state["failing"] and (state["left"] is None or state["left"] > 0):  # type: ignore[operator]
            if state["left"] is not None:
                state["left"] -= 1  # type: ignore[operator]
            return web.json_response({"__type": "InternalServerError", "message": "down"},
                                     status=500, content_type="application/x-amz-json-1.1")
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() not in ("host", "content-length")}
        async with session.request(request.method, upstream + request.path_qs,
                                   headers=headers, data=body) as resp:
            return web.Response(body=await resp.read(), status=resp.status,
                                content_type=resp.content_type)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()
        await session.close()


async def test_drill_passes_on_a_shared_queue(tmp_path: Path, ssm: Any, moto_base: str) -> None:
    """Two real sendmail tasks over one queue: the drill passes; the same queue id is listed
    by both tasks before and after the replacement; delivered with stat=Sent and an accept
    record at the sinkhole; the parameter ends at defer."""
    async with drill_lab(tmp_path / "lab", ssm=(PARAMETER, moto_base)) as lab:
        journal = await build_drill(lab.config(), lines=sys.stderr).run()
    assert journal.result == "passed", journal.error
    qid = journal.queue_id
    before, after = step(journal, 3)["evidence"]["tasks"], step(journal, 5)["evidence"]["tasks"]
    assert len(before) == 2 and all(e["listed"] == [qid] for e in before.values())
    replacement = step(journal, 4)["evidence"]["replacement"][0]
    assert replacement not in before and after[replacement]["listed"] == [qid]
    assert all(e["listed"] == [qid] for e in after.values())
    sent = step(journal, 8)["evidence"]["log"]["sent"]
    assert len(sent) == 1 and f"{qid}: to=<{journal.recipient}>" in sent[0]
    assert "stat=Sent" in sent[0]
    assert lab.sinkhole.accepted == 1  # the sinkhole took it once
    assert mode(ssm) == "defer"


async def test_unshared_queues_fail_naming_the_task(tmp_path: Path, ssm: Any,
                                                   moto_base: str) -> None:
    """Tasks that do not share the queue directory: exit 1 at step 3, naming the task
    without the message; the parameter is parked at defer."""
    async with drill_lab(tmp_path / "lab", ssm=(PARAMETER, moto_base),
                         shared_queue=False) as lab:
        tree = lab.tree
        tree["drill"]["queue_timeout"] = 8
        journal = await build_drill(lab.config(), lines=sys.stderr).run()
    # The message lands in one task's queue only: step 3 can never pass.
    assert (journal.exit_code, journal.failed_step) == (1, "3 queued")
    tasks = step(journal, 3)["evidence"]["tasks"]
    without = [t for t, e in tasks.items() if not e["listed"]]
    assert len(without) == 1 and f"not listed by task(s) {without[0]}" in (journal.error or "")
    assert journal.cleanup["ok"] is True and mode(ssm) == "defer"


async def test_ssm_failing_at_step_6_aborts_and_cleanup_retries_until_defer(
        tmp_path: Path, ssm: Any, moto_base: str) -> None:
    """SSM answering 500 from step 6's flip on (for a while): exit 3; the cleanup retries
    until defer reads back, and drains nothing it cannot see."""
    async with failing_ssm(moto_base, "accept", failures=6) as proxy, \
            drill_lab(tmp_path / "lab", ssm=(PARAMETER, moto_base)) as lab:
        lab.tree["drill"]["sinkhole"]["endpoint_url"] = proxy
        journal = await build_drill(lab.config(), lines=sys.stderr).run()
    assert (journal.result, journal.exit_code, journal.failed_step) == ("aborted", 3, "6 flip")
    assert journal.cleanup["ok"] is True and mode(ssm) == "defer"
    parked = [a for a in journal.cleanup["actions"] if a.startswith("parked in defer")]
    # Six 500s (two tries per call): the flip and at least the first parking fail.
    assert parked and "attempt 1)" not in parked[0], journal.cleanup["actions"]


async def test_ssm_down_for_good_exits_4(tmp_path: Path, ssm: Any, moto_base: str) -> None:
    """SSM failing from step 6 on for good: the cleanup gives up at cleanup_timeout, exit 4."""
    async with failing_ssm(moto_base, "accept", failures=None) as proxy, \
            drill_lab(tmp_path / "lab", ssm=(PARAMETER, moto_base)) as lab:
        lab.tree["drill"]["sinkhole"]["endpoint_url"] = proxy
        lab.tree["drill"]["sinkhole"]["request_timeout"] = 1
        lab.tree["drill"]["cleanup_timeout"] = 4
        journal = await build_drill(lab.config(), lines=sys.stderr).run()
    assert journal.exit_code == 4 and journal.cleanup["ok"] is False


async def test_sigterm_during_step_5_exits_3_with_the_sinkhole_in_defer(
        tmp_path: Path, ssm: Any, moto_base: str) -> None:
    """`selfcheckd drill` sent SIGTERM while step 5 reads mailq: exit 3 within 30 s, the
    journal (--json) says aborted, and the parameter reads defer."""
    async with drill_lab(tmp_path / "lab", ssm=(PARAMETER, moto_base)) as lab:
        slow = tmp_path / "slow-mailq"
        local = lab.tree["drill"]["local"]
        # Once the test says so, every mailq takes 8 s: step 5 is surely running then.
        local["mailq"] = ["sh", "-c", f'[ -e {slow} ] && sleep 8; exec "$@"', "mailq",
                          *local["mailq"]]
        config = tmp_path / "drill.toml"
        config.write_text(_toml(lab.tree))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "daemon.cli", "drill", "queue-persistence",
            "--config", str(config), "--json", stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        assert proc.stderr is not None
        lines: list[str] = []
        try:
            async with asyncio.timeout(120):
                while True:
                    line = (await proc.stderr.readline()).decode()
                    assert line, "drill ended early:\n" + "".join(lines)
                    lines.append(line)
                    if line.startswith("drill step 3 queued: ok"):
                        slow.touch()
                    if line.startswith("drill step 4 replace: ok"):
                        break
            await asyncio.sleep(1.0)
            proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout=30)
            took = time.monotonic() - signalled
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    journal = json.loads(stdout)
    assert proc.returncode == 3, stderr.decode()
    print(f"SIGTERM to exit: {took:.1f} s")
    assert took < 30
    assert journal["result"] == "aborted" and journal["failed_step"] == "5 survived"
    assert journal["interrupted_by"] == "SIGTERM"
    assert journal["cleanup"]["ok"] is True and mode(ssm) == "defer"


def _toml(tree: dict[str, Any], prefix: str = "") -> str:
    """A small TOML writer for the lab's tree (tables, arrays of tables, scalars, lists)."""
    scalars, tables, arrays = [], [], []
    for key, value in tree.items():
        if isinstance(value, dict):
            tables.append((key, value))
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            arrays.append((key, value))
        else:
            scalars.append(f"{key} = {json.dumps(value)}")
    out = "\n".join(scalars) + "\n"
    for key, value in tables:
        name = f"{prefix}{key}"
        out += f"\n[{name}]\n" + _toml(value, name + ".")
    for key, items in arrays:
        for item in items:
            out += f"\n[[{prefix}{key}]]\n" + _toml(item, f"{prefix}{key}.")
    return out


def test_demo_drill_runs_end_to_end(tmp_path: Path) -> None:
    """`selfcheckd demo --drill` runs the whole drill over two real sendmail daemons and
    one queue directory, printing every step, and exits 0."""
    require_binaries(*LAB_BINARIES)
    require_root("run sendmail tasks in their own namespaces")
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "demo", "--drill", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    steps = [ln for ln in proc.stderr.splitlines() if ln.startswith("drill step")]
    assert len(steps) == 9 and all(": ok" in ln for ln in steps), proc.stderr
    assert "passed (exit 0)" in proc.stderr
    journal = json.loads((tmp_path / "drill" / "journal.json").read_text())
    assert journal["result"] == "passed" and journal["cleanup"]["ok"] is True
