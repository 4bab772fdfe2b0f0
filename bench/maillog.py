"""A deterministic generated mail log with a known list of leaks.

`write_maillog(path, lines, leaked_pairs, seed)` writes an smtp-out log as CloudWatch carries it:
sendmail 8.17 `from=`/`to=` lines in their real shapes (see NOTES.md "Real sendmail 8.17
lines"), Postfix lines, and the other programs' lines (opendkim, dovecot, STARTTLS notices,
`tail:` and entrypoint lines). Each message's `to=` lines follow its `from=` line a few lines
later, interleaved with other messages.

Spread over the file are `leaked_pairs` distinct (queue id, recipient) leaks in every shape the
scan must handle: several recipients on one line, `[more]` continuation lines, quoted local parts
with commas, bare addresses, Postfix `status=`, mixed case, trailing dots, subdomains, retries of
the same pair (in another case), senders far before their delivery line (beyond any look-back
window) or absent altogether. Besides them: allowlisted test traffic (`qp-test-*` senders),
lookalike domains (`notsinkhole.test`, `sinkhole.testing`, `sinkhole.test.example.com`) and the
domain in places that are no recipient. The generator keeps its own list of what a scan must
report (`MailLogFacts.leaks`), built without the parser: an independent expectation.

`hard=True` writes the shapes that make senders costly to find: every other leak message's
delivery lines come 2.5% to 10% of the file (50,000 to 200,000 lines of 2,000,000) after its
`from=` line, and retries whose `from=` line is not in the file at all (queued before a
rotation) are spread over the whole file (50 of the 160 pairs at the default size).
"""

from __future__ import annotations

import heapq
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

DOMAIN = "sinkhole.test"
BASE_EPOCH = 1795462200  # 2026-11-23T16:50:00Z
# Leaked pairs (not counting test traffic) each kind of leak message adds; see _leak_message.
_PAIRS = (1, 2, 2, 1, 1, 1, 1, 1, 2, 1, 1, 0)
_ALNUM = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class Leak:
    """One (queue id, recipient) a scan must print, as the generator wrote it."""

    queue_id: str
    recipient: str
    sender: str | None
    stat: str
    timestamp: str


@dataclass
class MailLogFacts:
    path: Path
    lines: int = 0
    size: int = 0
    leaks: list[Leak] = field(default_factory=list)
    test_recipients: int = 0  # sinkhole recipients of allowlisted senders (counted, not leaks)
    domain_lines: int = 0  # lines holding the domain in any case (what grep -F -i -c counts)
    domain_to_lines: int = 0  # of those, lines with " to=" (what the mtail program counts)


class _Clock:
    """Header timestamps: about 2M lines a day, RFC 3339 with microseconds."""

    def __init__(self, per_line: float) -> None:
        self.per_line = per_line
        self._second = -1
        self._prefix = ""

    def at(self, index: int) -> str:
        t = BASE_EPOCH + index * self.per_line
        second = int(t)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._prefix}.{int((t - second) * 1e6):06d}+00:00"


def _qid(n: int) -> str:
    """A sendmail-shaped queue id (8 letters and digits, then 6 digits), unique per n."""
    m = (n * 2654435761) % 62**8
    chars = []
    for _ in range(8):
        m, r = divmod(m, 62)
        chars.append(_ALNUM[r])
    return "".join(chars) + f"{n % 1_000_000:06d}"


def _postfix_qid(n: int) -> str:
    return f"4Y8K{n:011X}"


class _Writer:
    def __init__(self, path: Path, total: int, rnd: random.Random) -> None:
        self.fh = path.open("w", encoding="utf-8", newline="\n")
        self.total = total
        self.rnd = rnd
        self.index = 0
        self.clock = _Clock(86400 / max(total, 1))
        self.buffer: list[str] = []
        self.pending: list[tuple[int, int, object]] = []
        self.seq = 0
        self.host = "ip-10-0-101-15"
        self.domain_lines = 0
        self.domain_to_lines = 0

    def ts(self) -> str:
        return self.clock.at(self.index)

    def emit(self, line: str) -> None:
        lowered = line.lower()
        if DOMAIN in lowered:
            self.domain_lines += 1
            if " to=" in line:
                self.domain_to_lines += 1
        self.buffer.append(line)
        self.index += 1
        if len(self.buffer) >= 20000:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            self.fh.write("\n".join(self.buffer) + "\n")
            self.buffer.clear()

    def later(self, delay: int, action: object) -> None:
        self.seq += 1
        heapq.heappush(self.pending, (self.index + max(delay, 1), self.seq, action))


