"""Authentication-Results (RFC 8601): which verdicts to trust, what they say, and the judgement.

Anyone can write an `Authentication-Results` header into a message, so a
header is only evidence when it comes from the server we trust: its
authserv-id (the first token of the header) equals the route's
`expect.authserv_id`, and it stands above every header from another id.
Receiving MTAs prepend their headers and a border MTA removes incoming ones
that claim its own id, so the trusted headers are the block at the top. A
forged header from another id further down is ignored; so is a header with the
trusted id below a foreign one (something after the trusted server added it).
Several milters of one server each add a header with the same id; the block
is read as one, and for each method the topmost header that reports it decides
(a lower one with the same id is older, or a forgery the server did not strip).

The header grammar (comments, folding, quoted strings, `ptype.property=value`)
is parsed by `authres`, not by regexes. Only the methods in `METHODS` are
recorded; a method reported twice in that header (two DKIM signatures) counts as
`pass` when any of its results passes, as DMARC reads DKIM, else as its first
result. A header `authres` rejects is parsed once more leniently (a trailing `;`
dropped, non-ASCII replaced), since only methods and results are read (the
authserv-id is then the one written); one that still fails ends the trusted
block there (what it says is unknown, so older headers below cannot decide) and
is named in the judgement's error.

Without a configured authserv-id, the id of the topmost header is taken and
that block is recorded, never judged: it is the final receiving server's own
verdict only if that server writes one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from email.message import Message
from typing import Any

import authres  # type: ignore[import-untyped]
import structlog

from daemon.checks.result import AUTH_METHODS
from daemon.config import ExpectConfig

log = structlog.get_logger("daemon.roundtrip")

HEADER = "Authentication-Results"
METHODS = AUTH_METHODS
# The authserv-id of a header authres cannot parse: its first token, comments skipped.
_LEADING_ID = re.compile(r"^\s*(?:\([^()]*\)\s*)*([^\s;()]+)")
_FOLD = re.compile(r"\r?\n(?=[ \t])")
_NON_ASCII = re.compile(r"[^\x00-\x7f]")


@dataclass
class AuthVerdicts:
    """The verdicts of one authserv-id, read from the headers it added on top."""

    authserv_id: str | None  # None: the probe carries no Authentication-Results at all
    results: dict[str, str] = field(default_factory=dict)
    headers: int = 0  # how many headers from that id were read (0: none stood on top)
    unparsed: list[str] = field(default_factory=list)  # why a header of that id was skipped


def read_verdicts(msg: Message, authserv_id: str | None) -> AuthVerdicts:
    """The trusted verdicts of `msg` (see the module docstring); never raises on bad input."""
    parsed = [_parse(str(value)) for value in msg.get_all(HEADER, [])]
    if authserv_id is None:
        if not parsed or parsed[0][0] is None or parsed[0][2] is not None:
            # None, or a topmost header we cannot read (Outlook.com's carry no
            # authserv-id at all): nothing to attribute verdicts to.
            return AuthVerdicts(None, unparsed=[parsed[0][2]] if parsed and parsed[0][2] else [])
        authserv_id = parsed[0][0]
    trusted = authserv_id.lower()
    verdicts = AuthVerdicts(trusted)
    found: dict[str, list[str]] = {}
    for header_id, results, problem in parsed:
        if header_id != trusted:
            break  # the first header from anyone else ends the trusted block
        verdicts.headers += 1
        if problem is not None:
            # What it says is unknown, so the older headers below cannot decide for it.
            verdicts.unparsed.append(problem)
            break
        here: dict[str, list[str]] = {}
        for method, result in results:
            here.setdefault(method, []).append(result)
        for method, reported in here.items():
            # The topmost header that reports a method decides it: one further down with
            # the same id is older, or written by someone the server failed to strip.
            found.setdefault(method, reported)
    for method in METHODS:
        if seen := found.get(method):
            verdicts.results[method] = "pass" if "pass" in seen else seen[0]
    if verdicts.unparsed:
        log.warning("selfcheck_auth_results_unparsed", authserv_id=trusted,
                    detail="; ".join(verdicts.unparsed))
    return verdicts


def judge(verdicts: AuthVerdicts, expect: ExpectConfig | None) -> str | None:
    """Why the verdicts fail the route's expectations (an error for reason `auth`), or None."""
    if expect is None:
        return None
    wanted = {m: r for m in ("spf", "dkim", "dmarc") if (r := getattr(expect, m)) is not None}
    if not wanted:
        return None  # authserv_id alone: record, never judge
    if verdicts.headers == 0:
        return f"no Authentication-Results from {expect.authserv_id}"
    wrong = []
    missing = False
    for method, want in wanted.items():
        seen = verdicts.results.get(method)
        if seen is None:
            missing = True
            wrong.append(f"{method} not reported, expected {want}")
        elif seen != want:
            wrong.append(f"{method}={seen}, expected {want}")
    if not wrong:
        return None
    if missing and verdicts.unparsed:
        wrong.append(f"{len(verdicts.unparsed)} header(s) unreadable: {verdicts.unparsed[0]}")
    return f"Authentication-Results from {verdicts.authserv_id}: {'; '.join(wrong)}"


def _parse(value: str) -> tuple[str | None, list[tuple[str, str]], str | None]:
    """(authserv-id, [(method, result)], parse problem) of one header value."""
    text = _FOLD.sub("", value).strip()
    leading = _LEADING_ID.match(text)
    leading_id = leading.group(1).lower() if leading else None
    try:
        header, lenient = _parse_value(text)
    except Exception as exc:  # authres raises its own SyntaxError and friends on any input
        return leading_id, [], f"{type(exc).__name__}: {exc}"[:200]
    results = [
        (str(r.method).lower(), str(r.result).lower())
        for r in header.results
        if str(r.method).lower() in METHODS and r.result
    ]
    # The lenient parse rewrote the text: the id is the one written, not the rewritten one
    # (`mx.eüample` must not become a trusted `mx.example`).
    header_id = leading_id if lenient else str(header.authserv_id).lower()
    return header_id, results, None


def _parse_value(text: str) -> tuple[Any, bool]:
    """authres's parse, then once more without the slips real servers make; whether the
    second (lenient) parse was needed."""
    try:
        return authres.parse_value(text), False
    except Exception:
        lenient = _NON_ASCII.sub("x", text).rstrip().rstrip(";").rstrip()
        if lenient == text:
            raise
        return authres.parse_value(lenient), True
