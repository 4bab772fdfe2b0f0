"""Delivery quality against the embedded stack: Authentication-Results, Junk, hops, TLS.

The embedded SMTP server (real aiosmtpd) stamps Received and Authentication-Results
headers as a receiving MTA and its milters would, and files chosen recipients into a
Junk mailbox of the real pymap server; the TLS tests use a certificate whose notAfter
the test chose.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import ssl
import subprocess
import time
from datetime import UTC, datetime, timedelta
from email import message_from_bytes, message_from_string
from email.message import Message
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from daemon.app import Daemon
from daemon.checks.result import CheckResult, FailureReason
from daemon.checks.runner import Runner
from daemon.cli import main
from daemon.config import Config, ConfigError, LoadedConfig, load_config
from daemon.embedded.smtp_server import AUTHSERV_ID, auth_results_value
from daemon.embedded.stack import EmbeddedMailStack
from daemon.metrics import Metrics
from daemon.roundtrip.authresults import judge, read_verdicts
from daemon.roundtrip.check import RoundTrip
from daemon.roundtrip.hops import parse_hops
from daemon.roundtrip.probe import PROBE_HEADER, build_probe
from daemon.roundtrip.tls import certificate_not_after
from tests.conftest import StackFactory, make_config
from tests.faulty_servers import wedging_proxy
from tests.waiting import until

SECRET = b"test-secret-value"
ALL_PASS = {"spf": "pass", "dkim": "pass", "dmarc": "pass"}
# The certificate the TLS tests' servers present ends at this (whole) second: about three
# years from the run (a fixed date would expire one day, and with it every TLS test).
NOT_AFTER = datetime.now(UTC).replace(microsecond=0) + timedelta(days=1000)
NOT_AFTER_SHOWN = f"{NOT_AFTER:%Y-%m-%dT%H:%M:%SZ}"


def roundtrip(route: dict[str, Any], *, junk_first_look: float = 0.2,
              **selfcheck: Any) -> RoundTrip:
    cfg = make_config(route, **selfcheck)
    return RoundTrip(cfg.selfcheck.routes[0], cfg.selfcheck, SECRET,
                     junk_first_look=junk_first_look)


async def check(route: dict[str, Any], metrics: Metrics | None = None,
                **options: Any) -> CheckResult:
    return await Runner(metrics).execute(roundtrip(route, **options))


def expecting(stack: EmbeddedMailStack, **expect: str) -> dict[str, Any]:
    route = stack.route_table()
    route["expect"] = expect
    return route


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def auth_series(metrics: Metrics) -> dict[tuple[str, str], float]:
    """Every selfcheck_auth_result series of route default: (method, result) -> value."""
    out = {}
    for family in metrics.registry.collect():
        if family.name == "selfcheck_auth_result":
            for s in family.samples:
                out[(s.labels["method"], s.labels["result"])] = s.value
    return out


async def probes_in(stack: EmbeddedMailStack, mailbox: str = "INBOX") -> int:
    messages = await stack.imap.messages(stack.options.imap_user, mailbox)
    return sum(1 for raw in messages if message_from_bytes(raw).get(PROBE_HEADER) is not None)


# -- Authentication-Results --------------------------------------------------------------

async def test_passing_verdicts_meet_the_expectations_and_are_exported(
    mail_stack: EmbeddedMailStack,
) -> None:
    """spf, dkim and dmarc pass from the trusted id: success, recorded in JSON and metrics."""
    mail_stack.smtp.auth_results = [auth_results_value(ALL_PASS)]
    metrics = Metrics()
    result = await check(expecting(mail_stack, authserv_id=AUTHSERV_ID, spf="pass",
                                   dkim="pass", dmarc="pass"), metrics)
    assert result.success, result.error
    assert result.as_dict()["auth"] == ALL_PASS
    assert result.as_dict()["authserv_id"] == AUTHSERV_ID
    assert auth_series(metrics) == {("spf", "pass"): 1, ("dkim", "pass"): 1, ("dmarc", "pass"): 1}
    assert await probes_in(mail_stack) == 0


async def test_a_failing_verdict_fails_with_reason_auth_naming_method_seen_and_expected(
    mail_stack: EmbeddedMailStack,
) -> None:
    """dkim=fail and dmarc=fail where pass is expected: reason auth, each named; probe deleted."""
    mail_stack.smtp.auth_results = [
        auth_results_value({"spf": "pass", "dkim": "fail", "dmarc": "fail"})]
    metrics = Metrics()
    result = await check(expecting(mail_stack, authserv_id=AUTHSERV_ID, spf="pass",
                                   dkim="pass", dmarc="pass"), metrics)
    assert result.reason is FailureReason.AUTH
    assert result.error == (f"Authentication-Results from {AUTHSERV_ID}: "
                            "dkim=fail, expected pass; dmarc=fail, expected pass")
    assert result.auth == {"spf": "pass", "dkim": "fail", "dmarc": "fail"}
    assert result.reception_time is not None  # it arrived: only the verdict is wrong
    assert sample(metrics, "selfcheck_failures_total", route="default", reason="auth") == 1
    assert auth_series(metrics)[("dmarc", "fail")] == 1
    assert await probes_in(mail_stack) == 0


async def test_a_forged_all_pass_header_below_the_trusted_one_is_ignored(
    mail_stack: EmbeddedMailStack,
) -> None:
    """A forged all-pass header from another id, below the trusted dmarc=fail: still fails."""
    mail_stack.smtp.auth_results = [auth_results_value({"spf": "pass", "dmarc": "fail"})]
    mail_stack.smtp.forged_auth_results = [
        auth_results_value({**ALL_PASS, "arc": "pass"}, authserv_id="mx.forger.example")]
    result = await check(expecting(mail_stack, authserv_id=AUTHSERV_ID, dmarc="pass"))
    assert result.reason is FailureReason.AUTH
    assert result.auth == {"spf": "pass", "dmarc": "fail"}
    assert "dmarc=fail, expected pass" in (result.error or "")


async def test_a_header_with_the_trusted_id_below_a_foreign_one_is_not_trusted(
    mail_stack: EmbeddedMailStack,
) -> None:
    """Only the block on top counts: a trusted-id header under a foreign one is forged too."""
    mail_stack.smtp.auth_results = [auth_results_value({"dmarc": "fail"})]
    mail_stack.smtp.forged_auth_results = [
        auth_results_value(ALL_PASS, authserv_id="relay.elsewhere.example"),
        auth_results_value(ALL_PASS),  # claims the trusted id, but stands below a foreign one
    ]
    result = await check(expecting(mail_stack, authserv_id=AUTHSERV_ID, dmarc="pass"))
    assert result.reason is FailureReason.AUTH
    assert result.auth == {"dmarc": "fail"}


async def test_no_header_from_the_trusted_id_fails_a_route_with_expectations(
    mail_stack: EmbeddedMailStack,
) -> None:
    """Only a forged header from another id: reason auth, "no Authentication-Results from <id>"."""
    mail_stack.smtp.forged_auth_results = [
        auth_results_value(ALL_PASS, authserv_id="mx.forger.example")]
    result = await check(expecting(mail_stack, authserv_id=AUTHSERV_ID, dmarc="pass"))
    assert result.reason is FailureReason.AUTH
    assert result.error == f"no Authentication-Results from {AUTHSERV_ID}"
    assert result.auth == {}
    assert await probes_in(mail_stack) == 0


async def test_no_header_at_all_fails_a_route_with_expectations(
    mail_stack: EmbeddedMailStack,
) -> None:
    """A receiving side that stamps nothing fails a route that expects verdicts."""
    result = await check(expecting(mail_stack, authserv_id=AUTHSERV_ID, spf="pass"))
    assert result.reason is FailureReason.AUTH
    assert result.error == f"no Authentication-Results from {AUTHSERV_ID}"


async def test_authserv_id_alone_records_verdicts_and_never_judges(
    mail_stack: EmbeddedMailStack,
) -> None:
    """[expect] with authserv_id only: failing verdicts are recorded, the run succeeds."""
    mail_stack.smtp.auth_results = [auth_results_value({"spf": "softfail", "dmarc": "fail"})]
    metrics = Metrics()
    result = await check(expecting(mail_stack, authserv_id=AUTHSERV_ID), metrics)
    assert result.success, result.error
    assert result.auth == {"spf": "softfail", "dmarc": "fail"}
    assert auth_series(metrics) == {("spf", "softfail"): 1, ("dmarc", "fail"): 1}


async def test_without_an_authserv_id_the_topmost_header_is_recorded_with_its_id(
    mail_stack: EmbeddedMailStack,
) -> None:
    """No [expect]: the topmost header's verdicts, named by its authserv-id, never judged."""
    mail_stack.smtp.auth_results = [
        auth_results_value({"dkim": "fail"}, authserv_id="mx.receiver.example")]
    mail_stack.smtp.forged_auth_results = [auth_results_value(ALL_PASS)]
    result = await check(mail_stack.route_table())
    assert result.success, result.error
    assert result.auth == {"dkim": "fail"}
    assert result.authserv_id == "mx.receiver.example"


