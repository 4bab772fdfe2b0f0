"""Build a probe message, verify what came back, and prove a message is our own probe.

The body carries a per-run token: a random nonce plus an HMAC keyed with the
configured secret over the route, the run id and the nonce. The secret itself
never leaves the process (it would otherwise sit in a mailbox and in every
MTA's queue), yet only a holder of the secret can mint a token that verifies,
and a token minted for one route or run does not verify for another.

The `X-Selfcheck-Id` and `X-Selfcheck-Route` headers let the daemon find
candidates by an IMAP header search, but a search only finds candidates:
`is_own_probe` decides what may be deleted (exact route, run id present, a
token that verifies), so forged headers, another route's probes and
probe-like text are never touched.

The route header carries the route's name in a 7-bit form (`route_header_value`):
a name such as `défaut` went 8-bit into the quoted string of `UID SEARCH HEADER`,
which IMAP does not allow (pymap answered `* BYE [SERVERBUG]`, every run failed),
and an RFC 2047 encoded word cannot be searched for either: servers (Dovecot,
pymap) match a header search against the decoded text.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from email import message_from_bytes, policy
from email.errors import HeaderParseError
from email.header import decode_header, make_header
from email.message import EmailMessage, Message
from email.utils import format_datetime, make_msgid, parsedate_to_datetime
from urllib.parse import quote

import structlog

from daemon.config import SelfcheckConfig

PROBE_HEADER = "X-Selfcheck-Id"
ROUTE_HEADER = "X-Selfcheck-Route"
# Longer than any token and absent from the fixed text, so no part can contain it.
PROBE_BOUNDARY = "selfcheckd-probe-alternative-part"

log = structlog.get_logger("daemon.roundtrip")

# A nonce from token_urlsafe(12) (16 characters) and 32 hex digits of MAC.
_TOKEN = re.compile(r"(?<![A-Za-z0-9_-])([A-Za-z0-9_-]{16})\.([0-9a-f]{32})(?![0-9a-f])")
_MAC_HEX = 32

# The secret this process uses when none is configured: one per process, so a
# reload does not orphan the probes in flight.
_process_secret: bytes | None = None


def probe_secret(selfcheck: SelfcheckConfig) -> bytes:
    """The configured secret, or one random secret for this process (logged once)."""
    global _process_secret
    if selfcheck.secret is not None:
        return selfcheck.secret.get_secret_value().encode()
    if _process_secret is None:
        _process_secret = secrets.token_bytes(32)
        log.warning(
            "selfcheck_secret_random",
            detail="no selfcheck secret configured (set selfcheck.secret, secret_file or "
            "secret_env): probes of this process verify, but late probes left by an earlier "
            "process cannot be proven ours and are left in the mailbox",
        )
    return _process_secret


@dataclass(frozen=True)
class Probe:
    run_id: str
    route: str
    token: str
    message_id: str
    subject: str
    sender: str
    recipient: str
    message: EmailMessage


class IntegrityError(Exception):
    """The received probe differs from what was sent; the message names the check."""


# Printable ASCII but "%": kept as they are in the route header (so the probes of such
# routes are what they always were); anything else is percent-encoded as UTF-8.
_ROUTE_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")


def route_header_value(route: str) -> str:
    """`route` as X-Selfcheck-Route carries it and the sweep searches for it: 7-bit.

    `défaut` is `d%C3%A9faut`, `eu west` stays `eu west`; a space at either end is
    `%20` (header values are read stripped). Names that differ give different values.
    """
    encoded = quote(route, safe=_ROUTE_SAFE)
    body = encoded.strip(" ")
    start = encoded.index(body) if body else len(encoded)
    return "%20" * start + body + "%20" * (len(encoded) - start - len(body))


def _mac(secret: bytes, route: str, run_id: str, nonce: str) -> str:
    data = f"{route}\n{run_id}\n{nonce}".encode()
    return hmac.new(secret, data, hashlib.sha256).hexdigest()[:_MAC_HEX]


def make_token(secret: bytes, route: str, run_id: str) -> str:
    """`<nonce>.<mac>`: verifies only with `secret` for this `route` and `run_id`."""
    nonce = secrets.token_urlsafe(12)
    return f"{nonce}.{_mac(secret, route, run_id, nonce)}"


def verify_token(secret: bytes, route: str, run_id: str, token: str) -> bool:
    nonce, _, mac = token.partition(".")
    return hmac.compare_digest(mac, _mac(secret, route, run_id, nonce))


def build_probe(*, route: str, sender: str, recipient: str, secret: bytes, run_id: str) -> Probe:
    """A multipart/alternative probe with the token in both the text and HTML parts."""
    token = make_token(secret, route, run_id)
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
    msg[ROUTE_HEADER] = route_header_value(route)
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
    # A random boundary per probe costs one compiled regex per message in `re`'s global
    # cache (the generator's collision check and every parse of the received copy): 512
    # one-off patterns, about 1 MiB, evicting other code's cached ones. The parts are
    # ours, so a fixed boundary cannot collide with their text.
    msg.set_boundary(PROBE_BOUNDARY)
    return Probe(run_id, route, token, message_id, subject, sender, recipient, msg)


def verify_probe(raw: bytes, probe: Probe) -> None:
    """Raise IntegrityError naming the first check that fails."""
    msg = message_from_bytes(raw, policy=policy.default)
    if msg.defects:
        raise IntegrityError(f"MIME structure is malformed: {msg.defects[0].__class__.__name__}")
    expected = {
        PROBE_HEADER: probe.run_id,
        ROUTE_HEADER: route_header_value(probe.route),
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


# Messages are read with the compat32 policy wherever many may be (the sweep's candidates):
# policy.default builds a header object for every header it is asked about, about 7 ms a
# probe against 0.7 ms, which made a sweep of 4,000 candidates 28 s of blocked event loop.
# Header values are decoded as policy.default shows them (unfolded, RFC 2047 words decoded).
_FOLD = re.compile(r"\r?\n(?=[ \t])")


def _header_text(value: object) -> str:
    raw = _FOLD.sub("", str(value))
    try:
        return str(make_header(decode_header(raw))).strip()
    except (HeaderParseError, LookupError, UnicodeError, ValueError):
        return raw.strip()


def _single_value(msg: Message, name: str) -> str | None:
    """The header's value if it is present and every copy of it agrees, else None."""
    values = {_header_text(v) for v in msg.get_all(name, [])}
    return values.pop() if len(values) == 1 else None


