"""Build a probe message and verify what came back.

The body carries a per-run token: a random nonce plus an HMAC of it keyed with
the configured secret. The secret itself never leaves the process (it would
otherwise sit in a mailbox and in every MTA's queue), yet only a holder of the
secret can mint a token that verifies. The `X-Selfcheck-Id` header lets the
cleanup find probes, and only probes, by an IMAP header search.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from email import message_from_bytes, policy
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid

PROBE_HEADER = "X-Selfcheck-Id"
ROUTE_HEADER = "X-Selfcheck-Route"


@dataclass(frozen=True)
class Probe:
    run_id: str
    token: str
    message_id: str
    subject: str
    sender: str
    recipient: str
    message: EmailMessage


class IntegrityError(Exception):
    """The received probe differs from what was sent; the message names the check."""


def new_run_id() -> str:
    return secrets.token_hex(6)


def make_token(secret: bytes, run_id: str) -> str:
    nonce = secrets.token_urlsafe(12)
    mac = hmac.new(secret, f"{run_id}.{nonce}".encode(), hashlib.sha256).hexdigest()[:32]
    return f"{nonce}.{mac}"


def build_probe(*, route: str, sender: str, recipient: str, secret: bytes, run_id: str) -> Probe:
    """A multipart/alternative probe with the token in both the text and HTML parts."""
    token = make_token(secret, run_id)
    domain = sender.rpartition("@")[2]
    # An explicit domain: make_msgid's default resolves the host name (blocking DNS).
    message_id = make_msgid(idstring=run_id, domain=domain)
    subject = f"selfcheckd probe {run_id}"

    msg = EmailMessage(policy=policy.SMTP)
    msg["From"] = sender
    msg["To"] = recipient
    msg["Subject"] = subject
    msg["Date"] = format_datetime(datetime.now(UTC))
    msg["Message-ID"] = message_id
    msg[PROBE_HEADER] = run_id
    msg[ROUTE_HEADER] = route
    # Keeps vacation responders and list software from answering the probe.
    msg["Auto-Submitted"] = "auto-generated"
    msg.set_content(
        "This is an automated end-to-end delivery check sent by selfcheckd.\n"
        "It is deleted as soon as it arrives; no action is needed.\n\n"
        f"selfcheck-token: {token}\n"
    )
    # Short lines keep the HTML part 7bit, so the token is greppable in the raw message.
    msg.add_alternative(
        "<html><body>\n"
        "<p>This is an automated end-to-end delivery check sent by selfcheckd.</p>\n"
        "<p>It is deleted as soon as it arrives; no action is needed.</p>\n"
        "<p>selfcheck-token:\n"
        f"<code>{token}</code></p>\n"
        "</body></html>\n",
        subtype="html",
    )
    return Probe(run_id, token, message_id, subject, sender, recipient, msg)


def verify_probe(raw: bytes, probe: Probe) -> None:
    """Raise IntegrityError naming the first check that fails."""
    msg = message_from_bytes(raw, policy=policy.default)
    if msg.defects:
        raise IntegrityError(f"MIME structure is malformed: {msg.defects[0].__class__.__name__}")
    expected = {
        PROBE_HEADER: probe.run_id,
        "Message-ID": probe.message_id,
        "Subject": probe.subject,
        "From": probe.sender,
        "To": probe.recipient,
    }
    for name, value in expected.items():
        got = msg.get(name)
        if got is None or str(got).strip() != value:
            raise IntegrityError(f"header {name} was altered or removed in transit")
    if msg.get_content_type() != "multipart/alternative":
        raise IntegrityError(f"expected multipart/alternative, got {msg.get_content_type()}")
    parts = {}
    for part in msg.iter_parts():
        if part.defects:
            raise IntegrityError(
                f"MIME part {part.get_content_type()} is malformed: "
                f"{part.defects[0].__class__.__name__}"
            )
        parts[part.get_content_type()] = part
    for ctype in ("text/plain", "text/html"):
        if ctype not in parts:
            raise IntegrityError(f"the {ctype} part is missing")
        try:
            content = parts[ctype].get_content()
        except (LookupError, ValueError) as exc:
            raise IntegrityError(f"the {ctype} part cannot be decoded: {exc}") from None
        if probe.token not in content:
            raise IntegrityError(f"the token is missing from the {ctype} part")
