"""`config-check --connect` against real servers: the embedded SMTP/IMAP stack, moto's
CloudWatch Logs and SSM, aiohttp receivers over TLS, and servers that refuse or stay silent."""

from __future__ import annotations

import asyncio
import io
import os
import re
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from aiobotocore.session import get_session
from aiohttp import web

from daemon.cli import main
from daemon.config import Config
from daemon.connect_check import check_connections
from tests.conftest import StackFactory, refused_port
from tests.faulty_servers import silent_server
from tests.logwatch.conftest import moto_base, moto_url  # noqa: F401

GROUP = "/ecs/cabal-smtp-out"
PARAMETER = "/cabal/sinkhole_mode"
PULSE_TOKEN = "pulsetoken-7c1f2a9e"  # a stand-in updown pulse token
WRONG_PASSWORD = "not-the-password-Qx81"
LINE = re.compile(r"^(ok|FAIL|skip) +(.+?)  (.*) (\d+\.\d\d)s$")


@dataclass
class Receiver:
    """An aiohttp server that records every HTTP request and every TLS handshake."""

    url: str = ""
    requests: list[str] = field(default_factory=list)
    handshakes: int = 0


@asynccontextmanager
async def receiver(ca: trustme.CA | None = None) -> AsyncIterator[Receiver]:
    """An https receiver with a certificate from `ca` (plain http without one)."""
    rec = Receiver()
    ctx: ssl.SSLContext | None = None
    if ca is not None:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)

        def count(_sock: Any, _name: str | None, _ctx: Any) -> None:
            rec.handshakes += 1

        ctx.sni_callback = count

    async def handle(request: web.Request) -> web.Response:
        rec.requests.append(f"{request.method} {request.path}")
        return web.Response(text="OK")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    rec.url = f"{'https' if ctx else 'http'}://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield rec
    finally:
        await runner.cleanup()


@dataclass
class Report:
    ok: bool
    lines: list[str]
    elapsed: float

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def line(self, label: str) -> tuple[str, str, float]:
        """(status, rest after the label, elapsed) of the target named `label`."""
        for text in self.lines:
            m = LINE.match(text)
            if m and m.group(2) == label:
                return m.group(1), m.group(3), float(m.group(4))
        raise AssertionError(f"no line for {label!r} in:\n{self.text}")

    @property
    def labels(self) -> list[str]:
        return [m.group(2) for text in self.lines if (m := LINE.match(text))]

    @property
    def summary(self) -> str:
        return self.lines[-1]


async def connect_check(config: Config) -> Report:
    out = io.StringIO()
    started = time.monotonic()
    ok = await check_connections(config, out)
    return Report(ok, out.getvalue().splitlines(), time.monotonic() - started)


def make(routes: list[dict[str, Any]] | None = None, **sections: Any) -> Config:
    selfcheck = {"secret": "probe-secret-value", "routes": routes or []}
    return Config.model_validate({"selfcheck": selfcheck, **sections})


def file_source(path: Path) -> dict[str, Any]:
    return {"source": "file", "file": {"path": str(path)}}


def aws_source(endpoint: str, groups: list[str]) -> dict[str, Any]:
    return {
        "source": "cloudwatch",
        "cloudwatch": {"log_groups": groups, "endpoint_url": endpoint, "region": "us-east-1",
                       "request_timeout": 5},
        "sinkhole_mode": {"enabled": True, "endpoint_url": endpoint, "region": "us-east-1",
                          "request_timeout": 5},
    }


@pytest.fixture
def trust_test_ca(monkeypatch: pytest.MonkeyPatch, ca_file: Path) -> None:
    """The default trust store (the HTTP clients') is the test CA, as SSL_CERT_FILE makes it."""
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))


