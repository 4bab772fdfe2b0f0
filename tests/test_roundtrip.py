"""The round trip against the embedded stack: real aiosmtpd delivering into real pymap."""

from __future__ import annotations

import asyncio
import gc
import inspect
import io
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from email import message_from_bytes
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from daemon.checks.base import CheckRun
from daemon.checks.result import CheckResult, FailureReason, new_run_id
from daemon.checks.runner import Runner
from daemon.embedded.stack import EmbeddedMailStack
from daemon.logs import configure_logging
from daemon.metrics import Metrics
from daemon.roundtrip.check import RoundTrip
from daemon.roundtrip.probe import PROBE_HEADER, build_probe
from daemon.stopping import StopBudget
from tests.conftest import StackFactory, make_config
from tests.faulty_servers import (
    cutting_proxy,
    greeting_only_server,
    scripted_imap_server,
    silent_server,
    wedging_proxy,
)
from tests.waiting import until

SECRET = b"test-secret-value"


def roundtrip(route: dict[str, Any], **selfcheck: Any) -> RoundTrip:
    cfg = make_config(route, **selfcheck)
    return RoundTrip(cfg.selfcheck.routes[0], cfg.selfcheck, SECRET)


async def check(route: dict[str, Any], **selfcheck: Any) -> CheckResult:
    return await Runner().execute(roundtrip(route, **selfcheck))


def completed_events(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == "selfcheck_completed"]


def coroutine_file(task: asyncio.Task[Any]) -> str:
    coro = task.get_coro()
    return coro.cr_code.co_filename if inspect.iscoroutine(coro) else ""


async def probes_left(stack: EmbeddedMailStack) -> int:
    return sum(
        1 for raw in await stack.inbox() if message_from_bytes(raw).get(PROBE_HEADER) is not None
    )


async def test_success_plain_with_idle(mail_stack: EmbeddedMailStack) -> None:
    """A probe sent in clear text is found by IDLE, verified, timed and deleted."""
    with capture_logs() as logs:
        result = await check(mail_stack.route_table())
    assert result.success, result.error
    assert result.reason is None
    assert result.send_time is not None and 0 < result.send_time < 5
    assert result.reception_time is not None and 0 <= result.reception_time < 5
    assert [s.name for s in result.steps] == [
        "prepare", "imap_connect", "sweep_late", "smtp_send", "receive", "verify", "cleanup"
    ]
    assert completed_events(logs) == [{
        "event": "selfcheck_completed", "log_level": "info", "success": True,
        "send_time": result.send_time, "reception_time": result.reception_time,
        "route": "default",
    }]
    assert await probes_left(mail_stack) == 0


async def test_success_line_is_the_seed_format(mail_stack: EmbeddedMailStack) -> None:
    """The seed's exact line, `selfcheck_completed success=true send_time=...`, then the route."""
    out = io.StringIO()
    configure_logging("kv", "info", stream=out)
    try:
        result = await check(mail_stack.route_table())
    finally:
        configure_logging()
    line = next(x for x in out.getvalue().splitlines() if x.startswith("selfcheck_completed"))
    seed = (f"selfcheck_completed success=true send_time={result.send_time:.3f} "
            f"reception_time={result.reception_time:.3f}")
    assert line == f"{seed} route=default"


async def test_success_with_polling(make_stack: StackFactory) -> None:
    """With IDLE off on the server, the probe is found by polling."""
    stack = await make_stack(idle=False)
    route = stack.route_table()
    route["imap"]["poll_interval"] = 0.2
    result = await check(route)
    assert result.success, result.error
    assert await probes_left(stack) == 0


@pytest.mark.parametrize("tls", ["starttls", "tls"])
async def test_success_over_tls_with_auth(
    make_stack: StackFactory, server_ssl_context: Any, ca_file: Path, tls: str
) -> None:
    """STARTTLS (IMAP upgrade implemented here) and implicit TLS, verified against the CA."""
    stack = await make_stack(tls=tls, ssl_context=server_ssl_context,
                             smtp_credentials=("submitter", "s3cret-pass"))
    route = stack.route_table()
    route["smtp"]["ca_file"] = str(ca_file)
    route["imap"]["ca_file"] = str(ca_file)
    result = await check(route)
    assert result.success, result.error
    assert await probes_left(stack) == 0