async def test_a_probe_without_any_header_records_no_verdicts(
    mail_stack: EmbeddedMailStack,
) -> None:
    """Nothing stamped, nothing expected: success, auth {} and no authserv-id."""
    result = await check(mail_stack.route_table())
    assert result.success, result.error
    assert (result.auth, result.authserv_id) == ({}, None)


async def test_the_next_verdict_replaces_the_last_one_in_the_metrics(
    mail_stack: EmbeddedMailStack,
) -> None:
    """selfcheck_auth_result holds only the current result per method: no stale series."""
    metrics = Metrics()
    mail_stack.smtp.auth_results = [auth_results_value({"dkim": "fail", "arc": "pass"})]
    await check(mail_stack.route_table(), metrics)
    mail_stack.smtp.auth_results = [auth_results_value({"dkim": "pass"})]
    await check(mail_stack.route_table(), metrics)
    assert auth_series(metrics) == {("dkim", "pass"): 1}


def message(*headers: str) -> Message:
    return message_from_bytes("".join(f"{h}\r\n" for h in headers).encode() + b"\r\nbody\r\n")


def test_header_grammar_comments_folding_quoted_strings_and_milters() -> None:
    """Comments, folding, quoted strings and versions parse; one id's milters read as one."""
    msg = message(
        "Authentication-Results: MX.Example.COM (OpenDMARC) 1;\r\n"
        '\tdmarc=fail (p=reject dis=none) header.from="example.com"',
        "Authentication-Results: mx.example.com; dkim=fail (bad sig) reason=\"body hash\"\r\n"
        "  header.d=example.com header.s=s1; dkim=pass (good (nested) sig) header.d=example.com",
        "Authentication-Results: (the SPF milter) mx.example.com;\r\n spf=pass\r\n"
        "  (mx.example.com: 192.0.2.1 is allowed) smtp.mailfrom=a@example.com",
        "Authentication-Results: mx.example.com; iprev=pass policy.iprev=192.0.2.1",
    )
    verdicts = read_verdicts(msg, "mx.example.com")
    # dkim: one of two signatures passes, so dkim passes (as DMARC reads it); iprev is not kept.
    assert verdicts.results == {"spf": "pass", "dkim": "pass", "dmarc": "fail"}
    assert verdicts.headers == 4


