"""The leak watcher's lab: private rsyslogd -> maillog, private sendmail -> SMTP sinkhole.

sendmail routes `sinkhole.test` (and, so DSNs never need DNS, every other domain) to the
sinkhole on 127.0.0.2:25 through its mailertable; the test switches the sinkhole between
defer, accept and bounce and reads back the real maillog lines sendmail wrote.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from .maillog import MailLog
from .sendmail import Sendmail
from .sinkhole import SINKHOLE_HOST, Mode, Sinkhole
from .support import wait_until

SINKHOLE_DOMAIN = "sinkhole.test"
LOG_WAIT = 20.0

Via = Literal["smtp", "command-line"]


class SendmailLab:
    """What a leak-watcher test drives: send, switch the sinkhole, run the queue, read the log."""

    def __init__(self, maillog: MailLog, sendmail: Sendmail, sinkhole: Sinkhole) -> None:
        self.maillog = maillog
        self.sendmail = sendmail
        self.sinkhole = sinkhole
        self.domain = SINKHOLE_DOMAIN
        self._since = maillog.offset()

    @classmethod
    def start(cls, directory: Path, maillog: MailLog) -> SendmailLab:
        sinkhole = Sinkhole(SINKHOLE_DOMAIN)
        sinkhole.start()
        route = f"smtp:[{SINKHOLE_HOST}]"
        sendmail_dir = directory / "sendmail-leak"
        sendmail_dir.mkdir()
        try:
            sendmail = Sendmail(sendmail_dir, mailertable={SINKHOLE_DOMAIN: route, ".": route})
            sendmail.start()
        except BaseException:
            sinkhole.stop()
            raise
        return cls(maillog, sendmail, sinkhole)

    def stop(self) -> None:
        self.sendmail.stop()
        self.sinkhole.stop()

    def reset(self) -> None:
        """Start a test from a clean slate: sinkhole accepting, queue drained, log marked."""
        self.set_mode("accept")
        if self.sendmail.queue_ids():
            self.queue_run()
        wait_until(lambda: True if not self.sendmail.queue_ids() else None,
                   timeout=LOG_WAIT, what="the sendmail lab queue to drain")
        sync_maillog(self.maillog)
        self._since = self.maillog.offset()

    def set_mode(self, mode: Mode) -> None:
        """How the sinkhole answers sinkhole.test recipients: defer, accept or bounce."""
        self.sinkhole.set_mode(mode)

    def send(
        self,
        sender: str,
        recipients: Sequence[str],
        *,
        via: Via = "smtp",
        subject: str = "selfcheckd integration lab",
    ) -> str:
        """Submit one message; return its queue id as sendmail reported it.

        Over SMTP, delivery is attempted before this returns and its log lines are awaited.
        From the command line the message is only queued (`stat=queued`); `queue_run` sends it.
        """
        body = f"From: <{sender}>\nSubject: {subject}\n\nlab message\n"
        if via == "command-line":
            qid = self.sendmail.submit_command_line(sender, recipients, body)
            self.wait_for_log(rf"{qid}: to=.*stat=queued", what=f"{qid} queued")
            return qid
        qid = self.sendmail.submit_smtp(sender, recipients, body)
        attempt = self.wait_for_log(rf"{qid}: to=.*stat=.*", what=f"a delivery attempt of {qid}")
        if not re.search(r"stat=(Sent|Deferred)", attempt):
            self._wait_for_dsn(qid)
        return qid

    def _wait_for_dsn(self, qid: str) -> None:
        """A bounce makes sendmail send a DSN after it answered us: wait until that is done
        too, so no half-finished delivery spills into the next test."""
        line = self.wait_for_log(rf"{qid}: \w+: DSN: ", what=f"the DSN for {qid}")
        dsn_qid = line.split(": ")[1]
        self.wait_for_log(rf"{dsn_qid}: to=.*stat=", what=f"delivery of DSN {dsn_qid}")

    def queue_run(self) -> None:
        """`sendmail -q -OMinQueueAge=0`, then wait until each queued message logged a retry."""
        queued = self.sendmail.queue_ids()
        since = self.maillog.offset()
        self.sendmail.queue_run()  # returns once it has forked the runner: wait for its lines
        for qid in queued:
            self.wait_for_log(rf"{qid}: to=.*stat=", what=f"a retry of {qid}", since=since)

    def queue_return(self) -> None:
        """A queue run past every message's queue lifetime; wait for each return DSN's
        delivery, so nothing of it spills into the next test."""
        queued = self.sendmail.queue_ids()
        since = self.maillog.offset()
        self.sendmail.queue_run_returning()
        for qid in queued:
            line = self.wait_for_log(rf"{qid}: \w+: DSN: Cannot send message for .*",
                                     what=f"the return of {qid}", since=since)
            dsn_qid = line.split(": ")[1]
            self.wait_for_log(rf"{dsn_qid}: to=.*stat=", what=f"delivery of DSN {dsn_qid}",
                              since=since)

    def wait_for_log(self, pattern: str, *, what: str, since: int | None = None) -> str:
        """Wait until a maillog line matches `pattern`; return that line."""
        regex = re.compile(pattern)

        def probe() -> str | None:
            text = self.maillog.text(self._since if since is None else since)
            found = regex.search(text)
            return None if found is None else found.group(0)

        return wait_until(probe, timeout=LOG_WAIT, what=f"{what} in {self.maillog.path}")

    def maillog_text(self) -> str:
        """The maillog lines written since this test took the lab (see `reset`)."""
        return self.maillog.text(self._since)

    def session_maillog_text(self) -> str:
        """Every maillog line written during this pytest session."""
        return self.maillog.text()


def sync_maillog(maillog: MailLog) -> None:
    """Barrier: log a marker through /dev/log and wait for it, so every line syslog took
    before it is in the file (rsyslog writes one socket's messages in order)."""
    marker = maillog.log_marker()
    wait_until(lambda: True if marker in maillog.text() else None,
               timeout=LOG_WAIT, what=f"marker {marker} in {maillog.path}")
