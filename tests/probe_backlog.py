"""What a mail outage leaves in a mailbox: many late probes, and probe-like messages that do
not verify (another secret's probes, forged headers), built fast enough to make thousands."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

from daemon.checks.result import new_run_id
from daemon.roundtrip.probe import build_probe, make_token

SENDER = "selfcheck@selfcheckd.test"
RECIPIENT = "selfcheck-receiver@selfcheckd.test"


def ten_minutes_ago() -> str:
    return format_datetime(datetime.now(UTC) - timedelta(minutes=10))


def probes(count: int, *, secret: bytes, route: str = "default", sender: str = SENDER,
           recipient: str = RECIPIENT) -> list[bytes]:
    """`count` probes of `route` sent ten minutes ago, each with its own run id and a token
    signed with `secret`: one is built, the others are copies with their id and token
    replaced (building 4,000 would take 20 s)."""
    run_id = new_run_id()
    template = build_probe(route=route, sender=sender, recipient=recipient, secret=secret,
                           run_id=run_id)
    del template.message["Date"]
    template.message["Date"] = ten_minutes_ago()
    raw = template.message.as_bytes()
    out = []
    for _ in range(count):
        other = new_run_id()
        token = make_token(secret, route, other)
        out.append(raw.replace(run_id.encode(), other.encode())
                   .replace(template.token.encode(), token.encode()))
    return out


def forged(count: int, *, route: str = "default", recipient: str = RECIPIENT) -> list[bytes]:
    """Probe headers of `route`, an old Date, and a token nobody signed."""
    date = ten_minutes_ago()
    return [(f"From: someone@example.org\r\nTo: {recipient}\r\nSubject: looks like a probe\r\n"
             f"Date: {date}\r\nX-Selfcheck-Id: {new_run_id()}\r\n"
             f"X-Selfcheck-Route: {route}\r\n\r\n"
             "selfcheck-token: AAAAAAAAAAAAAAAA.0123456789abcdef0123456789abcdef\r\n").encode()
            for _ in range(count)]


def backlog(count: int, *, secret: bytes, route: str = "default", sender: str = SENDER,
            recipient: str = RECIPIENT) -> tuple[list[bytes], list[bytes], list[bytes]]:
    """`count` late probes and `count` decoys (half signed with another secret, half
    forged), and both interleaved as an outage leaves them: (late, decoys, mixed)."""
    late = probes(count, secret=secret, route=route, sender=sender, recipient=recipient)
    decoys = (probes(count // 2, secret=b"another-" + secret, route=route, sender=sender,
                     recipient=recipient)
              + forged(count - count // 2, route=route, recipient=recipient))
    mixed = [m for pair in zip(late, decoys, strict=True) for m in pair]
    return late, decoys, mixed