def write_maillog(path: Path, lines: int = 2_000_000, leaked_pairs: int = 160,
                  seed: int = 11, *, hard: bool = False) -> MailLogFacts:
    """Write the log; return what a correct scan of it must find (`hard`: module docstring)."""
    return _Generator(path, lines, leaked_pairs, seed, hard).run()


class _Generator:
    def __init__(self, path: Path, lines: int, leaked_pairs: int, seed: int,
                 hard: bool = False) -> None:
        self.hard = hard
        self.rnd = random.Random(seed)
        self.w = _Writer(path, lines, self.rnd)
        self.facts = MailLogFacts(path)
        self.target_pairs = leaked_pairs
        self.planned_pairs = 0
        self.n = 0
        self.reported: set[tuple[str, str]] = set()
        self.senders: dict[str, str] = {}
        # Leak messages go at evenly spaced lines, the last well before the end.
        self.slots = max(1, -(-leaked_pairs * len(_PAIRS) // sum(_PAIRS)) + 1)
        self.spacing = max(1, int(lines * 0.85) // (self.slots + 1))
        self.next_slot = self.spacing
        self.kind = 0

    # -- lines ------------------------------------------------------------------------
    def _from(self, qid: str, sender: str, nrcpts: int) -> str:
        w, rnd = self.w, self.rnd
        return (f"{w.ts()} {w.host} sendmail[{rnd.randint(1000, 99999)}]: {qid}: "
                f"from=<{sender}>, size={rnd.randint(300, 90000)}, class=0, nrcpts={nrcpts}, "
                f"msgid=<{rnd.getrandbits(128):032x}.{qid}@app-mailer.example.com>, proto=ESMTP, "
                f"daemon=MTA, relay=ip-10-0-2-{rnd.randint(2, 250)}.ec2.internal "
                f"[10.0.2.{rnd.randint(2, 250)}] (may be forged)")

    def _to(self, qid: str, field_: str, stat: str, more: bool = False,
            program: str = "sendmail") -> str:
        w, rnd = self.w, self.rnd
        more_part = " [more]," if more else ""
        return (f"{w.ts()} {w.host} {program}[{rnd.randint(1000, 99999)}]: {qid}: to={field_},"
                f"{more_part} delay=00:00:0{rnd.randint(0, 9)}, xdelay=00:00:0{rnd.randint(0, 9)}, "
                f"mailer=esmtp, pri={rnd.randint(30000, 300000)}, relay=mx{rnd.randint(1, 9)}."
                f"mail-hosting.example.org. [198.51.100.{rnd.randint(2, 250)}], dsn=2.0.0, "
                f"stat={stat}")

    def _noise(self) -> None:
        w, rnd = self.w, self.rnd
        r = rnd.random()
        ts = w.ts()
        if r < 0.35:
            w.emit(f"{ts} {w.host} sendmail[{rnd.randint(1000, 99999)}]: STARTTLS=client, "
                   f"relay=mx{rnd.randint(1, 9)}.example.org., version=TLSv1.3, verify=OK, "
                   "cipher=TLS_AES_256_GCM_SHA384, bits=256/256")
        elif r < 0.6:
            w.emit(f"{ts} {w.host} dovecot: imap-login: Login: user=<u{rnd.randint(1, 500)}"
                   f"@example.com>, method=PLAIN, rip=10.0.2.{rnd.randint(2, 250)}, "
                   f"lip=10.0.1.5, mpid={rnd.randint(1000, 99999)}, TLS, "
                   "TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits), session=<"
                   f"{rnd.getrandbits(64):016x}>")
        elif r < 0.8:
            w.emit(f"{ts} {w.host} sendmail[{rnd.randint(1000, 99999)}]: "
                   f"{_qid(rnd.randint(0, 10**9))}: {_qid(rnd.randint(0, 10**9))}: "
                   "DSN: Service unavailable")
        elif r < 0.9:
            self._postfix()
        elif r < 0.97:
            w.emit(f"{ts} {w.host} sendmail[{rnd.randint(1000, 99999)}]: "
                   f"{_qid(rnd.randint(0, 10**9))}: Milter: data, reject=451 4.7.1 "
                   "Please try again later")
        elif r < 0.99:
            w.emit("tail: '/var/log/maillog' has been replaced;  following new file")
        else:
            w.emit(f"entrypoint: reloading sendmail config {rnd.randint(1, 9999)}")

    def _postfix(self) -> None:
        w, rnd = self.w, self.rnd
        self.n += 1
        q = _postfix_qid(self.n)
        w.emit(f"{w.ts()} {w.host} postfix/qmgr[1022]: {q}: from=<app{rnd.randint(1, 99)}"
               f"@example.com>, size={rnd.randint(300, 90000)}, nrcpt=1 (queue active)")

        def deliver() -> None:
            w.emit(f"{w.ts()} {w.host} postfix/smtp[{rnd.randint(1000, 9999)}]: {q}: "
                   f"to=<friend{rnd.randint(1, 999)}@example.org>, relay=mx.example.org"
                   f"[198.51.100.7]:25, delay=0.61, delays=0.02/0/0.2/0.39, dsn=2.0.0, "
                   f"status=sent (250 2.0.0 Ok: queued as {_postfix_qid(self.n + 10**6)})")
        w.later(rnd.randint(1, 20), deliver)

    def _message(self) -> None:
        """An ordinary message: from=, opendkim, then its to= lines a little later."""
        w, rnd = self.w, self.rnd
        self.n += 1
        qid = _qid(self.n * 7919)
        n = 1 if rnd.random() < 0.8 else rnd.randint(2, 4)
        sender = f"app{rnd.randint(1, 99)}@example.com"
        w.emit(self._from(qid, sender, n))
        w.later(1, lambda: w.emit(f"{w.ts()} {w.host} opendkim[77]: {qid}: "
                                  "DKIM-Signature field added (s=mail2026, "
                                  "d=app-mailer.example.com)"))
        rcpts = ",".join(f"<user{rnd.randint(1, 50000)}@example.{rnd.choice(('org', 'net'))}>"
                         for _ in range(n))
        stat = (f"Sent (2.0.0 {_qid(self.n * 31 + 5)}-{rnd.getrandbits(40):010x} Message "
                "accepted for delivery by the remote MX)")
        w.later(rnd.randint(2, 40), lambda: w.emit(self._to(qid, rcpts, stat)))

    # -- leaks ------------------------------------------------------------------------
    def _expect(self, qid: str, rcpt: str, stat: str, allowed: bool,
                known_sender: bool = True) -> None:
        key = (qid, rcpt.lower())
        if key in self.reported:
            return
        self.reported.add(key)
        if allowed:
            self.facts.test_recipients += 1
            return
        sender = self.senders.get(qid) if known_sender else None
        self.facts.leaks.append(Leak(qid, rcpt, sender, stat, self.w.ts()))

    def _leak_to(self, qid: str, items: list[tuple[str, str, bool]], stat: str, *,
                 more: bool = False, allowed: bool = False, known_sender: bool = True,
                 program: str = "sendmail") -> None:
        """Emit a to= line now; items are (as written, address, is a sinkhole recipient)."""
        line = self._to(qid, ",".join(text for text, _, _ in items), stat, more, program)
        for _, addr, sink in items:
            if sink:
                self._expect(qid, addr, stat, allowed, known_sender)
        self.w.emit(line)

    def _leak_message(self) -> None:
        w, rnd = self.w, self.rnd
        self.n += 1
        k = self.n
        # hard: every other message's deliveries come far after its from= line.
        far_off = (rnd.randint(w.total // 40, w.total // 10)
                   if self.hard and k % 2 == 0 else 0)

        def later(delay: int, action: object) -> None:
            w.later(delay + far_off, action)

        qid = _qid(k * 7919)
        kind = self.kind % 12
        self.kind += 1
        if _PAIRS[kind] > self.target_pairs - self.planned_pairs:
            kind = 3
        self.planned_pairs += _PAIRS[kind]
        allowed = kind == 11
        sender = (f"qp-test-{k}@sub.example.com" if allowed
                  else rnd.choice((f"billing{k}@example.com", f"App{k}@Example.COM",
                                   f"noreply-{k}@mail.example.net")))
        if kind == 9:
            sender = ""
        self.senders[qid] = sender
        w.emit(self._from(qid, sender, 3))
        deferred = "Deferred: 421 4.3.2 Service temporarily unavailable"
        sent = "Sent (2.0.0 Message accepted for discard)"

        def leak(items: list[tuple[str, str, bool]], stat: str = sent, **kw: object) -> None:
            self._leak_to(qid, items, stat, allowed=allowed, **kw)  # type: ignore[arg-type]

        def b(addr: str, sink: bool = True) -> tuple[str, str, bool]:
            return (f"<{addr}>", addr, sink)

        if kind == 0:    # one recipient, deferred, retried later in another case
            a = f"nobody-{k}@sinkhole.test"
            later(rnd.randint(2, 30), lambda: leak([b(a)], deferred))
            later(rnd.randint(500, 5000),
                    lambda: self._leak_to(qid, [b(a.upper().replace("NOBODY", "Nobody"))],
                                          sent, allowed=allowed))
        elif kind == 1:  # several recipients on one line, one of them not a sinkhole
            later(rnd.randint(2, 30), lambda: leak(
                [b(f"nobody-{k}a@sinkhole.test"), b(f"ok{k}@example.org", False),
                 b(f"Nobody-{k}b@SinkHole.TEST")]))
        elif kind == 2:  # a long list split with [more], quoted local part with a comma
            later(rnd.randint(2, 30), lambda: leak(
                [(f'<"a,{k}"@sinkhole.test>', f'"a,{k}"@sinkhole.test', True),
                 b(f"x{k}@example.net", False)], more=True))
            later(rnd.randint(31, 60), lambda: leak([b(f"nobody-{k}c@sinkhole.test")]))
        elif kind == 3:  # subdomain with a trailing dot
            later(rnd.randint(2, 30), lambda: leak([b(f"nobody-{k}@deep.sinkhole.test.")]))
        elif kind == 4:  # bare addresses (command-line submission), queued
            later(rnd.randint(2, 30), lambda: leak(
                [(f"nobody-{k}@sinkhole.test", f"nobody-{k}@sinkhole.test", True),
                 (f"other{k}@example.org", f"other{k}@example.org", False)], "queued"))
        elif kind == 5:  # the delivery comes long after the from= line (beyond any window)
            far = min(25_000, w.total // 40)
            later(rnd.randint(far, 2 * far), lambda: leak(
                [b(f"late-{k}@Relay.Sinkhole.Test")], deferred))
        elif kind == 6:  # Postfix: one recipient per line, status=
            self._postfix_leak(k, allowed)
        elif kind == 7:  # sm-mta program name, User unknown
            later(rnd.randint(2, 30), lambda: leak(
                [b(f"nobody-{k}@sinkhole.test")], "User unknown", program="sm-mta"))
        elif kind == 8:  # two recipients, one line each
            later(rnd.randint(2, 30), lambda: leak([b(f"nobody-{k}a@sinkhole.test")]))
            later(rnd.randint(2, 30), lambda: leak([b(f"nobody-{k}b@sinkhole.test")]))
        elif kind == 9:  # a bounce: the null sender <>
            later(rnd.randint(2, 30), lambda: leak([b(f"nobody-{k}@sinkhole.test")]))
        elif kind == 10:  # lookalikes next to a real one
            later(rnd.randint(2, 30), lambda: leak(
                [b(f"a{k}@notsinkhole.test", False), b(f"b{k}@sinkhole.testing", False),
                 b(f"c{k}@sinkhole.test.example.com", False), b(f"nobody-{k}@sinkhole.test")]))
        else:            # allowlisted test traffic: two recipients, counted not reported
            later(rnd.randint(2, 30), lambda: leak(
                [b(f"probe-{k}a@sinkhole.test"), b(f"probe-{k}b@sinkhole.test")]))

    def _orphan(self) -> None:
        """A delivery whose from= line is not in the file: queued before the log began."""
        self.n += 1
        qid = _qid(self.n * 7919)
        self.planned_pairs += 1
        self._leak_to(qid, [(f"<orphan-{self.n}@sinkhole.test>", f"orphan-{self.n}@sinkhole.test",
                             True)], "Deferred: Connection timed out with sinkhole.test.",
                      known_sender=False)

    def _postfix_leak(self, k: int, allowed: bool) -> None:
        w, rnd = self.w, self.rnd
        q = _postfix_qid(k + 5 * 10**9)
        sender = f"app{k}@example.com"
        self.senders[q] = sender
        w.emit(f"{w.ts()} {w.host} postfix/qmgr[1022]: {q}: from=<{sender}>, size=1432, "
               "nrcpt=1 (queue active)")
        rcpt = f"Nobody-{k}@SinkHole.TEST."
        stat = ("deferred (connect to sinkhole.test[192.0.2.99]:25: Connection timed out)")

        def deliver() -> None:
            self._expect(q, rcpt, stat, allowed)
            w.emit(f"{w.ts()} {w.host} postfix/smtp[2205]: {q}: to=<{rcpt}>, relay=none, "
                   f"delay=0.53, delays=0.02/0/0.5/0, dsn=4.4.1, status={stat}")
        w.later(rnd.randint(2, 30), deliver)

    def _decoy(self) -> None:
        """The domain where it is no recipient: a sender, an opendkim line, a lookalike."""
        w, rnd = self.w, self.rnd
        self.n += 1
        qid = _qid(self.n * 7919)
        r = rnd.random()
        if r < 0.4:
            w.emit(self._from(qid, f"bounce-{self.n}@sinkhole.test", 1))
            w.later(3, lambda: w.emit(self._to(qid, f"<u{self.n}@example.org>", "Sent (ok)")))
        elif r < 0.7:
            w.emit(f"{w.ts()} {w.host} opendkim[77]: {qid}: no signing domain match for "
                   "'SinkHole.Test'")
        else:
            w.emit(self._to(qid, f"<n{self.n}@notsinkhole.test>", "Sent (ok)"))

    # -- driver -----------------------------------------------------------------------
    def run(self) -> MailLogFacts:
        w, rnd = self.w, self.rnd
        decoy_every = 50_000
        if self.hard:  # half the pairs, all over the file
            orphans = self.target_pairs // 2
            orphan_at = [max(1, int(w.total * 0.9) * (i + 1) // (orphans + 1))
                         for i in range(orphans)]
        else:  # a few, near the start
            orphans = max(1, self.target_pairs // 40) if self.target_pairs else 0
            orphan_at = [max(1, w.total // 100 * (i + 1) // (orphans + 1))
                         for i in range(orphans)]
        while w.index < w.total:
            if orphan_at and w.index >= orphan_at[0] and self.planned_pairs < self.target_pairs:
                orphan_at.pop(0)
                self._orphan()
                continue
            if w.pending and w.pending[0][0] <= w.index:
                _, _, action = heapq.heappop(w.pending)
                action()  # type: ignore[operator]
                continue
            if w.index >= self.next_slot and self.planned_pairs < self.target_pairs:
                self.next_slot += self.spacing
                self._leak_message()
                continue
            if w.index % decoy_every == decoy_every - 1:
                self._decoy()
                continue
            r = rnd.random()
            if r < 0.42:
                self._message()
            elif r < 0.55:
                self._postfix()
            else:
                self._noise()
        # Lines still pending past the end are dropped, except that the file ends here.
        w.flush()
        w.fh.close()
        self.facts.lines = w.index
        self.facts.domain_lines = w.domain_lines
        self.facts.domain_to_lines = w.domain_to_lines
        self.facts.size = self.facts.path.stat().st_size
        return self.facts