def test_unparseable_and_unknown_results_are_handled_without_raising() -> None:
    """A header of the trusted id that does not parse ends the block; odd results stay."""
    msg = message(
        "Authentication-Results: mx.example.com; dmarc=bestguesspass header.from=example.com",
        "Authentication-Results: mx.example.com; ===garbage",
        "Authentication-Results: mx.example.com; spf=pass smtp.mailfrom=example.com",
    )
    verdicts = read_verdicts(msg, "mx.example.com")
    # The unreadable header ends the block: the spf=pass below it is older.
    assert verdicts.results == {"dmarc": "bestguesspass"}
    assert len(verdicts.unparsed) == 1 and verdicts.headers == 2


def test_a_header_without_an_authserv_id_is_attributed_to_no_one() -> None:
    """Outlook.com's id-less header on top: nothing recorded, and no id made up from it."""
    verdicts = read_verdicts(message(
        "Authentication-Results: spf=pass (sender IP is 192.0.2.1) smtp.mailfrom=example.com;"
        " dkim=pass (signature was verified) header.d=example.com;dmarc=pass action=none"
        " header.from=example.com;compauth=pass reason=100"), None)
    assert (verdicts.authserv_id, verdicts.results, verdicts.headers) == (None, {}, 0)


async def test_the_result_line_carries_the_facts_and_the_seed_line_is_unchanged(
    mail_stack: EmbeddedMailStack,
) -> None:
    """`selfcheck_result` gains auth, authserv_id, found_in; `selfcheck_completed` is as it was."""
    mail_stack.smtp.auth_results = [auth_results_value({"spf": "pass", "dmarc": "fail"})]
    with capture_logs() as logs:
        result = await check(mail_stack.route_table())
    (completed,) = [e for e in logs if e["event"] == "selfcheck_completed"]
    assert list(completed) == ["success", "send_time", "reception_time", "route", "event",
                               "log_level"]
    (line,) = [e for e in logs if e["event"] == "selfcheck_result"]
    assert line["auth"] == "spf=pass dmarc=fail"
    assert (line["authserv_id"], line["found_in"]) == (AUTHSERV_ID, "INBOX")
    assert result.success


def test_judging_names_a_missing_method() -> None:
    """An expected method the trusted server did not report is named as not reported."""
    cfg = make_config({**base_route(), "expect": {"authserv_id": "mx.example.com",
                                                  "dkim": "pass", "spf": "pass"}})
    expect = cfg.selfcheck.routes[0].expect
    verdicts = read_verdicts(message("Authentication-Results: mx.example.com; spf=pass"),
                             "mx.example.com")
    assert judge(verdicts, expect) == ("Authentication-Results from mx.example.com: "
                                       "dkim not reported, expected pass")


def test_the_topmost_header_of_the_trusted_id_decides_each_method() -> None:
    """An all-pass header claiming the trusted id further down (written before the server
    saw the message, and not stripped) cannot turn the server's own fail into a pass."""
    msg = message(
        "Authentication-Results: mx.example.com; spf=fail smtp.mailfrom=example.com;"
        " dkim=fail header.d=example.com",
        "Authentication-Results: mx.example.com; dmarc=fail header.from=example.com",
        "Authentication-Results: mx.example.com; spf=pass; dkim=pass; dmarc=pass; arc=pass",
    )
    verdicts = read_verdicts(msg, "mx.example.com")
    # arc is reported only by the lowest header of the block, so that one still decides it.
    assert verdicts.results == {"spf": "fail", "dkim": "fail", "dmarc": "fail", "arc": "pass"}


def test_common_slips_parse_and_an_unreadable_header_is_named_in_the_error() -> None:
    """A trailing `;` and UTF-8 in a property value still give their verdicts; a header
    that cannot be read at all is named in the error instead of "not reported" alone."""
    msg = message(
        "Authentication-Results: mx.example.com; spf=pass smtp.mailfrom=j\u00f6e@example.com;",
        "Authentication-Results: mx.example.com; dkim=pass header.d=example.com;",
    )
    assert read_verdicts(msg, "mx.example.com").results == {"spf": "pass", "dkim": "pass"}
    cfg = make_config({**base_route(), "expect": {"authserv_id": "mx.example.com",
                                                  "dmarc": "pass"}})
    broken = read_verdicts(message("Authentication-Results: mx.example.com; ===garbage"),
                           "mx.example.com")
    error = judge(broken, cfg.selfcheck.routes[0].expect)
    assert error is not None
    assert error.startswith("Authentication-Results from mx.example.com: dmarc not reported, "
                            "expected pass; 1 header(s) unreadable: ")


def test_the_lenient_parse_keeps_the_written_authserv_id() -> None:
    """Re-parsing with non-ASCII replaced must not turn `mx.eüample.com` into the trusted
    `mx.example.com`, whose verdicts it would then complete."""
    forged = read_verdicts(message_from_string(
        "Authentication-Results: mx.example.com; spf=pass; dkim=pass\n"
        "Authentication-Results: mx.e\u00fcample.com; dmarc=pass header.from=\u00e9.com;\n"
        "\nbody\n"), "mx.example.com")
    assert forged.results == {"spf": "pass", "dkim": "pass"}