async def test_tls_unverifiable_certificate_fails_imap(
    make_stack: StackFactory, server_ssl_context: Any
) -> None:
    """Without the test CA the IMAP STARTTLS handshake is refused: reason imap."""
    stack = await make_stack(tls="starttls", ssl_context=server_ssl_context)
    result = await check(stack.route_table())
    assert result.reason is FailureReason.IMAP
    assert "certificate" in (result.error or "").lower()


async def test_smtp_server_that_never_answers(mail_stack: EmbeddedMailStack) -> None:
    """A silent SMTP server fails the send within its deadline and leaves no probe."""
    async with silent_server() as port:
        route = mail_stack.route_table()
        route["smtp"]["port"] = port
        route["smtp"]["timeout"] = 1.0
        started = time.monotonic()
        with capture_logs() as logs:
            result = await check(route)
        elapsed = time.monotonic() - started
    assert result.reason is FailureReason.SEND
    assert "no complete transaction within 1s" in (result.error or "")
    assert elapsed < 5
    assert completed_events(logs)[0]["success"] is False
    assert completed_events(logs)[0]["error"] == result.error
    assert await probes_left(mail_stack) == 0


async def test_imap_server_that_never_answers(mail_stack: EmbeddedMailStack) -> None:
    """A silent IMAP server fails the run with reason imap, and nothing is sent."""
    async with silent_server() as port:
        route = mail_stack.route_table()
        route["imap"].update(port=port, connect_timeout=1.0, command_timeout=1.0)
        started = time.monotonic()
        with capture_logs() as logs:
            result = await check(route)
        elapsed = time.monotonic() - started
    assert result.reason is FailureReason.IMAP
    assert "connect" in (result.error or "")
    assert elapsed < 5
    assert completed_events(logs)[0]["log_level"] == "error"
    assert mail_stack.smtp.delivered == 0


async def test_imap_connection_dropped_during_idle(mail_stack: EmbeddedMailStack) -> None:
    """A server that drops the connection on IDLE fails with imap; cleanup reconnects."""
    # Lands after the first search (so we IDLE), while the proxy withholds IDLE.
    mail_stack.smtp.delivery_delay = 0.3
    async with cutting_proxy(mail_stack.imap.port, b"IDLE\r\n", hold=0.6) as port:
        route = mail_stack.route_table()
        route["imap"]["port"] = port
        started = time.monotonic()
        with capture_logs() as logs:
            result = await check(route)
        elapsed = time.monotonic() - started
    assert result.reason is FailureReason.IMAP
    assert "connection lost during IDLE" in (result.error or "")
    assert completed_events(logs)[0]["error"] == result.error
    assert elapsed < 10
    assert result.cleanup_error is None
    assert await probes_left(mail_stack) == 0


async def test_connection_lost_after_arrival_cleanup_uses_new_connection(
    mail_stack: EmbeddedMailStack,
) -> None:
    """Lost while fetching a delivered probe: reason imap, and a fresh session deletes it."""
    async with cutting_proxy(mail_stack.imap.port, b"UID FETCH", connections=1) as port:
        route = mail_stack.route_table()
        route["imap"]["port"] = port
        result = await check(route)
    assert result.reason is FailureReason.IMAP
    assert "connection lost during UID FETCH" in (result.error or "")
    assert [s.detail for s in result.steps if s.name == "cleanup"] == ["1 deleted"]
    assert await probes_left(mail_stack) == 0


async def test_wrong_password(mail_stack: EmbeddedMailStack) -> None:
    """A wrong IMAP password fails with reason imap and never shows the password."""
    route = mail_stack.route_table()
    route["imap"]["password"] = "definitely-wrong-pw"
    with capture_logs() as logs:
        result = await check(route)
    assert result.reason is FailureReason.IMAP
    assert "login failed" in (result.error or "")
    assert "definitely-wrong-pw" not in repr(logs) + repr(result.as_dict(verbose=True))
    assert mail_stack.smtp.delivered == 0


async def test_probe_never_delivered(mail_stack: EmbeddedMailStack) -> None:
    """An accepted probe that never lands times out with reason receive_timeout."""
    mail_stack.smtp.drop = True
    started = time.monotonic()
    result = await check(mail_stack.route_table(), timeout=1.5)
    elapsed = time.monotonic() - started
    assert result.reason is FailureReason.RECEIVE_TIMEOUT
    assert result.error == "probe not received within 1.5s"
    assert result.send_time is not None and result.reception_time is None
    assert 1.5 <= elapsed < 5
    assert await probes_left(mail_stack) == 0


