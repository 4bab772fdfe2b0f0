"""`selfcheckd scan --file --json` on a maillog real sendmail wrote finds exactly the leaks."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from .leak_lab import SendmailLab
from .scenarios import play_leak_scenarios

REPO = Path(__file__).resolve().parents[2]
SCAN_TIMEOUT = 60


def selfcheckd_command() -> list[str]:
    """The venv's console script, or the module when the script is not installed."""
    script = Path(sys.executable).parent / "selfcheckd"
    if script.exists():
        return [str(script)]
    found = shutil.which("selfcheckd")
    return [found] if found else [sys.executable, "-m", "daemon.cli"]


def scan(maillog: Path) -> tuple[int, list[dict[str, Any]]]:
    """Run the scan as a user would (defaults: sinkhole.test watched, qp-test-*@* allowed)."""
    proc = subprocess.run(
        [*selfcheckd_command(), "scan", "--file", str(maillog), "--json"],
        capture_output=True, text=True, timeout=SCAN_TIMEOUT, cwd=REPO, check=False,
        env={"PATH": "/usr/bin:/bin", "HOME": str(maillog.parent)},  # no SELFCHECKD_* config
    )
    assert proc.returncode in (0, 1), f"scan exited {proc.returncode}: {proc.stderr}"
    leaks = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    return proc.returncode, leaks


def test_scan_reports_exactly_the_unknown_senders_sinkhole_recipients(
    sendmail_lab: SendmailLab, tmp_path: Path
) -> None:
    """Every (queue id, recipient) of the unknown sender is one leak, across defer, queue-run,
    bounce, [more] lines and command-line mail; the allowlisted sender and DSNs are not."""
    played = play_leak_scenarios(sendmail_lab)
    maillog = tmp_path / "maillog"
    maillog.write_text(played.full_text)

    status, leaks = scan(maillog)

    assert status == 1
    for leak in leaks:
        assert {"queue_id", "recipient", "sender", "stat"} <= leak.keys(), leak
        assert leak["sender"] == "mallory@outside.example.net", leak
    reported = [(leak["queue_id"], leak["recipient"]) for leak in leaks]
    assert len(reported) == len(set(reported)), "a (queue id, recipient) was reported twice"
    assert set(reported) == played.expected_leaks


def test_scan_of_allowlisted_traffic_finds_no_leak(
    sendmail_lab: SendmailLab, tmp_path: Path
) -> None:
    """Deferred, sent and bounced mail from qp-test-2026-05@sub.example.com is no leak: exit 0."""
    played = play_leak_scenarios(sendmail_lab)
    maillog = tmp_path / "maillog"
    maillog.write_text(played.clean_text)
    assert "stat=Deferred" in played.clean_text  # the clean phase did exercise the sinkhole

    status, leaks = scan(maillog)

    assert (status, leaks) == (0, [])