def test_an_unreadable_trusted_header_ends_the_block() -> None:
    """What an unreadable header of the trusted id said is unknown, so the older header
    below it cannot decide: the methods are missing and the error names the header."""
    cfg = make_config({**base_route(), "expect": {"authserv_id": "mx.example.com",
                                                  "dkim": "pass"}})
    verdicts = read_verdicts(message(
        "Authentication-Results: mx.example.com; ===dkim=fail",
        "Authentication-Results: mx.example.com; dkim=pass header.d=example.com",
    ), "mx.example.com")
    assert verdicts.results == {}
    error = judge(verdicts, cfg.selfcheck.routes[0].expect)
    assert error is not None and "dkim not reported" in error and "unreadable" in error


async def test_an_unreadable_trusted_header_is_counted_and_named_in_the_result(
    mail_stack: EmbeddedMailStack,
) -> None:
    """A trusted header that cannot be read shows in the result JSON and in a counter, even
    when the route judges nothing, so a milter writing broken headers is not invisible."""
    mail_stack.smtp.auth_results = [f"{AUTHSERV_ID}; ===garbage"]
    metrics = Metrics()
    result = await check(expecting(mail_stack, authserv_id=AUTHSERV_ID), metrics)
    assert result.success, result.error
    assert len(result.as_dict()["auth_unparsed"]) == 1
    assert sample(metrics, "selfcheck_auth_results_unparsed_total", route="default") == 1
    await check(mail_stack.route_table(), metrics)
    assert sample(metrics, "selfcheck_auth_results_unparsed_total", route="default") == 2


async def test_results_outside_the_registry_are_labelled_other(
    mail_stack: EmbeddedMailStack,
) -> None:
    """A result not in RFC 8601's registry keeps its text in JSON and reads "other" as a label."""
    mail_stack.smtp.auth_results = [auth_results_value({"dmarc": "bestguesspass"})]
    metrics = Metrics()
    result = await check(mail_stack.route_table(), metrics)
    assert result.auth == {"dmarc": "bestguesspass"}
    assert auth_series(metrics) == {("dmarc", "other"): 1}


# -- Junk placement ------------------------------------------------------------------------

def decoy(stack: EmbeddedMailStack, run_id: str) -> list[bytes]:
    """Mail a junk folder may hold: a forged probe of this run, another route's probe, spam."""
    o = stack.options
    other_route = build_probe(route="default-eu", sender=o.sender, recipient=o.recipient,
                              secret=SECRET, run_id=run_id)
    return [
        (f"From: x@spam.example\r\nTo: {o.recipient}\r\nSubject: forged\r\n"
         f"X-Selfcheck-Id: {run_id}\r\nX-Selfcheck-Route: default\r\n\r\n"
         "selfcheck-token: AAAAAAAAAAAAAAAA.0123456789abcdef0123456789abcdef\r\n").encode(),
        other_route.message.as_bytes(),
        b"From: x@spam.example\r\nSubject: cheap watches\r\n\r\nbuy\r\n",
    ]


class DecoysInJunk:
    """Puts decoys naming each run's id into Junk as the run starts."""

    def __init__(self, stack: EmbeddedMailStack, inner: RoundTrip) -> None:
        self.stack, self.inner = stack, inner
        self.name, self.kind = inner.name, inner.kind
        self.deadline, self.cleanup_timeout = inner.deadline, inner.cleanup_timeout
        self.decoys: list[bytes] = []

    def start(self, result: CheckResult) -> Any:
        run = self.inner.start(result)
        outer = self

        class Run:
            async def run(self) -> None:
                outer.decoys = decoy(outer.stack, result.run_id)
                for raw in outer.decoys:
                    await outer.stack.imap.deliver(outer.stack.options.imap_user, raw, "Junk")
                await run.run()

            async def cleanup(self) -> None:
                await run.cleanup()

        return Run()


async def test_a_probe_in_junk_fails_with_reason_junk_and_is_deleted_there(
    mail_stack: EmbeddedMailStack,
) -> None:
    """Filed into Junk: reason junk naming it; only the probe is deleted, decoys stay."""
    mail_stack.smtp.junk_recipients = {mail_stack.options.recipient}
    mail_stack.smtp.auth_results = [auth_results_value({"spf": "pass", "dmarc": "fail"})]
    metrics = Metrics()
    wrapped = DecoysInJunk(mail_stack, roundtrip(mail_stack.route_table()))
    result = await Runner(metrics).execute(wrapped)
    assert result.reason is FailureReason.JUNK
    assert result.error == "probe landed in junk mailbox Junk instead of INBOX"
    assert result.found_in == "Junk" and result.reception_time is None
    assert result.auth == {"spf": "pass", "dmarc": "fail"}  # why it may have gone there
    assert [s.detail for s in result.steps if s.name == "cleanup"] == ["1 deleted from Junk"]
    assert sample(metrics, "selfcheck_failures_total", route="default", reason="junk") == 1
    junk = await mail_stack.imap.messages(mail_stack.options.imap_user, "Junk")
    assert sorted(junk) == sorted(wrapped.decoys)
    assert await probes_in(mail_stack) == 0


async def test_a_mailbox_named_spam_is_looked_in_by_default(make_stack: StackFactory) -> None:
    """Without junk_mailboxes, a mailbox named Spam counts as junk."""
    recipient = "Selfcheck-Receiver@selfcheckd.test"  # filed whatever the case
    stack = await make_stack(recipient=recipient, junk_recipients={recipient.lower()},
                             junk_mailbox="Spam")
    result = await check(stack.route_table())
    assert result.reason is FailureReason.JUNK
    assert result.found_in == "Spam"
    assert await stack.junk() == []


