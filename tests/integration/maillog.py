"""The mail log: a private rsyslogd that owns /dev/log and writes the mail facility to a file.

sendmail can only log through syslog(3), i.e. the /dev/log socket, so whoever listens there
decides where its lines go. When nobody does, we start our own rsyslogd (own config, pid file
and work dir) writing `mail.*` in rsyslog's high-precision file format, as production does.
When a system syslog already owns /dev/log we never steal the socket: we find the file it
writes mail lines to by logging a probe line, and read only what was appended after it.
"""

from __future__ import annotations

import secrets
import socket
import subprocess
import time
from pathlib import Path

import pytest

from . import faked_clock
from .support import binary, start_daemon, stop_daemon, tail, wait_until

DEV_LOG = "/dev/log"
SYSTEM_MAILLOGS = (Path("/var/log/mail.log"), Path("/var/log/maillog"), Path("/var/log/syslog"))

# UseSysTimeStamp off: a line is stamped by rsyslogd's clock, not by the kernel's receive time
# of the datagram, which libfaketime cannot fake (the suite a year ahead needs the maillog in
# the tests' year; the two differ by microseconds).
RSYSLOG_CONF = """\
global(workDirectory="{workdir}")
module(load="imuxsock" SysSock.Name="{dev_log}" SysSock.RateLimit.Interval="0"
       SysSock.UseSysTimeStamp="off")
mail.* action(type="omfile" file="{maillog}" template="RSYSLOG_FileFormat")
"""


def dev_log_is_owned() -> bool:
    """True when a live process listens on /dev/log (a stale socket file does not count)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(DEV_LOG)
        except OSError:
            return False
    return True


class MailLog:
    """A mail log file plus the offset where this session's lines begin."""

    def __init__(self, path: Path, start_offset: int, process: subprocess.Popen[bytes] | None):
        self.path = path
        self._start = start_offset
        self._process = process

    @classmethod
    def start(cls, directory: Path) -> MailLog:
        """Own /dev/log with a private rsyslogd, or fall back to the system's mail log."""
        if dev_log_is_owned():
            if faked_clock.faked():
                # The system's syslog stamps the lines on the real clock, a year before the
                # tests' faked one: this tier cannot run faked on such a host.
                pytest.skip("a system syslog owns /dev/log: its maillog is not on the faked clock")
            return cls._use_system_syslog()
        # A socket file nobody listens on (an rsyslogd that was SIGKILLed) swallows logger's
        # lines without an error until our rsyslogd replaces it: remove it first.
        Path(DEV_LOG).unlink(missing_ok=True)
        workdir = directory / "rsyslog"
        workdir.mkdir()
        maillog = directory / "maillog"
        conf = directory / "rsyslog.conf"
        conf.write_text(
            RSYSLOG_CONF.format(workdir=workdir, dev_log=DEV_LOG, maillog=maillog)
        )
        stderr_path = directory / "rsyslogd.stderr"
        process = start_daemon(
            [binary("rsyslogd"), "-n", "-f", str(conf), "-i", str(directory / "rsyslogd.pid")],
            stderr_path,
        )
        log = cls(maillog, 0, process)
        try:
            log._wait_for_probe(timeout=10)
        except TimeoutError as exc:
            log.stop()
            raise RuntimeError(f"private rsyslogd did not log: {exc}\n{tail(stderr_path)}") from exc
        return log

    @classmethod
    def _use_system_syslog(cls) -> MailLog:
        nonce = _log_probe().encode()

        def find() -> MailLog | None:
            for path in SYSTEM_MAILLOGS:
                try:
                    text = path.read_bytes()
                except OSError:
                    continue
                found = text.find(nonce)
                end = text.find(b"\n", found)
                if found >= 0 and end >= 0:
                    return cls(path, end + 1, None)
            return None

        try:
            return wait_until(find, timeout=10, what="the probe line in a system mail log")
        except TimeoutError:
            raise RuntimeError(
                "another process owns /dev/log and no mail log in "
                f"{', '.join(map(str, SYSTEM_MAILLOGS))} shows mail.info lines; stop it or "
                "route mail.* to one of those files"
            ) from None

    def _wait_for_probe(self, timeout: float) -> None:
        wait_until(lambda: True if dev_log_is_owned() else None,
                   timeout=timeout, what="rsyslogd to listen on /dev/log")
        # logger exits 0 even when its datagram is lost, so send a fresh probe each round
        # until one shows up in the file.
        deadline = time.monotonic() + timeout
        while True:
            nonce = _log_probe()
            try:
                wait_until(lambda n=nonce: True if n in self.text() else None,
                           timeout=min(1.0, max(0.0, deadline - time.monotonic())),
                           what=f"probe line {nonce} in {self.path}")
                break
            except TimeoutError:
                if time.monotonic() >= deadline:
                    raise
        # Later readers only want this session's sendmail lines, not the probe.
        self._start = self.path.stat().st_size

    def log_marker(self) -> str:
        """Send a unique mail.info line through /dev/log; return its text."""
        return _log_probe()

    def offset(self) -> int:
        """The current end of the log: pass it to `text(since=...)` to read only newer lines."""
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def text(self, since: int | None = None) -> str:
        """The complete lines written since `since` (default: since this session started)."""
        try:
            with self.path.open("rb") as fh:
                fh.seek(self._start if since is None else since)
                data = fh.read()
        except FileNotFoundError:
            return ""
        complete = data[: data.rfind(b"\n") + 1]
        return complete.decode("utf-8", errors="replace")

    def stop(self) -> None:
        """Stop the private rsyslogd (it removes /dev/log on the way out)."""
        stop_daemon(self._process)


def _log_probe() -> str:
    nonce = f"selfcheckd-maillog-probe-{secrets.token_hex(8)}"
    subprocess.run(
        [binary("logger"), "-p", "mail.info", "-t", "selfcheckd-lab", nonce],
        check=True,
        timeout=10,
    )
    return nonce