async def test_probe_altered_in_transit(mail_stack: EmbeddedMailStack) -> None:
    """A probe whose HTML part lost the token fails integrity, names the part, is deleted."""
    def tamper(data: bytes) -> bytes:
        head, sep, html = data.rpartition(b"<code>")
        # Another first character (a nonce starts with X one time in 64: "X" was no change).
        return head + sep + (b"Y" if html.startswith(b"X") else b"X") + html[1:]

    mail_stack.smtp.mutate = tamper
    result = await check(mail_stack.route_table())
    assert result.reason is FailureReason.INTEGRITY
    assert "text/html" in (result.error or "")
    assert await probes_left(mail_stack) == 0


async def test_header_removed_in_transit(mail_stack: EmbeddedMailStack) -> None:
    """A probe whose Subject was rewritten fails integrity naming the header."""
    mail_stack.smtp.mutate = lambda d: d.replace(b"Subject: selfcheckd probe", b"Subject: [EXT]", 1)
    result = await check(mail_stack.route_table())
    assert result.reason is FailureReason.INTEGRITY
    assert "header Subject" in (result.error or "")
    assert await probes_left(mail_stack) == 0


async def test_late_probe_is_swept_on_next_run(mail_stack: EmbeddedMailStack) -> None:
    """A probe that arrives after its timeout is deleted and counted by the next run."""
    mail_stack.smtp.delivery_delay = 1.5
    first = await check(mail_stack.route_table(), timeout=1.0)
    assert first.reason is FailureReason.RECEIVE_TIMEOUT
    async def landed() -> bool:
        return await probes_left(mail_stack) == 1

    await until(landed)  # the late probe lands
    mail_stack.smtp.delivery_delay = 0.0
    second = await check(mail_stack.route_table(), timeout=1.0)
    assert second.success, second.error
    assert second.late_arrivals == 1
    assert await probes_left(mail_stack) == 0


async def test_other_mail_is_never_touched(mail_stack: EmbeddedMailStack) -> None:
    """Cleanup and the late sweep delete probes only, whatever else is in the mailbox."""
    await mail_stack.imap.deliver(
        mail_stack.options.imap_user,
        b"From: a@b.example\r\nTo: c@d.example\r\nSubject: X-Selfcheck-Route default\r\n\r\nhi\r\n",
    )
    for _ in range(2):
        assert (await check(mail_stack.route_table())).success
    inbox = await mail_stack.inbox()
    assert len(inbox) == 1 and b"Subject: X-Selfcheck-Route default" in inbox[0]


# -- deleting only what is provably ours ---------------------------------------------

SENDER = "selfcheck@selfcheckd.test"
RECIPIENT = "selfcheck-receiver@selfcheckd.test"


def long_ago() -> str:
    return format_datetime(datetime.now(UTC) - timedelta(minutes=10))


def probe_bytes(route: str, *, secret: bytes = SECRET, run_id: str | None = None,
                date: str | None = None, header_id: str | None = None) -> bytes:
    """A probe as selfcheckd builds it, optionally back-dated or with its id header replaced."""
    probe = build_probe(route=route, sender=SENDER, recipient=RECIPIENT, secret=secret,
                        run_id=run_id or new_run_id())
    if date is not None:
        del probe.message["Date"]
        probe.message["Date"] = date
    if header_id is not None:
        del probe.message[PROBE_HEADER]
        probe.message[PROBE_HEADER] = header_id
    return probe.message.as_bytes()


def forged(run_id: str, route: str, date: str) -> bytes:
    return (
        f"From: someone@example.org\r\nTo: {RECIPIENT}\r\nSubject: looks like a probe\r\n"
        f"Date: {date}\r\nX-Selfcheck-Id: {run_id}\r\nX-Selfcheck-Route: {route}\r\n\r\n"
        "selfcheck-token: AAAAAAAAAAAAAAAA.0123456789abcdef0123456789abcdef\r\n"
    ).encode()


async def seen_uids(stack: EmbeddedMailStack) -> list[int]:
    """UIDs flagged \\Seen in the stack's INBOX."""
    from daemon.roundtrip.imap_client import ImapSession

    session = ImapSession(make_config(stack.route_table()).selfcheck.routes[0].imap)
    await session.connect()
    try:
        response = await session.client.uid_search("SEEN", charset=None)
        return [int(t) for line in response.lines[:-1] for t in line.split() if t.isdigit()]
    finally:
        await session.close()