async def test_configured_junk_mailboxes_replace_the_defaults(
    mail_stack: EmbeddedMailStack,
) -> None:
    """junk_mailboxes names where to look: Quarantine is found only when it is listed."""
    mail_stack.smtp.junk_recipients = {mail_stack.options.recipient}
    mail_stack.smtp.junk_mailbox = "Quarantine"
    route = mail_stack.route_table()
    unlisted = await check(route, timeout=1.0)
    assert unlisted.reason is FailureReason.RECEIVE_TIMEOUT
    assert await probes_in(mail_stack, "Quarantine") == 1  # not provably looked at: left alone
    route["imap"]["junk_mailboxes"] = ["Missing", "Quarantine"]
    listed = await check(route)
    assert listed.reason is FailureReason.JUNK
    assert listed.error == "probe landed in junk mailbox Quarantine instead of INBOX"


async def test_an_empty_junk_mailboxes_list_turns_the_look_off(
    mail_stack: EmbeddedMailStack,
) -> None:
    """junk_mailboxes = []: no look in Junk, so a probe there is a receive timeout."""
    mail_stack.smtp.junk_recipients = {mail_stack.options.recipient}
    route = mail_stack.route_table()
    route["imap"]["junk_mailboxes"] = []
    result = await check(route, timeout=1.0)
    assert result.reason is FailureReason.RECEIVE_TIMEOUT
    assert not [s for s in result.steps if s.name == "junk_look"]


async def test_a_fast_probe_opens_no_junk_connection(mail_stack: EmbeddedMailStack) -> None:
    """A probe that lands before the first junk look costs no second connection or step."""
    await mail_stack.imap.create_mailbox(mail_stack.options.imap_user, "Junk")
    async with wedging_proxy(mail_stack.imap.port) as proxy:
        route = mail_stack.route_table()
        route["imap"]["port"] = proxy.port
        result = await check(route, junk_first_look=2.0)
    assert result.success, result.error
    assert b"LIST" not in proxy.sent
    assert not [s for s in result.steps if s.name == "junk_look"]


async def test_a_hung_junk_look_does_not_delay_detection_in_the_watched_mailbox(
    mail_stack: EmbeddedMailStack,
) -> None:
    """The junk look runs on its own connection: wedged at LIST, INBOX detection is unaffected."""
    mail_stack.smtp.delivery_delay = 1.0  # lands well after the first junk look (0.2 s)
    async with wedging_proxy(mail_stack.imap.port, b"LIST") as proxy:
        route = mail_stack.route_table()
        route["imap"]["port"] = proxy.port  # command_timeout stays at its default, 15 s
        started = time.monotonic()
        result = await check(route, timeout=10.0)
        elapsed = time.monotonic() - started
    assert proxy.wedged == 1  # the junk connection hung ...
    assert result.success, result.error  # ... and the probe was found in INBOX regardless
    assert result.reception_time is not None and result.reception_time < 1.5
    assert elapsed < 3.0
    assert await probes_in(mail_stack) == 0


async def test_junk_is_looked_at_again_at_the_timeout(mail_stack: EmbeddedMailStack) -> None:
    """With no early look before the deadline, the look at the timeout still finds the probe."""
    mail_stack.smtp.junk_recipients = {mail_stack.options.recipient}
    mail_stack.smtp.delivery_delay = 0.3
    started = time.monotonic()
    result = await check(mail_stack.route_table(), timeout=1.5, junk_first_look=60.0)
    elapsed = time.monotonic() - started
    assert result.reason is FailureReason.JUNK
    assert [s.detail for s in result.steps if s.name == "junk_look"] == ["found in Junk"]
    assert 1.5 <= elapsed < 4.0
    assert await probes_in(mail_stack, "Junk") == 0


async def test_a_junk_mailbox_created_after_the_first_look_is_found(
    mail_stack: EmbeddedMailStack,
) -> None:
    """Junk that does not exist at the first look (the filter creates it) is found later."""
    mail_stack.smtp.junk_recipients = {mail_stack.options.recipient}
    mail_stack.smtp.delivery_delay = 0.5
    result = await check(mail_stack.route_table(), timeout=5.0, junk_first_look=0.2)
    looks = [s.detail for s in result.steps if s.name == "junk_look"]
    assert result.reason is FailureReason.JUNK
    assert looks[0] == "not in no junk mailbox" and looks[-1] == "found in Junk"
    assert len(looks) <= 4  # 0.2 s, 0.4 s, 0.8 s after acceptance: not at the deadline


async def test_a_probe_misfiled_after_its_timeout_is_swept_from_junk_by_the_next_run(
    mail_stack: EmbeddedMailStack,
) -> None:
    """A probe filed into Junk after its run gave up is swept (and counted) by the next run."""
    mail_stack.smtp.junk_recipients = {mail_stack.options.recipient}
    mail_stack.smtp.delivery_delay = 1.5
    await mail_stack.imap.create_mailbox(mail_stack.options.imap_user, "Junk")
    check_ = roundtrip(mail_stack.route_table(), timeout=1.0, junk_first_look=60.0)
    runner = Runner()
    first = await runner.execute(check_)
    assert first.reason is FailureReason.RECEIVE_TIMEOUT

    async def misfiled() -> bool:
        return await probes_in(mail_stack, "Junk") == 1

    await until(misfiled)
    mail_stack.smtp.junk_recipients = set()
    mail_stack.smtp.delivery_delay = 0.0
    second = await runner.execute(check_)
    assert second.success, second.error
    assert second.late_arrivals == 1
    assert [s.detail for s in second.steps if s.name == "sweep_junk"] == ["1 deleted"]
    assert await probes_in(mail_stack, "Junk") == 0
    third = await runner.execute(check_)
    assert third.success and not [s for s in third.steps if s.name == "sweep_junk"]


