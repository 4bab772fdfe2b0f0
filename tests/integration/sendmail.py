"""A private sendmail 8.17 daemon: own .cf (daemon.embedded.sendmail_config), queue and port.

It listens on 127.0.0.1 only, logs at LogLevel 9 through syslog, and routes mail with a
mailertable, so a test decides where each domain goes (a sinkhole, Dovecot's LMTP port).
Deliveries are interactive: the log is complete when the SMTP session's QUIT returns.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from daemon.embedded.sendmail_config import (
    LMTP_TCP_MAILER,
    SendmailConfig,
    queue_ids,
    submit_smtp,
    write_config,
)

from .support import binary, free_port, run, start_daemon, stop_daemon, tail, wait_for_port

__all__ = ["LMTP_TCP_MAILER", "Sendmail"]


class Sendmail:
    """One private sendmail daemon and the commands that act on its queue."""

    def __init__(
        self,
        directory: Path,
        *,
        mailertable: Mapping[str, str],
        mailer_definitions: str = "",
        hostname: str = "smtp-out.lab.test",
    ) -> None:
        self.directory = directory
        self.host = "127.0.0.1"
        self.port = free_port()
        self.queue = directory / "queue"
        self.config = SendmailConfig(
            directory=directory, queue_dir=self.queue, listen_port=self.port,
            mailertable=mailertable, mailer_definitions=mailer_definitions,
            domain_name=hostname, label="selfcheckd integration lab",
        )
        self.cf = write_config(self.config)
        self._process: subprocess.Popen[bytes] | None = None

    def _cmd(self) -> list[str]:
        return [binary("sendmail"), "-C", str(self.cf)]

    def start(self) -> None:
        """Run the daemon in the foreground (-bD) so we own its process; wait for the port."""
        stderr_path = self.directory / "sendmail.stderr"
        self._process = start_daemon([*self._cmd(), "-bD"], stderr_path)
        try:
            wait_for_port(self.host, self.port, timeout=20, what="sendmail")
        except TimeoutError as exc:
            self.stop()
            raise RuntimeError(f"{exc}\n{tail(stderr_path)}") from exc

    def stop(self) -> None:
        """Stop the daemon; delivery children it forked finish on their own."""
        stop_daemon(self._process)

    def submit_smtp(self, sender: str, recipients: Sequence[str], body: str) -> str:
        """Submit over SMTP; return the queue id sendmail put in its 250 reply to DATA."""
        return submit_smtp(self.host, self.port, sender, recipients, body)

    def submit_command_line(self, sender: str, recipients: Sequence[str], body: str) -> str:
        """Submit with the `sendmail` command (bare addresses), queue only; return its queue id.

        The command prints no queue id, so we take the one queue file that appeared for it.
        """
        before = set(self.queue_ids())
        run([*self._cmd(), "-odq", "-oi", "-f", sender, "--", *recipients], stdin=body)
        new = [qid for qid in self.queue_ids() if qid not in before
               and f"\nS{sender}\n" in f"\n{(self.queue / f'qf{qid}').read_text(errors='replace')}"]
        if len(new) != 1:
            raise AssertionError(f"expected one new queue file for {sender}, found {new}")
        return new[0]

    def queue_ids(self) -> list[str]:
        """Queue ids of the messages waiting in the queue (one qf file each)."""
        return queue_ids(self.queue)

    def queue_run(self) -> None:
        """Retry every queued message now, in the foreground, ignoring MinQueueAge."""
        run([*self._cmd(), "-q", "-OMinQueueAge=0"], timeout=60)

    def queue_run_returning(self) -> None:
        """A queue run in which every message has outlived its queue lifetime
        (`Timeout.queuereturn=0s`): what is still undeliverable goes back to its sender."""
        run([*self._cmd(), "-q", "-OMinQueueAge=0", "-OTimeout.queuereturn=0s"], timeout=60)