async def test_every_target_passes_and_nothing_is_sent_or_pinged(
    make_stack: StackFactory, server_ssl_context: ssl.SSLContext, ca_file: Path,
    test_ca: trustme.CA, tmp_path: Path, trust_test_ca: None,
) -> None:
    """Every kind of target passes, and not one message is delivered nor request made."""
    plain = await make_stack()
    secure = await make_stack(tls="starttls", ssl_context=server_ssl_context,
                              smtp_credentials=("submitter", "s3cret-pass"))
    secure_route = secure.route_table("secure")
    for side in ("smtp", "imap"):
        secure_route[side]["ca_file"] = str(ca_file)
    maillog = tmp_path / "maillog"
    maillog.write_text("a line\n", encoding="utf-8")
    async with receiver(test_ca) as pulse, receiver() as gateway:
        config = make(
            [plain.route_table("plain"), secure_route],
            heartbeat=[{"name": "updown", "url": f"{pulse.url}/{PULSE_TOKEN}/key"}],
            leakwatch={**file_source(maillog),
                       "alert": {"url": f"{pulse.url}/alert", "secret": "alert-secret-1"}},
            pushgateway={"url": gateway.url},
        )
        report = await connect_check(config)
        assert report.ok, report.text
        assert report.labels == ["smtp plain", "imap plain", "smtp secure", "imap secure",
                                 "heartbeat updown", "logfile", "alert", "pushgateway"]
        assert all(line.startswith("ok    ") for line in report.lines[:-1]), report.text
        assert report.summary == "all 8 targets reachable"
        assert report.line("smtp secure")[1] == (
            f"127.0.0.1:{secure.smtp.port} (STARTTLS, AUTH as submitter)")
        assert report.line("imap secure")[1] == (
            f"127.0.0.1:{secure.imap.port} (STARTTLS, LOGIN as selfcheck-receiver, "
            "SELECT INBOX)")
        assert report.line("smtp plain")[1].endswith("(no TLS, no AUTH)")
        assert report.line("logfile")[1] == f"{maillog} (readable regular file, 7 bytes)"
        _, heartbeat, _ = report.line("heartbeat updown")
        assert heartbeat.startswith(f"{pulse.url} (TCP connect, TLSv1.")
        assert "no request sent" in heartbeat
        assert report.line("pushgateway")[1].startswith(f"{gateway.url} (TCP connect; http")
        # TLS was really negotiated with the receiver, and nothing was asked of it.
        assert pulse.handshakes == 2
        assert pulse.requests == []
        assert gateway.requests == []
        # Control: the receivers do record a request when one is made.
        async with aiohttp.ClientSession() as session, session.get(f"{gateway.url}/x") as resp:
            assert resp.status == 200
        assert gateway.requests == ["GET /x"]
    assert PULSE_TOKEN not in report.text
    assert "s3cret-pass" not in report.text
    assert plain.smtp.delivered == secure.smtp.delivered == 0
    assert await plain.inbox() == []
    assert await secure.inbox() == []


async def test_cloudwatch_groups_and_sinkhole_parameter_pass(moto_url: str) -> None:  # noqa: F811
    """DescribeLogStreams on each group and GetParameter on the sinkhole mode, against moto."""
    async with get_session().create_client(
        "logs", region_name="us-east-1", endpoint_url=moto_url) as logs:
        for group in (GROUP, "/ecs/other"):
            await logs.create_log_group(logGroupName=group)
        await logs.create_log_stream(logGroupName=GROUP, logStreamName="smtp-out/smtp-out/abc")
    async with get_session().create_client(
        "ssm", region_name="us-east-1", endpoint_url=moto_url) as ssm:
        await ssm.put_parameter(Name=PARAMETER, Value="defer", Type="String")
    report = await connect_check(make(leakwatch=aws_source(moto_url, [GROUP, "/ecs/other"])))
    assert report.ok, report.text
    assert report.labels == [f"cloudwatch {GROUP}", "cloudwatch /ecs/other", f"ssm {PARAMETER}"]
    endpoint = moto_url  # moto's URL is already scheme://host:port
    assert report.line(f"cloudwatch {GROUP}")[:2] == (
        "ok", f"{endpoint} (DescribeLogStreams: a stream named smtp-out*: smtp-out/smtp-out/abc)")
    assert report.line("cloudwatch /ecs/other")[1].endswith("no stream named smtp-out* yet)")
    assert report.line(f"ssm {PARAMETER}")[:2] == ("ok", f"{endpoint} (GetParameter: mode 'defer')")


async def test_missing_log_group_fails_naming_it(moto_url: str) -> None:  # noqa: F811
    """A group moto answers ResourceNotFound for is a FAIL line; the existing one passes."""
    async with get_session().create_client(
        "logs", region_name="us-east-1", endpoint_url=moto_url) as logs:
        await logs.create_log_group(logGroupName=GROUP)
    leakwatch = aws_source(moto_url, [GROUP, "/ecs/typo"])
    leakwatch["sinkhole_mode"]["enabled"] = False
    report = await connect_check(make(leakwatch=leakwatch))
    assert not report.ok
    assert report.line(f"cloudwatch {GROUP}")[0] == "ok"
    status, detail, _ = report.line("cloudwatch /ecs/typo")
    assert status == "FAIL"
    assert detail.endswith("logs:DescribeLogStreams: log group /ecs/typo not found "
                           "(ResourceNotFoundException)")
    assert report.summary == "1 of 2 targets failed: cloudwatch /ecs/typo"


