"""The sendmail lab produces the real maillog shapes the leak watcher must parse."""

from __future__ import annotations

import os
import re
from pathlib import Path

from .leak_lab import SendmailLab
from .scenarios import ALLOWED_SENDER, UNKNOWN_SENDER, play_leak_scenarios

SAMPLE = Path(__file__).parent / "data" / "real-maillog-sample.log"
REFRESH_SAMPLE = "SELFCHECKD_REFRESH_MAILLOG_SAMPLE"


def test_scenarios_produce_every_line_shape(sendmail_lab: SendmailLab) -> None:
    """Defer, queue-run accept, bounce+DSN, [more] continuations, quoted and mixed-case
    recipients and bare command-line addresses all appear in the real maillog."""
    played = play_leak_scenarios(sendmail_lab)
    text = played.full_text
    qids = played.queue_ids

    assert f"from=<{ALLOWED_SENDER}>" in text
    assert f"from=<{UNKNOWN_SENDER}>" in text
    assert f"from={UNKNOWN_SENDER}," in text  # command line: bare sender

    def logged(key: str, rest: str) -> bool:
        return re.search(rf"{qids[key]}: {rest}", text) is not None

    assert logged("unknown-cmdline", r"to=nobody-6@sinkhole\.test, .*stat=queued")
    assert logged(
        "unknown-deferred",
        r"to=<nobody-1@sinkhole\.test>, .*stat=Deferred: 421 4\.3\.2 Service temporarily unavail",
    )
    assert logged("unknown-deferred", r"to=<nobody-1@sinkhole\.test>, .*stat=Sent")
    assert logged("unknown-bounced", r"to=<nobody-9@sinkhole\.test>, .*stat=User unknown")
    assert logged("unknown-bounced", r"\w+: DSN: User unknown")
    many = [line for line in text.splitlines() if f"{qids['unknown-many']}: to=" in line]
    assert len(many) >= 2
    assert all(", [more], " in line for line in many[:-1])
    assert "<Nobody-14@SinkHole.TEST>" in text
    assert '<"a,b"@sinkhole.test>' in text
    assert sendmail_lab.sendmail.queue_ids() == []

    if os.environ.get(REFRESH_SAMPLE) == "1":
        SAMPLE.write_text(text)


def test_sinkhole_modes_reach_sendmail(sendmail_lab: SendmailLab) -> None:
    """A deferred message stays queued until the sinkhole accepts and a queue run retries it."""
    sendmail_lab.set_mode("defer")
    qid = sendmail_lab.send(ALLOWED_SENDER, ["nobody-20@sinkhole.test"])
    assert qid in sendmail_lab.sendmail.queue_ids()
    sendmail_lab.set_mode("accept")
    sendmail_lab.queue_run()
    sendmail_lab.wait_for_log(rf"{qid}: to=<nobody-20@sinkhole\.test>, .*stat=Sent", what="Sent")
    assert sendmail_lab.sendmail.queue_ids() == []
    assert any("nobody-20@sinkhole.test" in r.recipients for r in sendmail_lab.sinkhole.received())


def test_committed_sample_is_real_output() -> None:
    """The committed sample maillog is sendmail's own output (regenerate with
    SELFCHECKD_REFRESH_MAILLOG_SAMPLE=1)."""
    text = SAMPLE.read_text()
    assert "sendmail[" in text
    assert ", [more], " in text
