"""`selfcheckd demo`: what the README tells a newcomer to type works as printed."""

from __future__ import annotations

import asyncio
import os
import re
import signal
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


async def test_the_banner_prints_commands_that_work_as_shown_from_anywhere(
    tmp_path: Path,
) -> None:
    """The banner's leak and check commands run as printed, also from another directory
    than the demo's (scripts/demo changes into the repository): the check passes."""
    workdir, elsewhere = tmp_path / "repo", tmp_path / "elsewhere"
    workdir.mkdir()
    elsewhere.mkdir()
    exe = os.path.relpath(SELFCHECKD, workdir)  # noqa: ASYNC240 - pure path arithmetic
    proc = await asyncio.create_subprocess_exec(
        exe, "demo", "--duration", "30", "--listen", "127.0.0.1:0", "--no-inject-leak",
        "--interval", "600", cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    banner = ""
    while "Ctrl-C" not in banner:
        line = await asyncio.wait_for(proc.stderr.readline(), timeout=60)
        assert line, banner
        banner += line.decode()
    try:
        [leak] = re.findall(r"^ +(\S+ demo --print-leak-line >> \S+)$", banner, re.M)
        [check] = re.findall(r"^  by hand: +(\S+ check --config \S+ --verbose)$", banner, re.M)
        for command in (leak, check):
            shell = await asyncio.create_subprocess_shell(
                command, cwd=elsewhere, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            out, err = await asyncio.wait_for(shell.communicate(), timeout=60)
            assert shell.returncode == 0, (command, out.decode(), err.decode())
        assert b"selfcheck_completed success=true" in err
    finally:
        proc.send_signal(signal.SIGINT)
        await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 0
    maillog = (workdir / ".demo" / "maillog").read_text()
    assert maillog.count("@sinkhole.test") == 1  # the line the banner's command appended
    assert (workdir / ".demo" / "check.toml").stat().st_mode & 0o777 == 0o600


async def test_a_second_demo_leaves_the_running_ones_files_alone(tmp_path: Path) -> None:
    """A second demo in the same work directory (on the first one's port, or on a free one)
    exits 3 naming the running demo, before it truncates the maillog or rewrites check.toml;
    once the first has stopped, a demo starts there again."""
    workdir = tmp_path / "demo"
    common = ["demo", "--workdir", str(workdir), "--no-inject-leak", "--interval", "600"]
    first = await asyncio.create_subprocess_exec(
        SELFCHECKD, *common, "--listen", "127.0.0.1:0", "--duration", "60",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert first.stderr is not None
    banner = ""
    while "Ctrl-C" not in banner:
        line = await asyncio.wait_for(first.stderr.readline(), timeout=60)
        assert line, banner
        banner += line.decode()
    try:
        [port] = re.findall(r"metrics: +http://127\.0\.0\.1:(\d+)/metrics", banner)
        maillog, check = workdir / "maillog", workdir / "check.toml"
        with maillog.open("a") as fh:
            fh.write("the running demo's line\n")
        before_log, before_check = maillog.read_text(), check.read_text()
        for listen in (f"127.0.0.1:{port}", "127.0.0.1:0"):
            second = await asyncio.create_subprocess_exec(
                SELFCHECKD, *common, "--listen", listen, "--duration", "5",
                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            _, err = await asyncio.wait_for(second.communicate(), timeout=60)
            assert second.returncode == 3, err.decode()
            assert err.decode().startswith(
                f"selfcheckd demo: another demo (pid {first.pid}) is running with "
                f"--workdir {workdir}; its maillog and check.toml are left alone."), err
            # The running demo goes on appending; nothing before was lost.
            assert maillog.read_text().startswith(before_log)
            assert check.read_text() == before_check
    finally:
        first.send_signal(signal.SIGINT)
        await asyncio.wait_for(first.communicate(), timeout=60)
    assert first.returncode == 0
    again = await asyncio.create_subprocess_exec(
        SELFCHECKD, *common, "--listen", "127.0.0.1:0", "--duration", "1",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, err = await asyncio.wait_for(again.communicate(), timeout=60)
    assert again.returncode == 0, err.decode()
    assert "the running demo's line" not in (workdir / "maillog").read_text()
