"""A private sendmail 8.17 configuration: the .mc, built with m4 into a .cf, and its files.

One daemon's own listen address and port, pid file, status file, aliases and
mailertable live in one directory; the queue directory may be shared with other
daemons (Cabalmail's smtp-out tasks share one on EFS). Mail is routed only by the
mailertable (a lab never waits on DNS), and the `smtp` mailers dial `smtp_port`,
so a sinkhole listener can sit on any loopback port (a mailertable's `:25`
suffix names a fallback host, never a port).

Used by the integration labs (tests/integration/sendmail.py) and by the cluster
`selfcheckd demo --drill` runs (daemon.embedded.sendmail_cluster).
"""

from __future__ import annotations

import re
import smtplib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from daemon.embedded.processes import binary, run

CF_M4 = Path("/usr/share/sendmail/cf/m4/cf.m4")
QUEUE_ID = re.compile(r"\b([0-9A-Za-z]{8}\d{6,})\b")
SMTP_TIMEOUT = 30.0
# The smtp mailer family: each takes its connection arguments from one m4 macro.
_SMTP_MAILER_ARGS = ("SMTP_MAILER_ARGS", "ESMTP_MAILER_ARGS", "SMTP8_MAILER_ARGS",
                     "DSMTP_MAILER_ARGS", "RELAY_MAILER_ARGS")

MC_TEMPLATE = """\
divert(-1)
# {label}: generated, do not edit.
divert(0)dnl
include(`{cf_m4}')dnl
VERSIONID(`{label}')dnl
OSTYPE(`linux')dnl
dnl A qualified name of our own: no 60 s "unqualified host name" stall, no DNS.
define(`confDOMAIN_NAME', `{domain_name}')dnl
define(`confLOG_LEVEL', `{log_level}')dnl
dnl Labs live under /tmp (sticky, world-writable): trust it, as the notes say.
define(`confDONT_BLAME_SENDMAIL', `TrustStickyBit')dnl
define(`QUEUE_DIR', `{queue_dir}')dnl
define(`confPID_FILE', `{directory}/sendmail.pid')dnl
define(`STATUS_FILE', `{directory}/statistics')dnl
define(`ALIAS_FILE', `{directory}/aliases')dnl
define(`confSERVICE_SWITCH_FILE', `{directory}/service.switch')dnl
define(`HELP_FILE', `{directory}/helpfile')dnl
dnl A busy CI runner must not make sendmail queue or refuse mail for load average.
define(`confQUEUE_LA', `500')dnl
define(`confREFUSE_LA', `500')dnl
define(`confDELAY_LA', `0')dnl
dnl How long a queue runner leaves a message alone after its last attempt (Cabalmail: 5m,
dnl so that every task's runner does not retry a fresh message at once).
define(`confMIN_QUEUE_AGE', `{min_queue_age}')dnl
define(`confTO_CONNECT', `10s')dnl
define(`confTO_ICONNECT', `10s')dnl
define(`confTO_INITIAL', `30s')dnl
define(`confPRIVACY_FLAGS', `authwarnings')dnl
define(`confDELIVERY_MODE', `{delivery_mode}')dnl
{extra}{smtp_args}FEATURE(`no_default_msa')dnl
FEATURE(`accept_unresolvable_domains')dnl
FEATURE(`mailertable', `hash -o {directory}/mailertable')dnl
DAEMON_OPTIONS(`Family=inet, Name=MTA, Addr={listen_host}, Port={listen_port}')dnl
MAILER(`local')dnl
MAILER(`smtp')dnl
{mailer_definitions}"""

# LMTP over TCP: [IPC] with F=z (speak LMTP); A= names the port, $h comes from the mailertable.
LMTP_TCP_MAILER = """\
MAILER_DEFINITIONS
Mlmtptcp, P=[IPC], F=mDFMuXz, S=EnvFromSMTP/HdrFromSMTP, R=EnvToSMTP/HdrFromSMTP, E=\\r\\n,
\tL=990, T=DNS/RFC822/SMTP, A=TCP $h {port}
"""


