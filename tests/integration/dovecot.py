"""A private Dovecot 2.3 (IMAP + LMTP) run as root from one config file in a temp dir.

IMAP offers STARTTLS on one port and implicit TLS on another, with a certificate from a
throwaway CA, so clients verify it for real; LMTP listens on TCP for the MTA in front.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from . import faked_clock
from .certs import ServerCerts
from .support import binary, free_port, run, start_daemon, stop_daemon, tail, wait_for_port

MAIL_USER = "mail"  # Debian's uid 8 owns the test maildir; first_valid_uid = 1 allows it
DH_FILE = Path("/usr/share/dovecot/dh.pem")

CONFIG = """\
# selfcheckd integration lab: generated, do not edit.
instance_name = selfcheckd-lab-{nonce}
protocols = imap lmtp
listen = 127.0.0.1
base_dir = {base}/run
state_dir = {base}/state
log_path = {base}/dovecot.log
first_valid_uid = 1
mail_location = maildir:~/Maildir
auth_mechanisms = plain login
auth_username_format = %Ln
disable_plaintext_auth = yes
ssl = required
ssl_cert = <{cert}
ssl_key = <{key}
{ssl_dh}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN {base}/users
}}
userdb {{
  driver = passwd-file
  args = {base}/users
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {imap_port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {imaps_port}
    ssl = yes
  }}
}}
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {lmtp_port}
  }}
}}
protocol lmtp {{
  postmaster_address = postmaster@{domain}
}}
"""


@dataclass(frozen=True)
class DovecotPorts:
    imap: int
    imaps: int
    lmtp: int


class Dovecot:
    """The Dovecot master process and the one test user's mailbox."""

    def __init__(self, base: Path, certs: ServerCerts, *, username: str, domain: str) -> None:
        self.base = base
        self.username = username
        self.password = secrets.token_urlsafe(18)
        self.ports = DovecotPorts(free_port(), free_port(), free_port())
        self.config = base / "dovecot.conf"
        self.home = base / "home" / username
        self._process: subprocess.Popen[bytes] | None = None
        self._write(certs, domain)

    def _write(self, certs: ServerCerts, domain: str) -> None:
        mail = pwd.getpwnam(MAIL_USER)
        # The mail processes run as uid 8: they need to reach the home through our dirs.
        self.base.chmod(0o755)
        (self.base / "home").mkdir(mode=0o755)
        self.home.mkdir(mode=0o700)
        shutil.chown(self.home, mail.pw_uid, mail.pw_gid)
        users = self.base / "users"
        users.write_text(
            f"{self.username}:{{PLAIN}}{self.password}:{mail.pw_uid}:{mail.pw_gid}::{self.home}::\n"
        )
        users.chmod(0o640)
        shutil.chown(users, "root", "dovecot")
        self.config.write_text(
            CONFIG.format(
                nonce=secrets.token_hex(4),
                base=self.base,
                cert=certs.cert_file,
                key=certs.key_file,
                ssl_dh=f"ssl_dh = <{DH_FILE}" if DH_FILE.exists() else "",
                imap_port=self.ports.imap,
                imaps_port=self.ports.imaps,
                lmtp_port=self.ports.lmtp,
                domain=domain,
            )
            + faked_clock.dovecot_settings()
        )

    def start(self) -> None:
        """Run the master in the foreground (-F) so we own it; wait for all three ports."""
        output = self.base / "dovecot.stderr"
        self._process = start_daemon([binary("dovecot"), "-F", "-c", str(self.config)], output)
        try:
            for port in (self.ports.imap, self.ports.imaps, self.ports.lmtp):
                wait_for_port("127.0.0.1", port, timeout=20, what="dovecot")
        except TimeoutError as exc:
            self.stop()
            raise RuntimeError(
                f"{exc}\n{tail(output)}\n{tail(self.base / 'dovecot.log')}"
            ) from exc

    def stop(self) -> None:
        stop_daemon(self._process)

    def doveadm(self, *args: str) -> str:
        """Run `doveadm -c CONFIG ...` against this instance."""
        return run([binary("doveadm"), "-c", str(self.config), *args])

    def message_uids(self, mailbox: str = "INBOX") -> list[int]:
        """UIDs of the messages in a mailbox, asked of Dovecot itself (doveadm search)."""
        out = self.doveadm("search", "-u", self.username, "mailbox", mailbox, "ALL")
        return [int(line.split()[1]) for line in out.splitlines() if line.strip()]

    def deliver_files(self, messages: list[bytes]) -> None:
        """Write `messages` into the INBOX maildir (tmp/, then new/), owned by the mail user."""
        mail = pwd.getpwnam(MAIL_USER)
        maildir = self.home / "Maildir"
        for sub in ("", "tmp", "new", "cur"):
            (maildir / sub).mkdir(mode=0o700, exist_ok=True)
            shutil.chown(maildir / sub, mail.pw_uid, mail.pw_gid)
        stamp = f"{time.time():.0f}.{secrets.token_hex(4)}"
        for i, message in enumerate(messages):
            data = message.replace(b"\r\n", b"\n")  # maildir files use LF
            name = f"{stamp}.M{i}P{os.getpid()}.lab,S={len(data)}"
            tmp = maildir / "tmp" / name
            tmp.write_bytes(data)
            shutil.chown(tmp, mail.pw_uid, mail.pw_gid)
            tmp.rename(maildir / "new" / name)

    def message_files(self) -> list[Path]:
        """The INBOX maildir files, new and cur: what is on disk whatever Dovecot says."""
        maildir = self.home / "Maildir"
        return sorted(p for sub in ("new", "cur") for p in (maildir / sub).glob("*") if p.is_file())