class DecoysBeforeCleanup:
    """A `RoundTrip` whose runs get `insert(run_id)` called between verdict and deletion."""

    def __init__(self, inner: RoundTrip, insert: Callable[[str], Awaitable[None]]) -> None:
        self.inner = inner
        self.insert = insert
        self.name, self.kind = inner.name, inner.kind
        self.deadline, self.cleanup_timeout = inner.deadline, inner.cleanup_timeout

    def start(self, result: CheckResult) -> CheckRun:
        run = self.inner.start(result)
        insert = self.insert

        class Run:
            async def run(self) -> None:
                await run.run()

            async def cleanup(self) -> None:
                await insert(result.run_id)
                await run.cleanup()

        return Run()


async def test_sweep_and_cleanup_delete_only_provable_own_probes(
    mail_stack: EmbeddedMailStack,
) -> None:
    """Decoys survive byte-identical and unseen; a genuinely late probe of the route is swept."""
    real = build_probe(route="default", sender=SENDER, recipient=RECIPIENT, secret=SECRET,
                       run_id=new_run_id())
    decoys = [
        # (a) forged headers naming route default, an old Date, no valid token
        forged(new_run_id(), "default", long_ago()),
        # (b) a real, stale probe of route default-eu (a longer name containing "default")
        probe_bytes("default-eu", date=long_ago()),
        # (c) a probe-like body with a genuine token, but no probe headers
        (f"From: a@example.org\r\nTo: {RECIPIENT}\r\nSubject: fwd\r\n\r\n"
         f"selfcheck-token: {real.token}\r\n").encode(),
        # (d) a stale probe of route default whose token was minted with another secret
        probe_bytes("default", secret=b"another-secret", date=long_ago()),
    ]
    late = probe_bytes("default", date=long_ago())
    user = mail_stack.options.imap_user
    for raw in [*decoys, late]:
        await mail_stack.imap.deliver(user, raw)
    assert sorted(await mail_stack.inbox()) == sorted([*decoys, late])

    async def same_run_id_decoys(run_id: str) -> None:
        # What the run's own cleanup finds by searching its run id, and must leave:
        for raw in (
            forged(run_id, "default", long_ago()),  # forged headers
            probe_bytes("default-eu", run_id=run_id),  # another route's probe
            probe_bytes("default", header_id=run_id, date=long_ago()),  # another run's token
        ):
            decoys.append(raw)
            await mail_stack.imap.deliver(user, raw)

    runner = Runner()
    first = await runner.execute(DecoysBeforeCleanup(roundtrip(mail_stack.route_table()),
                                                     same_run_id_decoys))
    second = await runner.execute(DecoysBeforeCleanup(roundtrip(mail_stack.route_table()),
                                                      same_run_id_decoys))

    assert first.success, first.error
    assert first.late_arrivals == 1
    assert [s.detail for s in first.steps if s.name == "cleanup"] == ["1 deleted"]
    assert second.success, second.error
    assert second.late_arrivals == 0
    assert [s.detail for s in second.steps if s.name == "cleanup"] == ["1 deleted"]
    assert len(decoys) == 10
    assert sorted(await mail_stack.inbox()) == sorted(decoys)
    assert await seen_uids(mail_stack) == []


# -- a wedged IMAP server, and shutdown during the deletion ----------------------------

async def test_imap_wedged_mid_idle_fails_within_timeout_plus_one(
    mail_stack: EmbeddedMailStack,
) -> None:
    """A server that stops answering at IDLE fails within timeout + 1 s; cleanup reconnects."""
    mail_stack.smtp.delivery_delay = 1.0  # lands after the first search, so the run IDLEs
    async with wedging_proxy(mail_stack.imap.port, b"IDLE\r\n") as proxy:
        route = mail_stack.route_table()
        route["imap"]["port"] = proxy.port  # command_timeout stays at its default, 15 s
        runner = Runner()
        verdicts: list[float] = []
        runner.on_result(lambda _r: verdicts.append(time.monotonic()))
        started = time.monotonic()
        with capture_logs() as logs:
            result = await runner.execute(roundtrip(route, timeout=5.0))
        finished = time.monotonic()
    assert proxy.wedged == 1
    assert verdicts[0] - started < 5.0 + 1.0
    assert result.reason in (FailureReason.IMAP, FailureReason.RECEIVE_TIMEOUT)
    assert result.error is not None and "IDLE" in result.error
    assert "stopped responding" in result.error
    assert completed_events(logs)[0]["error"] == result.error
    # The wedged session is dropped (no LOGOUT, no command_timeout spent on it) and a
    # fresh connection (not wedged: it never IDLEs) deletes the probe that landed meanwhile.
    assert finished - verdicts[0] < 2.0
    assert [s.detail for s in result.steps if s.name == "cleanup"] == ["1 deleted"]
    assert result.cleanup_error is None
    assert await probes_left(mail_stack) == 0