async def test_no_aws_credentials_is_a_clear_fail(
    moto_base: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,  # noqa: F811
) -> None:
    """Without any AWS credentials both AWS targets fail saying so, with no traceback."""
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    for var, name in (("AWS_SHARED_CREDENTIALS_FILE", "credentials"),
                      ("AWS_CONFIG_FILE", "config")):
        (tmp_path / name).write_text("", encoding="utf-8")
        monkeypatch.setenv(var, str(tmp_path / name))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance role to find here
    report = await connect_check(make(leakwatch=aws_source(moto_base, [GROUP])))
    assert not report.ok
    for label in (f"cloudwatch {GROUP}", f"ssm {PARAMETER}"):
        status, detail, _ = report.line(label)
        assert status == "FAIL"
        assert detail.startswith(f"{moto_base}: no AWS credentials (none in the environment")
    assert "Traceback" not in report.text
    assert report.summary == f"2 of 2 targets failed: cloudwatch {GROUP}, ssm {PARAMETER}"


async def test_access_denied_names_the_missing_permission(monkeypatch: pytest.MonkeyPatch) -> None:
    """An endpoint answering AccessDeniedException gives a FAIL naming the IAM action."""
    for var, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing")):
        monkeypatch.setenv(var, value)

    async def deny(request: web.Request) -> web.Response:
        target = request.headers.get("X-Amz-Target", "").rpartition(".")[2]
        return web.json_response(
            {"__type": "AccessDeniedException",
             "message": f"User: arn:aws:sts::123456789012:assumed-role/selfcheckd-task/x is not "
                        f"authorized to perform: {target}"},
            status=400, content_type="application/x-amz-json-1.1")

    app = web.Application()
    app.router.add_post("/", deny)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        report = await connect_check(make(leakwatch=aws_source(url, [GROUP])))
    finally:
        await runner.cleanup()
    assert not report.ok
    status, detail, _ = report.line(f"cloudwatch {GROUP}")
    assert status == "FAIL"
    assert (f"logs:DescribeLogStreams: access denied: the credentials in use lack "
            f"logs:DescribeLogStreams on log group {GROUP}") in detail
    status, detail, _ = report.line(f"ssm {PARAMETER}")
    assert status == "FAIL"
    assert "ssm:GetParameter: access denied" in detail


async def test_wrong_imap_password_fails_naming_route_and_login(make_stack: StackFactory) -> None:
    """A refused LOGIN is a FAIL line for that route's IMAP naming the login; no password shown."""
    stack = await make_stack()
    route = stack.route_table()
    route["imap"]["password"] = WRONG_PASSWORD
    report = await connect_check(make([route]))
    assert not report.ok
    assert report.line("smtp default")[0] == "ok"
    status, detail, _ = report.line("imap default")
    assert status == "FAIL"
    assert detail.startswith(f"127.0.0.1:{stack.imap.port}: login failed: NO")
    assert report.summary == "1 of 2 targets failed: imap default"
    assert WRONG_PASSWORD not in report.text
    assert stack.options.imap_password not in report.text


async def test_closed_ports_fail_at_once() -> None:
    """Refused connections to SMTP, IMAP and a heartbeat fail straight away, not at the deadline."""
    port = refused_port()
    route = {"name": "r", "from": "a@example.com", "to": "b@example.com",
             "smtp": {"host": "127.0.0.1", "port": port, "security": "none",
                      "connect_timeout": 5},
             "imap": {"host": "127.0.0.1", "port": port, "security": "none",
                      "username": "u", "password": "imap-password-1", "connect_timeout": 5}}
    config = make([route], heartbeat=[{"url": f"http://127.0.0.1:{port}/t0ken123", "timeout": 5}])
    report = await connect_check(config)
    assert not report.ok
    for label in ("smtp r", "imap r", "heartbeat default"):
        status, detail, elapsed = report.line(label)
        assert status == "FAIL", detail
        assert elapsed < 2.0, report.text  # connect_timeout is 5 s
    assert report.line("smtp r")[1] == f"127.0.0.1:{port}: connect: Connection refused"
    assert report.line("imap r")[1] == f"127.0.0.1:{port}: connect: Connection refused"
    assert report.line("heartbeat default")[1] == (
        f"http://127.0.0.1:{port}: TCP connect: Connection refused")
    assert report.summary == "3 of 3 targets failed: smtp r, imap r, heartbeat default"


