"""Dovecot behind a real MTA: private sendmail relays the lab domain to Dovecot's LMTP.

The fixture hands tests a `DovecotLab`: where to submit (plain SMTP, no auth), where to
read (IMAP STARTTLS / imaps, verified against the lab CA, whose server certificate ends
at `cert_not_after`) and how to look in the mailbox.

For the delivery-quality tests the lab adds to Dovecot's generated config a junk
mailbox flagged `\\Junk` by SPECIAL-USE but not named Junk ("Quarantine"), and lets
LMTP file `user+Quarantine@` there (`lmtp_save_to_detail_mailbox`), as a spam filter
would: `junk_recipient` is the address whose mail lands in it.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from .certs import ServerCerts, make_server_certs
from .dovecot import Dovecot
from .sendmail import LMTP_TCP_MAILER, Sendmail

LAB_DOMAIN = "lab.test"
# A \Junk special-use mailbox whose name a name-based guess would miss.
JUNK_MAILBOX = "Quarantine"
JUNK_CONFIG = f"""
# Added by dovecot_lab.py: a special-use junk mailbox, and LMTP filing user+{JUNK_MAILBOX}@
# into it.
recipient_delimiter = +
lmtp_save_to_detail_mailbox = yes
namespace inbox {{
  inbox = yes
  mailbox {JUNK_MAILBOX} {{
    auto = create
    special_use = \\Junk
  }}
}}
"""


@dataclass
class DovecotLab:
    """Connection facts for one Dovecot + sendmail pair, plus mailbox helpers."""

    smtp_host: str
    smtp_port: int
    imap_host: str
    imap_port: int
    imaps_port: int
    lmtp_port: int
    username: str
    password: str = field(repr=False)
    ca_file: Path
    sender: str
    recipient: str
    junk_recipient: str  # LMTP files its mail into JUNK_MAILBOX
    cert_not_after: datetime
    dovecot: Dovecot = field(repr=False)
    sendmail: Sendmail = field(repr=False)

    @classmethod
    def start(cls, directory: Path, dovecot_base: Path) -> DovecotLab:
        certs: ServerCerts = make_server_certs(dovecot_base)
        username = f"tester{secrets.token_hex(3)}"
        dovecot = Dovecot(dovecot_base, certs, username=username, domain=LAB_DOMAIN)
        with dovecot.config.open("a", encoding="utf-8") as config:
            config.write(JUNK_CONFIG)
        dovecot.start()
        sendmail_dir = directory / "sendmail-lmtp"
        sendmail_dir.mkdir()
        try:
            sendmail = Sendmail(
                sendmail_dir,
                mailertable={
                    LAB_DOMAIN: "lmtptcp:[127.0.0.1]",
                    # Anything else (e.g. a DSN to an outside sender) fails fast, no DNS.
                    ".": 'error:5.1.2:"550 no route outside the lab"',
                },
                mailer_definitions=LMTP_TCP_MAILER.format(port=dovecot.ports.lmtp),
            )
            sendmail.start()
        except BaseException:
            dovecot.stop()
            raise
        return cls(
            smtp_host=sendmail.host,
            smtp_port=sendmail.port,
            imap_host="127.0.0.1",
            imap_port=dovecot.ports.imap,
            imaps_port=dovecot.ports.imaps,
            lmtp_port=dovecot.ports.lmtp,
            username=username,
            password=dovecot.password,
            ca_file=certs.ca_file,
            sender=f"selfcheck@{LAB_DOMAIN}",
            recipient=f"{username}@{LAB_DOMAIN}",
            junk_recipient=f"{username}+{JUNK_MAILBOX}@{LAB_DOMAIN}",
            cert_not_after=certs.not_after,
            dovecot=dovecot,
            sendmail=sendmail,
        )

    def stop(self) -> None:
        self.sendmail.stop()
        self.dovecot.stop()

    def message_count(self, mailbox: str = "INBOX") -> int:
        """How many messages Dovecot reports in one of the test user's mailboxes."""
        return len(self.dovecot.message_uids(mailbox))

    def message_uids(self) -> list[int]:
        """UIDs in the test user's INBOX (doveadm search)."""
        return self.dovecot.message_uids()

    def message_files(self) -> list[Path]:
        """The INBOX maildir files on disk."""
        return self.dovecot.message_files()

    def header_values(self, header: str, mailbox: str = "INBOX") -> list[str]:
        """One header's value for each message of a mailbox (doveadm fetch), e.g. "Message-ID"."""
        out = self.dovecot.doveadm(
            "fetch", "-u", self.username, f"hdr.{header.lower()}", "mailbox", mailbox, "ALL"
        )
        prefix = f"hdr.{header.lower()}:"
        return [line[len(prefix):].strip() for line in out.splitlines() if line.startswith(prefix)]

    def deliver_files(self, messages: list[bytes]) -> None:
        """Put `messages` into the INBOX maildir as a delivery agent does (written in tmp/,
        renamed into new/, owned by the mail user): thousands in a second, where LMTP
        through sendmail takes minutes. Dovecot indexes them at the next SELECT."""
        self.dovecot.deliver_files(messages)

    def delete_all(self, mailbox: str = "INBOX") -> None:
        """Expunge every message of a mailbox (doveadm), so a test leaves it empty."""
        self.dovecot.doveadm("expunge", "-u", self.username, "mailbox", mailbox, "ALL")