async def test_cancel_during_probe_deletion_is_logged_counted_and_swept_later(
    mail_stack: EmbeddedMailStack,
) -> None:
    """Shutdown cancelling a hung probe deletion logs and counts it; the next run sweeps it."""
    async with wedging_proxy(mail_stack.imap.port, b"UID STORE") as proxy:
        route = mail_stack.route_table()
        route["imap"]["port"] = proxy.port
        metrics = Metrics()
        budget = StopBudget()
        runner = Runner(metrics, budget=budget)
        budget.start(3.0)  # SIGTERM: what is left of the budget bounds the cleanup
        with capture_logs() as logs:
            task = asyncio.create_task(runner.execute(roundtrip(route, timeout=1.0)))
            await until(lambda: proxy.wedged == 1)  # the deletion hangs
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        failed = [e for e in logs if e["event"] == "selfcheck_cleanup_failed"]
        assert len(failed) == 1 and "next run sweeps" in failed[0]["error"]
        assert metrics.registry.get_sample_value(
            "selfcheck_cleanup_failures_total", {"route": "default"}) == 1
        assert await probes_left(mail_stack) == 1

        proxy.wedge_on = None  # the server answers again
        second = await check(route, timeout=1.0)
    assert second.success, second.error
    assert second.late_arrivals >= 1
    assert await probes_left(mail_stack) == 0


@pytest.mark.parametrize("hang_up", [False, True], ids=["silent", "hang-up"])
async def test_failed_greeting_leaves_no_aioimaplib_task_behind(
    mail_stack: EmbeddedMailStack, hang_up: bool,
) -> None:
    """Failing between greeting and CAPABILITY leaves no task to print 'Lock is not acquired'."""
    unraisable: list[str] = []
    old_hook = sys.unraisablehook
    sys.unraisablehook = lambda u: unraisable.append(f"{u.exc_type.__name__}: {u.exc_value}")
    try:
        async with greeting_only_server(close_on_command=hang_up) as port:
            route = mail_stack.route_table()
            route["imap"].update(port=port, connect_timeout=0.5, command_timeout=0.5)
            for _ in range(3):
                result = await check(route)
                assert result.reason is FailureReason.IMAP
        stuck = [t for t in asyncio.all_tasks() if "aioimaplib" in coroutine_file(t)]
        assert stuck == []
        gc.collect()
    finally:
        sys.unraisablehook = old_hook
    assert unraisable == []


@pytest.mark.parametrize(("greeting", "options", "said"), [
    (b"* BYE Too many connections from your IP\r\n", {"close": "at_once"},
     "* BYE Too many connections from your IP"),
    (b"* BYE Too many connections from your IP\r\n", {},
     "* BYE Too many connections from your IP"),
    (b"* OK ready\r\n", {"replies": (b"{tag} BAD unknown command\r\n",)},
     "server not IMAP4 compliant"),
], ids=["bye-and-close", "bye-and-stay", "capability-bad"])
async def test_an_imap_server_that_refuses_us_is_quoted_at_once(
    mail_stack: EmbeddedMailStack, greeting: bytes, options: dict[str, Any], said: str,
) -> None:
    """A server refusing the session fails the run with what it said, not after the
    connect timeout as "no answer", and aioimaplib's error does not escape to the loop."""
    escaped: list[str] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: escaped.append(context["message"]))
    try:
        async with scripted_imap_server(greeting, **options) as port:
            route = mail_stack.route_table()
            route["imap"].update(port=port, connect_timeout=30, command_timeout=30)
            result = await check(route)
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
    assert result.reason is FailureReason.IMAP
    assert result.error == f"IMAP 127.0.0.1:{port}: connect: {said}"
    assert escaped == []