@dataclass(frozen=True)
class ProbeHeaders:
    """What a fetched header block says about a probe (not proof that it is one)."""

    run_id: str
    sent_at: float  # its Date as a timestamp; 0 (long ago) when the Date cannot be read


def probe_headers(header_block: bytes, route: str) -> ProbeHeaders | None:
    """The run id and Date of a probe header block naming exactly `route`, else None.

    A cheap first filter on fetched headers; deletion still needs `is_own_probe`.
    """
    try:
        msg = message_from_bytes(header_block, policy=policy.compat32)
        if _single_value(msg, ROUTE_HEADER) != route_header_value(route):
            return None
        run_id = _single_value(msg, PROBE_HEADER)
        if not run_id:
            return None
        try:
            sent_at = parsedate_to_datetime(_header_text(msg.get("Date", ""))).timestamp()
        except (TypeError, ValueError, IndexError, OverflowError):
            sent_at = 0.0  # a mangled Date makes it stale
        return ProbeHeaders(run_id, sent_at)
    except Exception:  # mail from anyone: a parser bug must not fail the run
        return None


def is_own_probe(raw: bytes, *, secret: bytes, route: str, run_id: str | None = None) -> bool:
    """True only if `raw` is provably a probe this daemon sent for `route`.

    Its `X-Selfcheck-Route` is exactly `route` (in its 7-bit form), its `X-Selfcheck-Id` is
    present (and equals `run_id` when given), and a token in its text/plain or
    text/html part verifies with `secret` for that route and run id. One
    verifying part is enough: a probe whose other part was altered in transit
    is still ours to delete.
    """
    try:
        return _is_own_probe(raw, secret, route, run_id)
    except Exception:  # mail from anyone: what we cannot parse is not provably ours
        return False


def _is_own_probe(raw: bytes, secret: bytes, route: str, run_id: str | None) -> bool:
    msg = message_from_bytes(raw, policy=policy.compat32)
    if _single_value(msg, ROUTE_HEADER) != route_header_value(route):
        return False
    probe_id = _single_value(msg, PROBE_HEADER)
    if not probe_id or (run_id is not None and probe_id != run_id):
        return False
    for part in msg.walk():
        if part.is_multipart() or part.get_content_type() not in ("text/plain", "text/html"):
            continue
        content = _part_text(part)
        if content is None:
            continue
        for match in _TOKEN.finditer(content):
            if verify_token(secret, route, probe_id, match.group(0)):
                return True
    return False


def _part_text(part: Message) -> str | None:
    """A text part's content, transfer-decoded and charset-decoded (as get_content does)."""
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return None
    charset = part.get_content_charset() or "us-ascii"
    try:
        return payload.decode(charset, errors="replace")
    except LookupError:  # a charset Python does not know: the token is ASCII anyway
        return payload.decode("ascii", errors="replace")
