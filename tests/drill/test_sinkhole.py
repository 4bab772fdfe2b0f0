"""The shipped sinkhole listener, driven by a real SMTP client over loopback."""

from __future__ import annotations

import asyncio
import io
import json
import os
import select
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiosmtplib
import boto3
import pytest
from structlog.testing import capture_logs

from daemon.sinkhole import (
    GREYLIST_WINDOW,
    FileModeSource,
    ListenerOptions,
    ModeCache,
    SinkholeHandler,
    SsmModeSource,
    run_sinkhole,
)

MESSAGE = (b"From: qp-test@example.com\r\nTo: nobody-1@sinkhole.test\r\n"
           b"Subject: drill\r\nMessage-ID: <m1@example.com>\r\n\r\n"
           b"the secret body text\r\n")


def set_mode(path: Path, mode: str) -> None:
    path.write_text(mode)


def remove(path: Path) -> None:
    path.unlink()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Listener:
    def __init__(self, handler: SinkholeHandler, port: int) -> None:
        self.handler = handler
        self.port = port

    async def rcpt(self, rcpt: str = "nobody-1@sinkhole.test") -> tuple[int, str]:
        """One connection: EHLO, MAIL, RCPT; the RCPT reply."""
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=self.port, timeout=5,
                                 local_hostname="client.test", start_tls=False)
        async with client:
            await client.mail("qp-test@example.com")
            try:
                reply = await client.rcpt(rcpt)
            except aiosmtplib.SMTPResponseException as exc:
                return exc.code, exc.message
            return reply.code, reply.message

    async def send(self, message: bytes = MESSAGE) -> tuple[int, str]:
        """One connection delivering `message`; the final reply (or the refusal)."""
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=self.port, timeout=5,
                                 local_hostname="client.test", start_tls=False)
        async with client:
            try:
                _, reply = await client.sendmail("qp-test@example.com",
                                                 ["nobody-1@sinkhole.test"], message)
            except aiosmtplib.SMTPRecipientsRefused as exc:
                return exc.recipients[0].code, exc.recipients[0].message
            except aiosmtplib.SMTPResponseException as exc:
                return exc.code, exc.message
            return 250, reply


def _listener_for(handler: SinkholeHandler, **options: object):  # type: ignore[no-untyped-def]
    return run_sinkhole(handler, ListenerOptions(host="127.0.0.1", port=0, **options))  # type: ignore[arg-type]


@pytest.fixture
def mode_file(tmp_path: Path) -> Path:
    path = tmp_path / "sinkhole_mode"
    path.write_text("defer\n")
    return path


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def listener(mode_file: Path, clock: Clock) -> AsyncIterator[Listener]:
    out = io.StringIO()
    handler = SinkholeHandler(ModeCache(FileModeSource(mode_file), ttl=30, clock=clock),
                              clock=clock, out=out)
    async with _listener_for(handler) as (_host, port):
        yield Listener(handler, port)


async def test_defer_answers_421_to_every_rcpt(listener: Listener) -> None:
    """In defer mode every RCPT gets 421 4.3.2."""
    assert await listener.rcpt() == (421, "4.3.2 Service temporarily unavailable")


async def test_bounce_answers_550(listener: Listener, mode_file: Path) -> None:
    """In bounce mode every RCPT gets 550 5.1.1."""
    set_mode(mode_file, "bounce\n")
    assert await listener.rcpt() == (550, "5.1.1 User unknown")


async def test_accept_takes_the_message(listener: Listener, mode_file: Path) -> None:
    """In accept mode the message is taken with 250 and nothing is printed."""
    set_mode(mode_file, "accept")
    code, _ = await listener.send()
    assert code == 250
    assert listener.handler.accepted == 1
    assert listener.handler.out.getvalue() == ""  # type: ignore[union-attr]


async def test_accept_log_prints_envelope_and_headers_never_the_body(
        listener: Listener, mode_file: Path) -> None:
    """accept-log prints one JSON line with the envelope and headers and without the body."""
    set_mode(mode_file, "accept-log")
    code, _ = await listener.send()
    assert code == 250
    lines = listener.handler.out.getvalue().splitlines()  # type: ignore[union-attr]
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["event"] == "accepted"
    assert record["mail_from"] == "qp-test@example.com"
    assert record["rcpt_tos"] == ["nobody-1@sinkhole.test"]
    assert ["Message-ID", "<m1@example.com>"] in record["headers"]
    assert "secret body" not in lines[0]


async def test_greylist_refuses_the_first_try_then_passes_for_30_minutes(
        listener: Listener, mode_file: Path, clock: Clock) -> None:
    """Greylist: 421 on an IP's first connection, 250 on the next ones within 30 min,
    then a first try again."""
    set_mode(mode_file, "greylist")
    assert (await listener.rcpt())[0] == 421
    clock.now += 60
    assert (await listener.rcpt())[0] == 250
    clock.now += GREYLIST_WINDOW - 120  # 30 min after the first try, less a minute
    assert (await listener.rcpt())[0] == 250
    clock.now += 120
    assert (await listener.rcpt())[0] == 421


async def test_mode_is_reread_per_connection_after_the_cache(
        listener: Listener, mode_file: Path, clock: Clock) -> None:
    """A flip takes effect on the first new connection after the 30 s cache, not before."""
    assert (await listener.rcpt())[0] == 421
    set_mode(mode_file, "bounce")
    clock.now += 29
    assert (await listener.rcpt())[0] == 421  # still cached
    clock.now += 2
    assert (await listener.rcpt())[0] == 550


