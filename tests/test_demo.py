"""`selfcheckd demo`: what the README tells a newcomer to type works as printed."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

from daemon.demo import leak_line
from daemon.logwatch.detector import LeakDetector
from daemon.logwatch.pipeline import LineProcessor

ROOT = Path(__file__).resolve().parents[1]
SELFCHECKD = Path(sys.executable).with_name("selfcheckd")


def test_every_printed_leak_line_is_a_new_leak() -> None:
    """Each --print-leak-line has its own queue id and recipient, so each one alerts."""
    processor = LineProcessor(LeakDetector(["sinkhole.test"], []))
    lines = [leak_line() for _ in range(20)]
    findings = [f for line in lines for f in processor.feed(line)]
    assert len(findings) == 20
    assert len({(f.queue_id, f.recipient) for f in findings}) == 20
    assert all(re.fullmatch(r"[0-9A-Za-z]{8}\d{6}", f.queue_id) for f in findings)


async def test_the_banner_prints_a_command_that_works_as_shown(tmp_path: Path) -> None:
    """The banner's `... demo --print-leak-line >> maillog` runs as printed, from where we are."""
    exe = os.path.relpath(SELFCHECKD, tmp_path)  # noqa: ASYNC240 - pure path arithmetic
    proc = await asyncio.create_subprocess_exec(
        exe, "demo", "--duration", "2", "--listen", "127.0.0.1:0", "--no-inject-leak",
        "--interval", "60", cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 0, err.decode()
    [command] = re.findall(r"^ +(\S+ demo --print-leak-line >> \S+)$", err.decode(), re.M)
    assert command.startswith(f"{exe} demo")
    shell = await asyncio.create_subprocess_shell(command, cwd=tmp_path)
    assert await asyncio.wait_for(shell.wait(), timeout=60) == 0
    maillog = (tmp_path / ".demo" / "maillog").read_text().splitlines()
    assert [line for line in maillog if "@sinkhole.test" in line] == maillog[-1:]