# -- Received hops --------------------------------------------------------------------------

async def test_hops_come_from_the_received_header_the_smtp_server_adds(
    mail_stack: EmbeddedMailStack,
) -> None:
    """The embedded MTA's Received header is one hop: from, by, with, its time and delay."""
    before = int(time.time())
    result = await check(mail_stack.route_table())
    after = time.time()
    assert result.success, result.error
    assert result.hops is not None and len(result.hops) == 1
    hop = result.hops[0]
    assert (hop.from_host, hop.from_ip, hop.by, hop.with_) == (
        "selfcheckd.localdomain", "127.0.0.1", "smtp.selfcheckd.test", "ESMTP")
    assert hop.timestamp is not None and before <= hop.timestamp <= after
    assert hop.delay is not None and 0 <= hop.delay <= 1  # whole seconds since the Date
    shown = result.as_dict()["hops"][0]
    assert shown["by"] == "smtp.selfcheckd.test"
    assert shown["timestamp"] == datetime.fromtimestamp(hop.timestamp, UTC).strftime(
        "%Y-%m-%dT%H:%M:%SZ")


def test_hops_are_read_bottom_up_with_delays_between_them() -> None:
    """Three Received headers (submission, Gmail's MX, Gmail inside): path order and delays."""
    msg = message(
        "Received: by 2002:a05:7000:1234 with SMTP id abc;\r\n"
        "        Mon, 4 Mar 2024 10:00:09 -0800 (PST)",
        "Received: from mail.example.com (mail.example.com. [203.0.113.5])\r\n"
        "        by mx.google.com with ESMTPS id x1si123\r\n        for <you@gmail.com>\r\n"
        "        (version=TLS1_3 cipher=TLS_AES_256_GCM_SHA384 bits=256/256);\r\n"
        "        Mon, 04 Mar 2024 10:00:07 -0800 (PST)",
        "Received: from selfcheckd.localdomain (ip-10-0-0-1 [10.0.0.1])\r\n"
        "\tby smtp-out.example.com (8.17.1/8.17.1) with ESMTPSA id 424I04Xk012345\r\n"
        "\tfor <you@gmail.com>; Mon, 4 Mar 2024 18:00:05 GMT",
        "Date: Mon, 4 Mar 2024 18:00:04 +0000",
    )
    hops = parse_hops(msg)
    assert [(h.by, h.from_ip, h.with_, h.delay) for h in hops] == [
        ("smtp-out.example.com", "10.0.0.1", "ESMTPSA", 1.0),
        ("mx.google.com", "203.0.113.5", "ESMTPS", 2.0),
        ("2002:a05:7000:1234", None, "SMTP", 2.0),
    ]
    assert hops[2].timestamp == datetime(2024, 3, 4, 18, 0, 9, tzinfo=UTC).timestamp()


def test_unreadable_received_headers_give_empty_fields_not_errors() -> None:
    """A Received header without a date or clauses is a hop of Nones; the next delay skips it."""
    hops = parse_hops(message(
        "Received: from b.example by c.example; Mon, 4 Mar 2024 18:00:10 +0000",
        "Received: (qmail 1234 invoked by uid 0); garbage date",
        "Received: from a.example by b.example; Mon, 4 Mar 2024 18:00:00 +0000",
    ))
    assert [(h.by, h.timestamp is None, h.delay) for h in hops] == [
        ("b.example", False, None), (None, True, None), ("c.example", False, 10.0)]


def test_a_received_date_past_year_9999_in_utc_is_no_time_and_the_result_still_prints() -> None:
    """`31 Dec 9999 23:59:59 -0100` parses but is year 10000 in UTC: the hop gets no
    timestamp, and the result JSON (/status, `check --json`) is still produced."""
    hops = parse_hops(message(
        "Received: from a.example by b.example; Fri, 31 Dec 9999 23:59:59 -0100",
        "Date: Mon, 4 Mar 2024 18:00:00 +0000",
    ))
    assert [(h.by, h.timestamp, h.delay) for h in hops] == [("b.example", None, None)]
    result = CheckResult(route="r", run_id="r1", hops=hops, started_at=253402300799.0 + 7200)
    assert result.as_dict()["hops"][0]["timestamp"] is None