async def test_silent_servers_fail_within_their_deadline() -> None:
    """Servers that accept and never speak fail when their configured timeout runs out."""
    async with silent_server() as port:
        route = {"name": "r", "from": "a@example.com", "to": "b@example.com",
                 "smtp": {"host": "127.0.0.1", "port": port, "security": "starttls",
                          "connect_timeout": 0.5, "timeout": 1},
                 "imap": {"host": "127.0.0.1", "port": port, "security": "starttls",
                          "username": "u", "password": "imap-password-1",
                          "connect_timeout": 0.5, "command_timeout": 1}}
        config = make([route],
                      heartbeat=[{"url": f"https://127.0.0.1:{port}/t0ken123", "timeout": 0.7}])
        report = await connect_check(config)
    assert not report.ok
    smtp, imap, heartbeat = (report.line(x) for x in ("smtp r", "imap r", "heartbeat default"))
    assert smtp[0] == imap[0] == heartbeat[0] == "FAIL"
    # The greeting never comes: both give up at connect_timeout, well inside the deadline.
    assert smtp[1].startswith(f"127.0.0.1:{port}: connect: ")
    assert "(after 0.5s)" in smtp[1]
    assert imap[1] == f"127.0.0.1:{port}: connect: no answer within 0.5s"
    for _, _, elapsed in (smtp, imap):
        assert 0.45 <= elapsed < 0.5 + 1.0
    # TCP is accepted, the TLS handshake is never answered: cut at the target's 0.7 s.
    assert heartbeat[1] == (f"https://127.0.0.1:{port}: TLS handshake: no answer within "
                            "the 0.7s deadline")
    assert 0.65 <= heartbeat[2] < 0.7 + 0.5
    assert report.elapsed < 1.5  # all at once, not one after the other


@pytest.mark.parametrize(("make_path", "status", "detail"), [
    (lambda tmp: tmp / "state.json", "ok", "writable directory, file not yet written"),
    (lambda tmp: tmp / "lib" / "selfcheckd" / "state.json", "ok",
     "{tmp}/lib/selfcheckd will be created in {tmp}"),
    (lambda tmp: tmp, "FAIL", "is a directory"),
    (lambda tmp: tmp / "maillog" / "state.json", "FAIL", "{tmp}/maillog is not a directory"),
])
async def test_the_state_file_location_is_checked_without_writing(
    tmp_path: Path, make_path: Any, status: str, detail: str,
) -> None:
    """--connect says whether the state file can be saved where configured (a directory
    still to be created is fine when its parent is writable) and writes nothing."""
    maillog = tmp_path / "maillog"
    maillog.write_text("a line\n", encoding="utf-8")
    path = make_path(tmp_path)
    report = await connect_check(make(leakwatch={**file_source(maillog),
                                                 "state_file": str(path)}))
    assert report.line("statefile")[:2] == (status, f"{path}: {detail.format(tmp=tmp_path)}"
                                            if status == "FAIL" else
                                            f"{path} ({detail.format(tmp=tmp_path)})")
    assert sorted(os.listdir(tmp_path)) == ["maillog"]


@pytest.mark.parametrize(("make_path", "reason"), [
    (lambda tmp: tmp / "missing.log", "no such file"),
    (lambda tmp: tmp, "not a regular file: a directory"),
])
async def test_log_file_missing_or_a_directory_fails(
    tmp_path: Path, make_path: Any, reason: str,
) -> None:
    """The file leak source must exist and be a regular, readable file."""
    path = make_path(tmp_path)
    report = await connect_check(make(leakwatch=file_source(path)))
    assert not report.ok
    assert report.line("logfile")[:2] == ("FAIL", f"{path}: {reason}")
    assert report.summary == "1 of 1 target failed: logfile"


async def test_stdin_source_is_skipped_and_not_a_failure() -> None:
    """With the leak source on stdin there is nothing to reach: a skip line, and success."""
    report = await connect_check(make(leakwatch={"source": "stdin"}))
    assert report.ok
    status, detail, _ = report.line("stdin")
    assert status == "skip"
    assert "nothing to reach" in detail
    assert report.summary == "0 targets reachable, 1 skipped, none failed"


