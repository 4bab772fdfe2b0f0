"""The leak scenarios both the lab test and the scan test play through the sendmail lab.

Phase "clean" sends only as the allowlisted test sender; phase "mixed" adds an unknown sender.
Leaks are recorded from what sendmail told our SMTP client (the queue id in its 250 reply to
DATA) or, for command-line submissions, from its queue file: never from parsing the log.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .leak_lab import SendmailLab, sync_maillog

ALLOWED_SENDER = "qp-test-2026-05@sub.example.com"  # matches the allowlist pattern qp-test-*@*
UNKNOWN_SENDER = "mallory@outside.example.net"
OUTSIDE_RECIPIENT = "someone@elsewhere.example"  # same relay, not the sinkhole domain
MANY_RECIPIENTS = [
    f"nobody-bulk-recipient-{i:02d}-with-a-long-local-part@sinkhole.test" for i in range(36)
]
ODD_RECIPIENTS = ["Nobody-14@SinkHole.TEST", '"a,b"@sinkhole.test']

Leak = tuple[str, str]  # (queue id, recipient as submitted)


@dataclass
class ScenarioLog:
    """The maillog text each phase produced and the leaks it must contain."""

    clean_text: str = ""
    full_text: str = ""
    queue_ids: dict[str, str] = field(default_factory=dict)
    expected_leaks: set[Leak] = field(default_factory=set)


def play_leak_scenarios(lab: SendmailLab) -> ScenarioLog:
    """Defer, accept via queue run, bounce; one and many recipients; both senders; both
    submission paths. Leaves the queue empty and the sinkhole accepting."""
    log = ScenarioLog()
    start = lab.maillog.offset()
    qids = log.queue_ids

    # Phase "clean": the allowlisted sender only. Nothing here is a leak.
    lab.set_mode("defer")
    qids["allowed-deferred"] = lab.send(ALLOWED_SENDER, ["nobody-2@sinkhole.test"])
    lab.set_mode("accept")
    qids["allowed-two"] = lab.send(
        ALLOWED_SENDER, ["nobody-3@sinkhole.test", "nobody-4@sinkhole.test"]
    )
    qids["allowed-cmdline"] = lab.send(
        ALLOWED_SENDER, ["nobody-7@sinkhole.test"], via="command-line"
    )
    lab.queue_run()  # sends allowed-deferred and allowed-cmdline
    lab.set_mode("bounce")
    qids["allowed-bounced"] = lab.send(ALLOWED_SENDER, ["nobody-10@sinkhole.test"])
    lab.set_mode("accept")
    sync_maillog(lab.maillog)
    log.clean_text = lab.maillog.text(start)

    # Phase "mixed": an unknown sender too. Every sinkhole recipient of it leaks.
    lab.set_mode("defer")
    qids["unknown-deferred"] = lab.send(UNKNOWN_SENDER, ["nobody-1@sinkhole.test"])
    log.expected_leaks.add((qids["unknown-deferred"], "nobody-1@sinkhole.test"))
    qids["allowed-deferred-2"] = lab.send(ALLOWED_SENDER, ["nobody-5@sinkhole.test"])
    qids["unknown-cmdline"] = lab.send(
        UNKNOWN_SENDER, ["nobody-6@sinkhole.test"], via="command-line"
    )
    log.expected_leaks.add((qids["unknown-cmdline"], "nobody-6@sinkhole.test"))
    lab.set_mode("accept")
    lab.queue_run()  # the deferred ones go out now: their to= lines repeat, same leaks
    qids["unknown-many"] = lab.send(UNKNOWN_SENDER, [*MANY_RECIPIENTS, *ODD_RECIPIENTS])
    log.expected_leaks |= {
        (qids["unknown-many"], rcpt) for rcpt in [*MANY_RECIPIENTS, *ODD_RECIPIENTS]
    }
    qids["unknown-mixed-domains"] = lab.send(
        UNKNOWN_SENDER, ["nobody-11@sinkhole.test", OUTSIDE_RECIPIENT]
    )
    log.expected_leaks.add((qids["unknown-mixed-domains"], "nobody-11@sinkhole.test"))
    lab.set_mode("bounce")
    qids["unknown-bounced"] = lab.send(UNKNOWN_SENDER, ["nobody-9@sinkhole.test"])
    log.expected_leaks.add((qids["unknown-bounced"], "nobody-9@sinkhole.test"))
    lab.set_mode("accept")
    sync_maillog(lab.maillog)
    log.full_text = lab.maillog.text(start)
    return log