async def test_a_bye_after_login_is_quoted_with_the_lost_connection(
    mail_stack: EmbeddedMailStack,
) -> None:
    """A server that logs us in, then says `* BYE Internal error` and hangs up: the error
    says what it said, not only "connection lost"."""
    replies = (b"* CAPABILITY IMAP4rev1\r\n{tag} OK done\r\n",
               b"* BYE Internal error occurred. Refer to server log\r\n")
    async with scripted_imap_server(b"* OK ready\r\n", replies=replies,
                                    close="after_replies") as port:
        route = mail_stack.route_table()
        route["imap"].update(port=port, connect_timeout=30, command_timeout=30)
        result = await check(route)
    assert result.reason is FailureReason.IMAP
    assert result.error is not None
    assert result.error.endswith(
        "the server said * BYE Internal error occurred. Refer to server log"), result.error


def test_without_a_secret_one_random_secret_per_process_is_announced_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No configured secret: one random secret for the process, and one warning saying so."""
    from daemon.roundtrip import probe

    monkeypatch.setattr(probe, "_process_secret", None)
    selfcheck = make_config(secret=None).selfcheck
    with capture_logs() as logs:
        first, again = probe.probe_secret(selfcheck), probe.probe_secret(selfcheck)
    assert first == again and len(first) == 32
    warnings = [e for e in logs if e["event"] == "selfcheck_secret_random"]
    assert len(warnings) == 1 and "left in the mailbox" in warnings[0]["detail"]
    assert probe.probe_secret(make_config().selfcheck) == b"test-secret-value"


async def test_run_cancelled_while_idling_cleans_up_on_a_fresh_connection(
    mail_stack: EmbeddedMailStack,
) -> None:
    """Cancelled mid-IDLE, the cleanup reconnects at once instead of queueing behind IDLE."""
    mail_stack.smtp.drop = True  # nothing arrives: the run IDLEs until cancelled
    async with wedging_proxy(mail_stack.imap.port) as proxy:
        route = mail_stack.route_table()
        route["imap"]["port"] = proxy.port  # command_timeout stays at its default, 15 s
        with capture_logs() as logs:
            task = asyncio.create_task(Runner().execute(roundtrip(route, cleanup_timeout=10.0)))
            await until(lambda: b"IDLE\r\n" in proxy.sent)
            cancelled_at = time.monotonic()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
    assert time.monotonic() - cancelled_at < 2.0
    steps = [e for e in logs if e["event"] == "selfcheck_step" and e["step"] == "cleanup"]
    assert [(s["ok"], s["detail"]) for s in steps] == [(True, "0 deleted")]
    assert not [e for e in logs if e["event"] == "selfcheck_cleanup_failed"]


async def test_failure_line_keeps_the_seed_prefix_and_names_the_route(
    make_stack: StackFactory,
) -> None:
    """`selfcheck_completed success=false error="..."` as in the seed, then route=NAME."""
    stack = await make_stack()
    stack.smtp.drop = True  # accepted, never delivered
    out = io.StringIO()
    configure_logging("kv", "info", stream=out)
    try:
        result = await check(stack.route_table("eu-west"), timeout=1.0)
    finally:
        configure_logging()
    line = next(x for x in out.getvalue().splitlines() if x.startswith("selfcheck_completed"))
    assert line == ('selfcheck_completed success=false error="probe not received within 1s" '
                    "route=eu-west")
    assert result.route == "eu-west"


def test_probes_share_one_boundary_that_no_part_contains() -> None:
    """Every probe uses one fixed MIME boundary (a random one per probe fills `re`'s cache
    with a pattern per message, ~1 MiB of RSS), and it never occurs inside a part."""
    probes = [
        build_probe(route="default", sender="a@example.test", recipient="b@example.test",
                    secret=b"s", run_id=new_run_id())
        for _ in range(3)
    ]
    boundaries = {p.message.get_boundary() for p in probes}
    assert len(boundaries) == 1
    (boundary,) = boundaries
    assert boundary
    for probe in probes:
        parts = list(probe.message.iter_parts())
        assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]
        for part in parts:
            assert boundary not in part.get_content()
        raw = probe.message.as_bytes()
        assert raw.count(f"--{boundary}\n".encode()) + raw.count(
            f"--{boundary}\r\n".encode()) == 2
        assert raw.count(f"--{boundary}--".encode()) == 1