# -- TLS -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def expiring_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def expiring_server_context(expiring_ca: trustme.CA) -> ssl.SSLContext:
    """A server context whose certificate's notAfter is NOT_AFTER."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    expiring_ca.issue_cert("127.0.0.1", "localhost", not_after=NOT_AFTER).configure_cert(ctx)
    return ctx


@pytest.fixture(scope="module")
def expiring_ca_file(expiring_ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("expiring-ca") / "ca.pem"
    expiring_ca.cert_pem.write_to_path(str(path))
    return path


@pytest.mark.parametrize("verify", [True, False], ids=["verified", "verify_tls-false"])
@pytest.mark.parametrize("tls", ["starttls", "tls"])
async def test_tls_version_and_certificate_expiry_of_both_connections(
    make_stack: StackFactory, expiring_server_context: ssl.SSLContext,
    expiring_ca_file: Path, tls: str, verify: bool,
) -> None:
    """STARTTLS and implicit TLS, verified or not: notAfter and version, in JSON and metrics."""
    stack = await make_stack(tls=tls, ssl_context=expiring_server_context,
                             smtp_credentials=("submitter", "s3cret-pass"))
    route = stack.route_table()
    for side in ("smtp", "imap"):
        route[side].update({"ca_file": str(expiring_ca_file)} if verify
                           else {"verify_tls": False})
    metrics = Metrics()
    result = await check(route, metrics)
    assert result.success, result.error
    shown = result.as_dict()["tls"]
    for protocol in ("smtp", "imap"):
        facts = result.tls[protocol]
        assert facts.not_after == NOT_AFTER.timestamp()
        assert facts.version in ("TLSv1.2", "TLSv1.3")
        assert shown[protocol]["not_after"] == NOT_AFTER_SHOWN
        assert shown[protocol]["version"] == facts.version
        assert sample(metrics, "selfcheck_tls_cert_expiry_timestamp_seconds", route="default",
                      protocol=protocol) == NOT_AFTER.timestamp()
        assert sample(metrics, "selfcheck_tls_version_info", route="default", protocol=protocol,
                      version=facts.version) == 1


async def test_tls_facts_are_kept_when_the_login_after_the_handshake_fails(
    make_stack: StackFactory, expiring_server_context: ssl.SSLContext, expiring_ca_file: Path,
) -> None:
    """A refused IMAP login still reports the certificate seen by the STARTTLS handshake."""
    stack = await make_stack(tls="starttls", ssl_context=expiring_server_context)
    route = stack.route_table()
    route["imap"].update(ca_file=str(expiring_ca_file), password="not-the-password")
    result = await check(route)
    assert result.reason is FailureReason.IMAP
    assert result.tls["imap"].not_after == NOT_AFTER.timestamp()


async def test_a_failed_run_without_a_handshake_keeps_the_last_expiry(
    make_stack: StackFactory, expiring_server_context: ssl.SSLContext, expiring_ca_file: Path,
) -> None:
    """The expiry gauge keeps its value through a run that never reached TLS."""
    stack = await make_stack(tls="tls", ssl_context=expiring_server_context)
    route = stack.route_table()
    route["smtp"]["ca_file"] = route["imap"]["ca_file"] = str(expiring_ca_file)
    metrics = Metrics()
    assert (await check(route, metrics)).success
    route["imap"]["port"] = route["smtp"]["port"] = 1  # nothing listens there
    assert (await check(route, metrics)).reason is FailureReason.IMAP
    assert sample(metrics, "selfcheck_tls_cert_expiry_timestamp_seconds", route="default",
                  protocol="imap") == NOT_AFTER.timestamp()


async def test_check_verbose_prints_the_tls_facts(
    make_stack: StackFactory, expiring_server_context: ssl.SSLContext, expiring_ca_file: Path,
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """`selfcheckd check --verbose` shows each connection's TLS version and notAfter."""
    stack = await make_stack(tls="tls", ssl_context=expiring_server_context)
    r, o = stack.route_table(), stack.options
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        '[selfcheck]\ntimeout = 5\nsecret = "x"\n[[selfcheck.routes]]\n'
        f'from = "{r["from"]}"\nto = "{r["to"]}"\n'
        f'smtp = {{ host = "127.0.0.1", port = {stack.smtp.port}, security = "tls", '
        f'ca_file = "{expiring_ca_file}" }}\n'
        f'imap = {{ host = "127.0.0.1", port = {stack.imap.port}, security = "tls", '
        f'ca_file = "{expiring_ca_file}", username = "{o.imap_user}", '
        f'password = "{o.imap_password}" }}\n')
    code = await asyncio.to_thread(main, ["check", "--config", str(cfg), "--json", "--verbose"])
    assert code == 0
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    shown = json.loads(line)["tls"]
    assert {p: shown[p]["not_after"] for p in shown} == {
        "smtp": NOT_AFTER_SHOWN, "imap": NOT_AFTER_SHOWN}


@pytest.mark.parametrize("key_type", [trustme.KeyType.ECDSA, trustme.KeyType.RSA])
@pytest.mark.parametrize("not_after", [
    datetime(2031, 7, 1, 12, 30, 15, tzinfo=UTC),  # UTCTime
    datetime(2051, 1, 2, 3, 4, 5, tzinfo=UTC),  # GeneralizedTime (2050 and later)
], ids=["utctime", "generalizedtime"])
def test_certificate_not_after_matches_an_x509_library(
    key_type: trustme.KeyType, not_after: datetime,
) -> None:
    """The DER reader agrees with `cryptography` on RSA and ECDSA certificates, both time forms."""
    issued = trustme.CA(key_type=key_type).issue_cert("example.test", not_after=not_after,
                                                      key_type=key_type)
    pem = issued.cert_chain_pems[0].bytes()
    der = ssl.PEM_cert_to_DER_cert(pem.decode())
    expected = x509.load_der_x509_certificate(der).not_valid_after_utc
    assert expected == not_after
    assert certificate_not_after(der) == not_after.timestamp()


@pytest.mark.parametrize("der", [b"", b"\x30\x03\x02\x01", b"\x30\x82\xff\xff\x30", b"junk" * 9])
def test_certificate_not_after_rejects_what_is_not_a_certificate(der: bytes) -> None:
    """Truncated or foreign bytes raise ValueError, never IndexError."""
    with pytest.raises(ValueError, match=r"DER|certificate"):
        certificate_not_after(der)


