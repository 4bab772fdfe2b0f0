"""A private sendmail 8.17 daemon: own .cf (built with m4 from sendmail-cf), queue and port.

It listens on 127.0.0.1 only, logs at LogLevel 9 through syslog, and routes mail with a
mailertable, so a test decides where each domain goes (a sinkhole, Dovecot's LMTP port).
"""

from __future__ import annotations

import re
import smtplib
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from .support import binary, free_port, run, start_daemon, stop_daemon, tail, wait_for_port

CF_M4 = Path("/usr/share/sendmail/cf/m4/cf.m4")
QUEUE_ID = re.compile(r"\b([0-9A-Za-z]{8}\d{6,})\b")
SMTP_TIMEOUT = 30.0

MC_TEMPLATE = """\
divert(-1)
# selfcheckd integration lab: generated, do not edit.
divert(0)dnl
include(`{cf_m4}')dnl
VERSIONID(`selfcheckd integration lab')dnl
OSTYPE(`linux')dnl
dnl A qualified name of our own: no 60 s "unqualified host name" stall, no DNS.
define(`confDOMAIN_NAME', `{hostname}')dnl
define(`confLOG_LEVEL', `9')dnl
dnl The lab lives under /tmp (sticky, world-writable): trust it, as the notes say.
define(`confDONT_BLAME_SENDMAIL', `TrustStickyBit')dnl
define(`QUEUE_DIR', `{queue}')dnl
define(`confPID_FILE', `{directory}/sendmail.pid')dnl
define(`STATUS_FILE', `{directory}/statistics')dnl
define(`ALIAS_FILE', `{directory}/aliases')dnl
define(`confSERVICE_SWITCH_FILE', `{directory}/service.switch')dnl
define(`HELP_FILE', `{directory}/helpfile')dnl
dnl A busy CI runner must not make sendmail queue or refuse mail for load average.
define(`confQUEUE_LA', `500')dnl
define(`confREFUSE_LA', `500')dnl
define(`confDELAY_LA', `0')dnl
define(`confMIN_QUEUE_AGE', `0')dnl
define(`confTO_CONNECT', `10s')dnl
define(`confTO_ICONNECT', `10s')dnl
define(`confTO_INITIAL', `30s')dnl
define(`confPRIVACY_FLAGS', `authwarnings')dnl
dnl Deliver before answering the next SMTP command: the log is complete when QUIT returns.
define(`confDELIVERY_MODE', `interactive')dnl
FEATURE(`no_default_msa')dnl
FEATURE(`accept_unresolvable_domains')dnl
FEATURE(`mailertable', `hash -o {directory}/mailertable')dnl
DAEMON_OPTIONS(`Family=inet, Name=MTA, Addr=127.0.0.1, Port={port}')dnl
MAILER(`local')dnl
MAILER(`smtp')dnl
{mailer_definitions}"""

# LMTP over TCP: [IPC] with F=z (speak LMTP); A= names the port, $h comes from the mailertable.
LMTP_TCP_MAILER = """\
MAILER_DEFINITIONS
Mlmtptcp, P=[IPC], F=mDFMuXz, S=EnvFromSMTP/HdrFromSMTP, R=EnvToSMTP/HdrFromSMTP, E=\\r\\n,
\tL=990, T=DNS/RFC822/SMTP, A=TCP $h {port}
"""


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
        self.cf = directory / "sendmail.cf"
        self._process: subprocess.Popen[bytes] | None = None
        self._write_config(mailertable, mailer_definitions, hostname)

    def _write_config(
        self, mailertable: Mapping[str, str], mailer_definitions: str, hostname: str
    ) -> None:
        self.queue.mkdir(mode=0o700)
        d = self.directory
        # Only local files for host names: a lab must never wait on DNS.
        (d / "service.switch").write_text("hosts files\naliases files\n")
        (d / "aliases").write_text("postmaster: root\nMAILER-DAEMON: postmaster\n")
        (d / "helpfile").write_text("")
        (d / "mailertable").write_text(
            "".join(f"{domain}\t{route}\n" for domain, route in mailertable.items())
        )
        mc = MC_TEMPLATE.format(
            cf_m4=CF_M4,
            hostname=hostname,
            queue=self.queue,
            directory=d,
            port=self.port,
            mailer_definitions=mailer_definitions,
        )
        (d / "sendmail.mc").write_text(mc)
        self.cf.write_text(run([binary("m4"), str(d / "sendmail.mc")]))
        run([binary("makemap"), "hash", str(d / "mailertable")],
            stdin=(d / "mailertable").read_text())
        run([*self._cmd(), "-bi"])

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
        """Submit over SMTP; return the queue id sendmail put in its 250 reply to DATA.

        Envelope commands are sent verbatim: smtplib's own quoting would drop the quotes
        of a local part like "a,b".
        """
        with smtplib.SMTP(self.host, self.port, local_hostname="client.lab.test",
                          timeout=SMTP_TIMEOUT) as smtp:
            smtp.ehlo()
            _expect(smtp.docmd(f"MAIL FROM:<{sender}>"), 250, "MAIL FROM")
            for rcpt in recipients:
                _expect(smtp.docmd(f"RCPT TO:<{rcpt}>"), 250, f"RCPT TO {rcpt}")
            code, reply = smtp.data(body)  # str: smtplib sends CRLF line ends
            text = reply.decode(errors="replace")
            _expect((code, reply), 250, "DATA")
        found = QUEUE_ID.search(text)
        if found is None:
            raise AssertionError(f"no queue id in sendmail's DATA reply: {text!r}")
        return found.group(1)

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
        return sorted(p.name[2:] for p in self.queue.glob("qf*"))

    def queue_run(self) -> None:
        """Retry every queued message now, in the foreground, ignoring MinQueueAge."""
        run([*self._cmd(), "-q", "-OMinQueueAge=0"], timeout=60)

    def queue_run_returning(self) -> None:
        """A queue run in which every message has outlived its queue lifetime
        (`Timeout.queuereturn=0s`): what is still undeliverable goes back to its sender."""
        run([*self._cmd(), "-q", "-OMinQueueAge=0", "-OTimeout.queuereturn=0s"], timeout=60)


def _expect(reply: tuple[int, bytes], code: int, what: str) -> None:
    if reply[0] != code:
        raise AssertionError(f"sendmail answered {what} with {reply[0]} {reply[1]!r}")

