"""The queue's own errors in the mail log: lock contention, permission, space.

What sendmail 8.17 and Postfix log when the queue itself goes wrong, by kind
(`mta_queue_errors_total{kind}`, docs/queue-health.md). The sendmail lines were
provoked on two real daemons over one queue directory and are kept, with how they
were made, in tests/integration/data/queue-errors/; the Postfix ones follow its
source (`msg_warn`/`msg_fatal` texts: `warning: QID: write queue file: %m`, ...).

* **lock**: a queue runner reached a message another process holds
  (`QID: queueup: locked`, sendmail LogLevel 20 and up only; at 9 sendmail says
  nothing), a lock call failed (`cannot flock(...)`, `queueup: cannot lock`,
  errno `No locks available` from an NFS/EFS lock service), a queue file's temp
  file is in the way (`queueup: cannot create ./tfQID, euid=0: File exists`: a
  concurrent writer, or one killed mid-write); Postfix `unable to set exclusive
  lock`, `shared lock ...`.
* **permission**: a queue file cannot be created, opened or renamed for its
  owner or mode (`Permission denied`, `Operation not permitted`), or sendmail
  refuses a queue file for its mode (`bogus queue file, uid=..., mode=...`).
* **space**: the queue's filesystem refuses writes: full (`No space left on
  device`, `Out of disk space for temp file`, `low on space (...)`, `rejecting new
  messages: min free`; Postfix `not enough free space in mail queue`), over quota,
  too large a file, or read-only (`Read-only file system`).
* **other**: any other error about the queue (a `SYSERR` naming a queue file or
  directory, `savemail` panics), and `Losing ./qfQID: why`, sendmail taking a
  message out of the queue (renamed to `Qf...`: it will not be retried).

Only lines about the queue count: a `SYSERR` about an alias file is not one.
`classify` is cheap for the lines that are none of these (a few substring tests).
"""

from __future__ import annotations

import re
from enum import StrEnum


class ErrorKind(StrEnum):
    """The label of mta_queue_errors_total{kind}."""

    LOCK = "lock"
    PERMISSION = "permission"
    SPACE = "space"
    OTHER = "other"


_HEADER = re.compile(
    r"(?:\d{4}-\d\d-\d\dT\S+|[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d) +\S+ +"
    r"(?P<prog>[^\s\[:]+)(?:\[\d+\])?: "
)
# The error a system call reported, as sendmail (sm_errstring) and Postfix (%m) write it.
_ERRNO = re.compile(
    r"(?P<permission>Permission denied|Operation not permitted)"
    r"|(?P<space>No space left on device|Disk quota exceeded|File too large"
    r"|Read-only file system)"
    r"|(?P<lock>No locks available|Resource temporarily unavailable"
    r"|Resource deadlock avoided|File exists)"
)
# sendmail lines whose kind their text alone decides.
_SENDMAIL_FIXED = re.compile(
    r"(?P<lock>: queueup: locked$|: queueup: cannot lock |cannot (?:flock|lockf)\()"
    r"|(?P<space>: low on space \(|: rejecting new messages: min free"
    r"|Out of disk space for temp file)"
    r"|(?P<permission>: bogus queue file, uid=)"
    r"|(?P<other>: Losing \S+: )"
)
# What makes a sendmail SYSERR (or a queueup ALERT) one about the queue.
_SENDMAIL_QUEUE = re.compile(
    r"\./[dqtxQ]f\w|/[dqtxQ]f[0-9A-Za-z]{8}|queue|control file|data file|temp file"
    r"|chdir\(|opendir\(|savemail"
)
_POSTFIX_FIXED = re.compile(
    r"(?P<lock>unable to set exclusive lock|: shared lock )"
    r"|(?P<space>not enough free space in mail queue)"
    r"|(?P<other>saving corrupt file )"
)
_POSTFIX_QUEUE = re.compile(
    r"write queue file: |mail_queue_enter: |queue file |lock file "
    r"|: open (?:active|deferred|incoming|hold|maildrop|bounce|defer|trace) "
)
_POSTFIX_SEVERITY = re.compile(r"(?:\w+: )?(?:warning|fatal|panic): ")
_SENDMAIL_PROGRAMS = frozenset({"sendmail", "sm-mta", "sm-msp-queue"})


def _kind(match: re.Match[str] | None) -> ErrorKind | None:
    return None if match is None or match.lastgroup is None else ErrorKind(match.lastgroup)


def _candidate(line: str) -> bool:
    """Whether a line may be a queue error: it holds one of the words every one of them
    holds (substring tests: several times faster than one regex of alternatives)."""
    return ("SYSERR" in line or "queueup: " in line or "bogus queue" in line
            or "low on space" in line or "Losing " in line or "rejecting new" in line
            or "warning: " in line or "fatal: " in line or "panic: " in line)


def classify(line: str) -> ErrorKind | None:
    """The kind of queue error a sendmail or Postfix log line reports; None for any other
    line (never raises)."""
    if not _candidate(line):
        return None
    header = _HEADER.match(line)
    if header is None:
        return None
    prog = header.group("prog")
    if prog in _SENDMAIL_PROGRAMS:
        fixed = _kind(_SENDMAIL_FIXED.search(line, header.end() - 2))  # from its ": "
        if fixed is not None:
            return fixed
        if ("SYSERR(" in line or ": queueup: " in line) and _SENDMAIL_QUEUE.search(
                line, header.end()):
            return _kind(_ERRNO.search(line, header.end())) or ErrorKind.OTHER
        return None
    if prog.startswith("postfix") and _POSTFIX_SEVERITY.match(line, header.end()):
        if _POSTFIX_QUEUE.search(line, header.end()) is not None:
            return _kind(_ERRNO.search(line, header.end())) or ErrorKind.OTHER
        return _kind(_POSTFIX_FIXED.search(line, header.end()))
    return None