async def test_status_and_metrics_of_the_daemon_show_delivery_quality(
    make_stack: StackFactory, expiring_server_context: ssl.SSLContext, expiring_ca_file: Path,
) -> None:
    """`selfcheckd run`: /status shows auth, hops, tls; /metrics exports them (promtool-clean)."""
    stack = await make_stack(tls="starttls", ssl_context=expiring_server_context)
    stack.smtp.auth_results = [auth_results_value(ALL_PASS)]
    route = stack.route_table()
    route["smtp"]["ca_file"] = route["imap"]["ca_file"] = str(expiring_ca_file)
    route["expect"] = {"authserv_id": AUTHSERV_ID, "dmarc": "pass"}
    config = Config.model_validate({
        "selfcheck": {"interval": 60, "timeout": 5, "secret": "s3cret", "routes": [route]},
        "server": {"listen": "127.0.0.1:0"}, "shutdown_grace": 2,
    })
    daemon = Daemon(LoadedConfig(config, None))
    await daemon.start()
    try:
        await until(lambda: "default" in daemon.results)
        _, body = await get(daemon.listen_port, "/status")
        _, text = await get(daemon.listen_port, "/metrics")
    finally:
        await daemon.shutdown()
    state = json.loads(body)["routes"]["default"]
    assert state["success"] is True, state["error"]
    assert state["auth"] == ALL_PASS and state["authserv_id"] == AUTHSERV_ID
    assert state["found_in"] == "INBOX" and state["hops"][0]["by"] == "smtp.selfcheckd.test"
    assert state["tls"]["imap"]["not_after"] == state["tls"]["smtp"]["not_after"] == (
        NOT_AFTER_SHOWN)
    exported = {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}
    assert exported[("selfcheck_auth_result",
                     (("method", "dmarc"), ("result", "pass"), ("route", "default")))] == 1
    for protocol in ("smtp", "imap"):
        labels = (("protocol", protocol), ("route", "default"))
        assert exported[("selfcheck_tls_cert_expiry_timestamp_seconds", labels)] == (
            NOT_AFTER.timestamp())
        version = state["tls"][protocol]["version"]
        assert exported[("selfcheck_tls_version_info", (*labels, ("version", version)))] == 1
    promtool = shutil.which("promtool")
    if promtool is not None:
        proc = await asyncio.create_subprocess_exec(
            promtool, "check", "metrics", stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT)
        out, _ = await asyncio.wait_for(proc.communicate(text.encode()), timeout=60)
        assert proc.returncode == 0, out.decode()


async def get(port: int, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, http.get(
        f"http://127.0.0.1:{port}{path}", timeout=aiohttp.ClientTimeout(total=5)
    ) as resp:
        return resp.status, await resp.text()


# -- configuration ---------------------------------------------------------------------------

def base_route() -> dict[str, Any]:
    return {"from": "a@example.com", "to": "b@example.com", "smtp": {"host": "smtp.example"},
            "imap": {"host": "imap.example"}}


@pytest.mark.parametrize(("extra", "problems"), [
    ({"expect": {"dmarc": "pass", "spf": "pass"}},
     ["selfcheck.routes[0].expect.authserv_id: required when spf or dmarc is expected: "
      "only that server's verdicts are trusted"]),
    ({"expect": {"authserv_id": "mx.example.com", "dkim": "passed"}},
     ["selfcheck.routes[0].expect.dkim: must be one of pass, fail, neutral, none, policy, "
      "temperror or permerror"]),
    ({"expect": {"authserv_id": "mx example;", "arc": "pass"}},
     ["selfcheck.routes[0].expect.authserv_id: must be the receiving server's authserv-id, "
      "e.g. mx.google.com (no spaces, ';' or parentheses)",
      "selfcheck.routes[0].expect.arc: unknown key"]),
    ({"imap": {"host": "imap.example", "junk_mailboxes": ["Spam", "inbox"]}},
     ["selfcheck.routes[0].imap.junk_mailboxes: must not include the watched mailbox (INBOX)"]),
    ({"imap": {"host": "imap.example", "mailbox": "Probes", "junk_mailboxes": ["Probes"]}},
     ["selfcheck.routes[0].imap.junk_mailboxes: must not include the watched mailbox (Probes)"]),
], ids=["no-authserv-id", "bad-result", "bad-id-and-unknown-method", "junk-is-inbox",
        "junk-is-watched"])
def test_invalid_expectations_and_junk_mailboxes_are_reported_in_one_pass(
    tmp_path: Path, extra: dict[str, Any], problems: list[str],
) -> None:
    """Each rule names its key; every problem comes at once."""
    route = {**base_route(), **extra}
    lines = [f"[[selfcheck.routes]]\nfrom = \"{route['from']}\"\nto = \"{route['to']}\"",
             f"smtp = {_inline(route['smtp'])}", f"imap = {_inline(route['imap'])}"]
    if "expect" in route:
        lines.append(f"expect = {_inline(route['expect'])}")
    path = tmp_path / "c.toml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as raised:
        load_config(path, environ={})
    assert raised.value.problems == problems


def _inline(table: dict[str, Any]) -> str:
    return "{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in table.items()) + " }"


def test_forgetting_a_route_drops_its_quality_series() -> None:
    """A route removed by a reload leaves no auth, expiry or version series behind."""
    metrics = Metrics()
    result = CheckResult(route="gone", run_id="r1", auth={"dmarc": "pass"})
    result.tls["smtp"] = result_tls = _tls()
    from daemon.checks.runner import record_metrics

    record_metrics(metrics, result)
    assert sample(metrics, "selfcheck_tls_cert_expiry_timestamp_seconds", route="gone",
                  protocol="smtp") == result_tls.not_after
    metrics.forget_route("gone")
    names = {"selfcheck_auth_result", "selfcheck_tls_cert_expiry_timestamp_seconds",
             "selfcheck_tls_version_info"}
    left = [s for f in metrics.registry.collect() for s in f.samples if s.name in names]
    assert left == []


def _tls() -> Any:
    from daemon.checks.result import TlsFacts

    return TlsFacts(version="TLSv1.3", not_after=NOT_AFTER.timestamp(), seen_at=time.time())