async def test_one_connection_keeps_the_mode_it_started_with(
        listener: Listener, mode_file: Path, clock: Clock) -> None:
    """A connection answers every RCPT with the mode read at its first one."""
    set_mode(mode_file, "bounce")
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=listener.port, timeout=5,
                             local_hostname="client.test", start_tls=False)
    async with client:
        await client.mail("qp-test@example.com")
        with pytest.raises(aiosmtplib.SMTPResponseException) as first:
            await client.rcpt("a@sinkhole.test")
        set_mode(mode_file, "accept")
        clock.now += 60
        with pytest.raises(aiosmtplib.SMTPResponseException) as second:
            await client.rcpt("b@sinkhole.test")
    assert first.value.code == second.value.code == 550


async def test_unknown_mode_defers_with_a_warning(listener: Listener, mode_file: Path) -> None:
    """An unknown mode value is answered as defer and warned about."""
    set_mode(mode_file, "acept")
    with capture_logs() as logs:
        assert (await listener.rcpt())[0] == 421
    warnings = [e for e in logs if e["event"] == "sinkhole_mode_unknown"]
    assert warnings and warnings[0]["value"] == "acept"
    assert warnings[0]["log_level"] == "warning"


async def test_missing_mode_file_defers(listener: Listener, mode_file: Path) -> None:
    """An unreadable mode source means defer, never accept."""
    remove(mode_file)
    with capture_logs() as logs:
        assert (await listener.rcpt())[0] == 421
    assert any(e["event"] == "sinkhole_mode_unreadable" for e in logs)


async def test_ehlo_advertises_no_extensions(listener: Listener) -> None:
    """EHLO answers the greeting only: no SIZE, 8BITMIME, STARTTLS or AUTH."""
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=listener.port, timeout=5,
                             local_hostname="client.test", start_tls=False)
    async with client:
        reply = await client.ehlo()
    assert reply.code == 250
    assert client.esmtp_extensions == {}


async def test_message_over_the_size_limit_is_refused_and_not_logged(
        mode_file: Path, clock: Clock) -> None:
    """A message larger than the size limit gets 552 and leaves no accept record."""
    set_mode(mode_file, "accept-log")
    out = io.StringIO()
    handler = SinkholeHandler(ModeCache(FileModeSource(mode_file), clock=clock), out=out)
    async with _listener_for(handler, max_message_size=1024) as (_h, port):
        code, _ = await Listener(handler, port).send(MESSAGE + (b"x" * 70 + b"\r\n") * 60)
    assert code == 552
    assert out.getvalue() == ""


async def test_recipients_per_message_are_bounded(mode_file: Path, clock: Clock) -> None:
    """Past the recipient limit RCPT gets 452, so a client cannot grow the envelope."""
    set_mode(mode_file, "accept")
    handler = SinkholeHandler(ModeCache(FileModeSource(mode_file), clock=clock),
                              max_recipients=2)
    async with _listener_for(handler) as (_h, port):
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=5,
                                 local_hostname="client.test", start_tls=False)
        async with client:
            await client.mail("a@example.com")
            await client.rcpt("1@sinkhole.test")
            await client.rcpt("2@sinkhole.test")
            with pytest.raises(aiosmtplib.SMTPResponseException) as third:
                await client.rcpt("3@sinkhole.test")
    assert third.value.code == 452


async def test_ssm_parameter_sets_the_mode(moto_url: str, clock: Clock) -> None:
    """With --mode-parameter the mode is the SSM parameter's value (moto's server)."""
    ssm = boto3.client("ssm", endpoint_url=moto_url, region_name="us-east-1")
    ssm.put_parameter(Name="/cabal/sinkhole_mode", Value="bounce", Type="String")
    source = SsmModeSource("/cabal/sinkhole_mode", region="us-east-1", endpoint_url=moto_url)
    handler = SinkholeHandler(ModeCache(source, clock=clock))
    async with _listener_for(handler) as (_h, port):
        assert (await Listener(handler, port).rcpt())[0] == 550


async def test_missing_ssm_parameter_defers(moto_url: str, clock: Clock) -> None:
    """A parameter that does not exist means defer."""
    source = SsmModeSource("/cabal/absent", region="us-east-1", endpoint_url=moto_url)
    handler = SinkholeHandler(ModeCache(source, clock=clock))
    async with _listener_for(handler) as (_h, port):
        assert (await Listener(handler, port).rcpt())[0] == 421


async def test_unanswering_ssm_defers_within_the_read_deadline(clock: Clock) -> None:
    """An SSM endpoint that accepts but never answers costs one bounded wait, then defer."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        source = SsmModeSource("/cabal/sinkhole_mode", region="us-east-1",
                               endpoint_url=url, timeout=0.5)
        cache = ModeCache(source, clock=clock, timeout=0.5)
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
        async with asyncio.timeout(5):
            assert await cache.current() == "defer"
    finally:
        silent.close()


def test_sinkhole_command_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    """`selfcheckd sinkhole --mode-file` answers per the file and exits 0 on SIGTERM."""
    mode = tmp_path / "mode"
    mode.write_text("bounce\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon.cli", "sinkhole", "--listen", f"127.0.0.1:{port}",
         "--mode-file", str(mode)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        import smtplib

        for _ in range(200):
            try:
                smtp = smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=5)
                break
            except OSError:
                select.select([], [], [], 0.05)  # (time.sleep fails under faketime)
        else:
            pytest.fail("sinkhole did not listen")
        with smtp:
            smtp.ehlo()
            smtp.mail("qp-test@example.com")
            code, _ = smtp.rcpt("nobody@sinkhole.test")
        assert code == 550
        proc.send_signal(signal.SIGTERM)
        # No timeout here: its polling calls time.sleep, which fails under faketime;
        # pytest-timeout bounds the test.
        _, stderr = proc.communicate()
        assert proc.returncode == 0, stderr
        assert b"sinkhole_listening" in stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