async def test_cli_exit_code_and_lines(
    make_stack: StackFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    restore_logging: None,
) -> None:
    """`config-check --connect` prints a line per target; exit 1 on a failure, else 0."""
    stack = await make_stack()
    route = stack.route_table()
    maillog = tmp_path / "maillog"
    path = tmp_path / "selfcheckd.toml"
    path.write_text(
        '[selfcheck]\nsecret = "probe-secret-value"\n'
        "[[selfcheck.routes]]\n"
        f'name = "default"\nfrom = "{route["from"]}"\nto = "{route["to"]}"\n'
        f'smtp = {{ host = "127.0.0.1", port = {stack.smtp.port}, security = "none" }}\n'
        f'imap = {{ host = "127.0.0.1", port = {stack.imap.port}, security = "none", '
        f'username = "{stack.options.imap_user}", password = "{stack.options.imap_password}" }}\n'
        f'[leakwatch]\nsource = "file"\nfile.path = "{maillog}"\n',
        encoding="utf-8")
    argv = ["config-check", "--config", str(path), "--connect"]

    code = await asyncio.to_thread(main, argv)
    out = capsys.readouterr().out.splitlines()
    assert code == 1
    assert [m.group(1, 2) for x in out[1:-1] if (m := LINE.match(x))] == [
        ("ok", "smtp default"), ("ok", "imap default"), ("FAIL", "logfile")]
    assert out[-1] == "1 of 3 targets failed: logfile"

    maillog.write_text("", encoding="utf-8")
    code = await asyncio.to_thread(main, argv)
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert out[0].startswith("config OK")
    assert [x[:6] for x in out[1:-1]] == ["ok    "] * 3
    assert out[-1] == "all 3 targets reachable"
    assert stack.options.imap_password not in "\n".join(out)
    assert await stack.inbox() == []


async def test_untrusted_certificate_fails_the_tls_handshake(
    make_stack: StackFactory, server_ssl_context: ssl.SSLContext, test_ca: trustme.CA,
) -> None:
    """Without the test CA in the trust store, STARTTLS and the https handshake are refused."""
    stack = await make_stack(tls="starttls", ssl_context=server_ssl_context)
    async with receiver(test_ca) as pulse:
        config = make([stack.route_table()], heartbeat=[{"url": f"{pulse.url}/{PULSE_TOKEN}"}])
        report = await connect_check(config)
        assert pulse.requests == []
    assert not report.ok
    for label, step in (("smtp default", "STARTTLS"), ("imap default", "TLS handshake"),
                        ("heartbeat default", "TLS handshake")):
        status, detail, _ = report.line(label)
        assert status == "FAIL"
        assert f": {step}" in detail, detail
        assert "certificate verify failed" in detail, detail


async def test_an_unresolvable_host_says_so() -> None:
    """A host name that does not resolve reads as such on SMTP and IMAP, not "Unknown error"."""
    route = {"name": "r", "from": "a@example.com", "to": "b@example.com",
             "smtp": {"host": "smtp.invalid", "security": "none"},
             "imap": {"host": "imap.invalid", "security": "none"}}
    report = await connect_check(make([route]))
    for label in ("smtp r", "imap r"):
        assert "connect: cannot resolve the host name" in report.line(label)[1], report.text


async def test_the_target_column_is_never_scrubbed() -> None:
    """Scrubbing secrets never eats into the scheme://host:port the line shows."""
    config = make(leakwatch={"source": "stdin",
                             "alert": {"url": f"http://127.0.0.1:{refused_port()}/alert"}})
    report = await connect_check(config)
    assert report.line("alert")[1].startswith("http://127.0.0.1:"), report.text


async def test_a_pushgateway_behind_a_proxy_is_reached_through_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With http_proxy set (as urllib honours it for the push), --connect tests the proxy."""
    accepted: list[bool] = []

    async def proxy(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(True)
        writer.close()

    server = await asyncio.start_server(proxy, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    try:
        report = await connect_check(make(pushgateway={"url": "pushgateway.invalid:9091"}))
    finally:
        server.close()
    status, detail, _ = report.line("pushgateway")
    assert status == "ok", report.text
    assert detail.startswith(f"http://pushgateway.invalid:9091 via proxy http://127.0.0.1:{port}")
    assert accepted == [True]