@dataclass(frozen=True)
class SendmailConfig:
    """Everything one daemon's .cf says. Paths must be absolute."""

    directory: Path  # the daemon's own files: .mc, .cf, pid, status, aliases, mailertable
    queue_dir: Path  # QUEUE_DIR; several daemons may share it
    listen_port: int
    mailertable: Mapping[str, str]  # domain -> route, e.g. {"sinkhole.test": "smtp:[127.0.0.1]"}
    listen_host: str = "127.0.0.1"
    smtp_port: int | None = None  # the port the smtp mailers dial (None: 25)
    log_level: int = 9  # what exists in the log: to= lines with stat=Deferred need 9
    min_queue_age: str = "0"
    # interactive: the log is complete when QUIT returns (the leak lab); background: as
    # production, the SMTP session ends before the delivery attempt.
    delivery_mode: str = "interactive"
    domain_name: str = "smtp-out.lab.test"
    mailer_definitions: str = ""
    # More `define(NAME, VALUE)` lines, e.g. {"confTO_QUEUERETURN": "4d"}.
    defines: Mapping[str, str] = field(default_factory=dict)
    label: str = "selfcheckd sendmail lab"

    @property
    def cf(self) -> Path:
        return self.directory / "sendmail.cf"

    def mc(self) -> str:
        """The m4 source of the .cf."""
        extra = "".join(f"define(`{name}', `{value}')dnl\n" for name, value in self.defines.items())
        smtp_args = "" if self.smtp_port is None else "".join(
            f"define(`{macro}', `TCP $h {self.smtp_port}')dnl\n" for macro in _SMTP_MAILER_ARGS)
        return MC_TEMPLATE.format(
            label=self.label, cf_m4=CF_M4, domain_name=self.domain_name,
            log_level=self.log_level, queue_dir=self.queue_dir, directory=self.directory,
            min_queue_age=self.min_queue_age, delivery_mode=self.delivery_mode,
            extra=extra, smtp_args=smtp_args, listen_host=self.listen_host,
            listen_port=self.listen_port, mailer_definitions=self.mailer_definitions,
        )


def write_config(config: SendmailConfig) -> Path:
    """Write the daemon's files (the queue directory too, 0700, if it is missing); return
    the .cf. Raises RuntimeError when m4, makemap or sendmail -bi fails."""
    d = config.directory
    d.mkdir(parents=True, exist_ok=True)
    config.queue_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Only local files for host names: a lab must never wait on DNS.
    (d / "service.switch").write_text("hosts files\naliases files\n")
    (d / "aliases").write_text("postmaster: root\nMAILER-DAEMON: postmaster\n")
    (d / "helpfile").write_text("")
    (d / "statistics").touch()  # sendmail keeps its delivery statistics only if it exists
    (d / "mailertable").write_text(
        "".join(f"{domain}\t{route}\n" for domain, route in config.mailertable.items()))
    (d / "sendmail.mc").write_text(config.mc())
    config.cf.write_text(run([binary("m4"), str(d / "sendmail.mc")]))
    run([binary("makemap"), "hash", str(d / "mailertable")],
        stdin=(d / "mailertable").read_text())
    run([binary("sendmail"), "-C", str(config.cf), "-bi"])
    return config.cf


def submit_smtp(host: str, port: int, sender: str, recipients: Sequence[str], body: str,
                *, helo: str = "client.lab.test") -> str:
    """Submit one message over SMTP; return the queue id sendmail put in its 250 reply to
    DATA. Envelope commands are sent verbatim: smtplib's own quoting would drop the quotes
    of a local part like "a,b". SubmitRefused when sendmail refuses a step."""
    with smtplib.SMTP(host, port, local_hostname=helo, timeout=SMTP_TIMEOUT) as smtp:
        smtp.ehlo()
        _expect(smtp.docmd(f"MAIL FROM:<{sender}>"), 250, "MAIL FROM")
        for rcpt in recipients:
            _expect(smtp.docmd(f"RCPT TO:<{rcpt}>"), 250, f"RCPT TO {rcpt}")
        code, reply = smtp.data(body)  # str: smtplib sends CRLF line ends
        text = reply.decode(errors="replace")
        _expect((code, reply), 250, "DATA")
    found = QUEUE_ID.search(text)
    if found is None:
        raise SubmitRefused(f"no queue id in sendmail's DATA reply: {text!r}")
    return found.group(1)


class SubmitRefused(Exception):  # noqa: N818 - what happened, as sendmail said it
    """sendmail did not accept a submission (the message names the step and its reply)."""


def _expect(reply: tuple[int, bytes], code: int, what: str) -> None:
    if reply[0] != code:
        text = reply[1].decode(errors="replace")
        raise SubmitRefused(f"sendmail answered {what} with {reply[0]} {text}")


def queue_ids(queue_dir: Path) -> list[str]:
    """Queue ids of the messages waiting in a queue directory (one qf file each)."""
    return sorted(p.name[2:] for p in queue_dir.glob("qf*"))
