"""`check`'s Pushgateway push, against a real HTTP stand-in that records every request."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from collections.abc import AsyncIterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from daemon.checks.result import CheckResult
from daemon.cli import main
from daemon.config import ConfigError, PushgatewayConfig, load_config
from daemon.embedded.stack import EmbeddedMailStack
from daemon.logs import configure_logging
from daemon.pushgateway import push_results

# Messages' names and help texts (core/management/commands/selfcheck.py), verbatim.
MESSAGES_HELP = {
    "selfcheck_start_time": "Start timestamp of the self check",
    "selfcheck_end_time": "End timestamp of the self check",
    "selfcheck_success": "Success of the self check",
    "selfcheck_send_duration_seconds": "Send duration of the self check",
    "selfcheck_reception_duration_seconds": "Reception duration of the self check",
}
ENABLED = "MESSAGES_SELFCHECK_PROMETHEUS_METRICS_ENABLED"
PGW_URL = "MESSAGES_SELFCHECK_PROMETHEUS_METRICS_PUSHGATEWAY_URL"
PREFIX = "MESSAGES_SELFCHECK_PROMETHEUS_METRICS_PREFIX"
SEED_ROUTE_ENV = {
    "MESSAGES_SELFCHECK_FROM": "selfcheck@example.local",
    "MESSAGES_SELFCHECK_TO": "receiver@example.local",
    "SELFCHECK_SMTP_HOST": "smtp-out", "SELFCHECK_IMAP_HOST": "imap.example.local",
}


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: str


class Pushgateway:
    """A Pushgateway stand-in: records requests, answers a set status, can hold its answer."""

    def __init__(self) -> None:
        self.pushes: list[Seen] = []
        self.status = 200
        self.hang = False
        self.release = asyncio.Event()
        self.port = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.pushes.append(Seen(request.method, request.path, dict(request.headers),
                                (await request.read()).decode()))
        if self.hang:
            await self.release.wait()
        if self.status >= 400:  # as proxies do, the error body echoes the path
            return web.Response(status=self.status, text=f"cannot push to {request.path}")
        return web.Response(status=self.status)

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@pytest.fixture
async def pushgateway() -> AsyncIterator[Pushgateway]:
    gw = Pushgateway()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", gw.handle)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    gw.port = runner.addresses[0][1]
    yield gw
    gw.release.set()
    await runner.cleanup()


@pytest.fixture
async def trickling_port() -> AsyncIterator[int]:
    """A server that starts an HTTP answer and then sends one header line every 0.1 s."""
    stop = asyncio.Event()
    writers: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        with suppress(ConnectionError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\n")
            while not stop.is_set():  # each line arrives well within a socket timeout
                writer.write(b"X-Slow: 1\r\n")
                await writer.drain()
                with suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.1)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    stop.set()
    for writer in writers:
        writer.close()
    server.close()
    await server.wait_closed()


def result(route: str = "default", **fields: Any) -> CheckResult:
    values: dict[str, Any] = {"success": True, "send_time": 0.15, "reception_time": 2.34,
                              "started_at": 1_790_000_000.25, "finished_at": 1_790_000_002.75}
    values.update(fields)
    return CheckResult(route=route, run_id="r1", **values)


def gauges(body: str) -> dict[str, float]:
    """Sample name -> value of a pushed text-format body; every family must be a gauge."""
    out = {}
    for family in text_string_to_metric_families(body):
        assert family.type == "gauge", family
        for sample in family.samples:
            assert sample.labels == {}, sample
            out[sample.name] = sample.value
    return out


def help_texts(body: str) -> dict[str, str]:
    return {f.name: f.documentation for f in text_string_to_metric_families(body)}


def config(url: str, **fields: Any) -> PushgatewayConfig:
    return PushgatewayConfig.model_validate({"url": url, **fields})


async def push(cfg: PushgatewayConfig, results: list[CheckResult]) -> None:
    """push_results blocks (urllib), so it runs off the loop that serves the stand-in."""
    await asyncio.to_thread(push_results, cfg, results)


# -- what is pushed ------------------------------------------------------------------------


async def test_one_route_pushes_messages_gauges_to_the_job_group(
    pushgateway: Pushgateway,
) -> None:
    """One route: one PUT to /metrics/job/selfcheck with Messages' five gauges, from the result."""
    with capture_logs() as logs:
        await push(config(pushgateway.url()), [result()])
    [seen] = pushgateway.pushes
    assert (seen.method, seen.path) == ("PUT", "/metrics/job/selfcheck")
    assert seen.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert gauges(seen.body) == {
        "selfcheck_start_time": 1_790_000_000.25,
        "selfcheck_end_time": 1_790_000_002.75,
        "selfcheck_success": 1.0,
        "selfcheck_send_duration_seconds": 0.15,
        "selfcheck_reception_duration_seconds": 2.34,
    }
    assert help_texts(seen.body) == MESSAGES_HELP
    assert [(e["event"], e["log_level"], e["route"]) for e in logs] == [
        ("pushgateway_pushed", "info", "default")]


async def test_failed_run_pushes_zero_and_leaves_out_unmeasured_durations(
    pushgateway: Pushgateway,
) -> None:
    """A failed run pushes success 0 and its times; a duration it never measured is not pushed."""
    await push(config(pushgateway.url()), [result(success=False, reception_time=None)])
    await push(config(pushgateway.url()), [result(success=False, send_time=None,
                                                  reception_time=None)])
    late, early = (gauges(s.body) for s in pushgateway.pushes)
    assert late == {"selfcheck_start_time": 1_790_000_000.25,
                    "selfcheck_end_time": 1_790_000_002.75,
                    "selfcheck_success": 0.0, "selfcheck_send_duration_seconds": 0.15}
    assert early == {"selfcheck_start_time": 1_790_000_000.25,
                     "selfcheck_end_time": 1_790_000_002.75, "selfcheck_success": 0.0}


async def test_prefix_and_job_from_the_pushgateway_table(
    pushgateway: Pushgateway, tmp_path: Path,
) -> None:
    """`[pushgateway] prefix` prefixes every gauge name; `job` names the group."""
    path = tmp_path / "c.toml"
    path.write_text(f'[pushgateway]\nurl = "{pushgateway.url()}"\nprefix = "cabal_"\n'
                    'job = "mailcheck"\ntimeout = 3\n')
    cfg = load_config(path, SEED_ROUTE_ENV).config.pushgateway
    assert cfg is not None
    assert (cfg.prefix, cfg.job, cfg.timeout) == ("cabal_", "mailcheck", 3)
    await push(cfg, [result()])
    [seen] = pushgateway.pushes
    assert seen.path == "/metrics/job/mailcheck"
    assert sorted(gauges(seen.body)) == sorted(f"cabal_{name}" for name in MESSAGES_HELP)


async def test_messages_environment_variables_enable_the_push_with_a_prefix(
    pushgateway: Pushgateway,
) -> None:
    """ENABLED=true takes Messages' URL and prefix variables; the gauges carry the prefix."""
    env = {**SEED_ROUTE_ENV, ENABLED: "true", PGW_URL: pushgateway.url(), PREFIX: "messages_"}
    cfg = load_config(None, env).config.pushgateway
    assert cfg is not None
    assert (cfg.url, cfg.prefix, cfg.job) == (pushgateway.url(), "messages_", "selfcheck")
    await push(cfg, [result()])
    [seen] = pushgateway.pushes
    assert seen.path == "/metrics/job/selfcheck"
    assert sorted(help_texts(seen.body).items()) == sorted(
        (f"messages_{name}", text) for name, text in MESSAGES_HELP.items())


def test_messages_switch_off_means_no_push_even_with_a_url() -> None:
    """ENABLED=false (as in Messages) ignores the URL and prefix variables: no pushgateway."""
    env = {**SEED_ROUTE_ENV, ENABLED: "false", PGW_URL: "http://pgw:9091", PREFIX: "m_"}
    assert load_config(None, env).config.pushgateway is None
    assert load_config(None, {**SEED_ROUTE_ENV, PGW_URL: "http://pgw:9091"}).config \
        .pushgateway is None


def test_messages_switch_off_turns_off_the_files_pushgateway_too(tmp_path: Path) -> None:
    """ENABLED=off said in so many words wins over the file's [pushgateway] table (it
    pushed anyway); left unset, the table stands."""
    path = tmp_path / "c.toml"
    path.write_text(
        '[[selfcheck.routes]]\nfrom = "a@example.com"\nto = "b@example.com"\n'
        'smtp = { host = "smtp" }\nimap = { host = "imap" }\n'
        '[pushgateway]\nurl = "http://pgw.example:9091"\n')
    assert load_config(path, {ENABLED: "off"}).config.pushgateway is None
    assert load_config(path, {}).config.pushgateway is not None


def test_messages_switch_with_a_non_boolean_is_a_config_error() -> None:
    """ENABLED=maybe is a config error naming the variable."""
    env = {**SEED_ROUTE_ENV, ENABLED: "maybe", PGW_URL: "http://pgw:9091"}
    with pytest.raises(ConfigError) as caught:
        load_config(None, env)
    assert any(p.startswith(ENABLED) for p in caught.value.problems), caught.value.problems


async def test_several_routes_push_one_group_per_route(pushgateway: Pushgateway) -> None:
    """Several routes: one PUT per route, the route as a grouping key, each with its own result."""
    with capture_logs() as logs:
        await push(config(pushgateway.url()),
                   [result("eu"), result("us", success=False, reception_time=None)])
    pushed = {s.path: gauges(s.body) for s in pushgateway.pushes}
    assert [s.method for s in pushgateway.pushes] == ["PUT", "PUT"]
    assert sorted(pushed) == ["/metrics/job/selfcheck/route/eu", "/metrics/job/selfcheck/route/us"]
    assert pushed["/metrics/job/selfcheck/route/eu"]["selfcheck_success"] == 1.0
    assert pushed["/metrics/job/selfcheck/route/us"]["selfcheck_success"] == 0.0
    assert "selfcheck_reception_duration_seconds" not in pushed["/metrics/job/selfcheck/route/us"]
    assert sorted((e["event"], e["route"]) for e in logs) == [
        ("pushgateway_pushed", "eu"), ("pushgateway_pushed", "us")]


async def test_grouped_keeps_a_lone_route_in_its_own_group(pushgateway: Pushgateway) -> None:
    """`grouped=True` (check --route on a several-route config) pushes to the route's group."""
    await asyncio.to_thread(push_results, config(pushgateway.url()), [result("eu")],
                            grouped=True)
    assert [s.path for s in pushgateway.pushes] == ["/metrics/job/selfcheck/route/eu"]


async def test_basic_auth_arrives_and_no_secret_reaches_a_log_line(
    pushgateway: Pushgateway, restore_logging: None,
) -> None:
    """Basic auth reaches the Pushgateway; neither the password nor a URL path token is logged."""
    password, token = "pw-Secret-4242", "proxy-token-8f3a9c"
    cfg = config(pushgateway.url(f"/{token}/"), username="pusher", password=password)
    out = io.StringIO()
    configure_logging("kv", "debug", stream=out)
    await push(cfg, [result()])
    pushgateway.status = 401  # its error body echoes the path, token included
    await push(cfg, [result()])
    ok, refused = pushgateway.pushes
    expected = base64.b64encode(f"pusher:{password}".encode()).decode()
    assert ok.headers["Authorization"] == refused.headers["Authorization"] == f"Basic {expected}"
    assert ok.path == f"/{token}/metrics/job/selfcheck"
    lines = out.getvalue().splitlines()
    origin = f"url=http://127.0.0.1:{pushgateway.port}"
    assert [line.split()[0] for line in lines] == ["pushgateway_pushed", "pushgateway_push_failed"]
    assert all(origin in line for line in lines), lines
    assert "HTTP 401" in lines[1], lines
    assert not [line for line in lines if password in line or token in line], lines


# -- failures: logged, never raised, bounded in time ------------------------------------------


def failures(logs: list[dict[str, Any]]) -> list[str]:
    assert [e["event"] for e in logs] == ["pushgateway_push_failed"], logs
    assert logs[0]["log_level"] == "error"
    return [str(e["error"]) for e in logs]


async def test_http_error_is_logged_with_its_body(pushgateway: Pushgateway) -> None:
    """A 500 is logged (status and the Pushgateway's explanation) and push_results returns."""
    pushgateway.status = 500
    with capture_logs() as logs:
        await push(config(pushgateway.url()), [result()])
    [error] = failures(logs)
    assert error == "HTTP 500 Internal Server Error: cannot push to /metrics/job/selfcheck"
    assert logs[0]["url"] == f"http://127.0.0.1:{pushgateway.port}"
    assert logs[0]["route"] == "default"


async def test_refused_connection_is_logged(closed_port: int) -> None:
    """A closed port is logged as refused and push_results returns."""
    with capture_logs() as logs:
        await push(config(f"http://127.0.0.1:{closed_port}"), [result()])
    [error] = failures(logs)
    assert "refused" in error.lower(), error


@pytest.mark.parametrize("kind", ["silent", "trickling"])
async def test_slow_pushgateway_is_given_up_within_the_timeout(
    kind: str, pushgateway: Pushgateway, trickling_port: int,
) -> None:
    """A Pushgateway that never answers, or answers a byte at a time, costs about `timeout`."""
    pushgateway.hang = True
    url = pushgateway.url() if kind == "silent" else f"http://127.0.0.1:{trickling_port}"
    began = time.monotonic()
    with capture_logs() as logs:
        await push(config(url, timeout=0.3), [result(), result("b")])
    elapsed = time.monotonic() - began
    assert elapsed < 1.5, elapsed  # 0.3 s + the join margin, not 0.3 s per route or forever
    assert [e["event"] for e in logs] == ["pushgateway_push_failed"] * 2
    assert {e["error"] for e in logs} == {"no answer within 0.3s"}


@pytest.mark.parametrize(("url", "origin", "error"), [
    # urllib would truncate 99999 to 34463 and connect there: refused before any socket.
    ("http://127.0.0.1:99999", "http://<invalid address>", "port must be a number 1-65535"),
    ("http://127.0.0.1:notaport/tok-123456", "http://<invalid address>", "port must be a number"),
    ("ftp://127.0.0.1:21/tok-123456", "ftp://<invalid address>", "scheme must be http or https"),
    ("http://127.0.0.1:0", "http://<invalid address>", "port must be a number 1-65535"),
    ("http://", "http://<invalid address>", "no host"),
    ("http://[::1/tok-123456", "http://<invalid address>", "not a valid URL"),
    ("http://exa mple.invalid:9091", "http://exa mple.invalid:9091", "InvalidURL"),
])
async def test_bad_url_is_logged_and_does_not_raise(url: str, origin: str, error: str) -> None:
    """A URL that cannot be used is logged as a failure, naming no path, and never raises."""
    # Built without validation: push_results must hold even if such a URL gets past the config.
    cfg = PushgatewayConfig.model_construct(url=url, job="selfcheck", prefix="", timeout=2,
                                            username=None, password=None)
    with capture_logs() as logs:
        await push(cfg, [result()])
    [logged] = failures(logs)
    assert logs[0]["url"] == origin
    assert error in logged, logged
    assert "tok-123456" not in logged


async def test_bare_host_and_port_means_http(pushgateway: Pushgateway) -> None:
    """`127.0.0.1:PORT` without a scheme pushes over http, as push_to_gateway allows."""
    with capture_logs() as logs:
        await push(config(f"127.0.0.1:{pushgateway.port}"), [result()])
    assert [s.path for s in pushgateway.pushes] == ["/metrics/job/selfcheck"]
    assert logs[0]["url"] == f"http://127.0.0.1:{pushgateway.port}"


# -- end to end through the CLI ------------------------------------------------------------


def write_check_config(path: Path, stack: EmbeddedMailStack, pushgateway_url: str,
                       timeout: float = 30) -> Path:
    r = stack.route_table()
    path.write_text(
        f'[selfcheck]\ntimeout = {timeout}\nsecret = "x"\n'
        f'[[selfcheck.routes]]\nfrom = "{r["from"]}"\nto = "{r["to"]}"\n'
        f'smtp = {{ host = "127.0.0.1", port = {stack.smtp.port}, security = "none" }}\n'
        f'imap = {{ host = "127.0.0.1", port = {stack.imap.port}, security = "none", '
        f'username = "{stack.options.imap_user}", password = "{stack.options.imap_password}" }}\n'
        f'[pushgateway]\nurl = "{pushgateway_url}"\ntimeout = 2\n'
    )
    return path


async def test_cli_check_pushes_its_result_once(
    mail_stack: EmbeddedMailStack, pushgateway: Pushgateway, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], restore_logging: None,
) -> None:
    """`selfcheckd check` with [pushgateway] exits 0 and pushes the run it printed, once."""
    path = write_check_config(tmp_path / "c.toml", mail_stack, pushgateway.url())
    code = await asyncio.to_thread(main, ["check", "--config", str(path), "--json"])
    assert code == 0
    [seen] = pushgateway.pushes
    assert (seen.method, seen.path) == ("PUT", "/metrics/job/selfcheck")
    pushed = gauges(seen.body)
    captured = capsys.readouterr()
    printed = json.loads(captured.out)
    assert [x for x in captured.err.splitlines() if x.startswith("pushgateway_pushed")] == [
        f"pushgateway_pushed route=default url=http://127.0.0.1:{pushgateway.port} "
        "job=selfcheck success=true"]
    assert pushed["selfcheck_success"] == 1.0
    assert round(pushed["selfcheck_send_duration_seconds"], 3) == printed["send_time"]
    assert round(pushed["selfcheck_reception_duration_seconds"], 3) == printed["reception_time"]
    assert pushed["selfcheck_start_time"] <= pushed["selfcheck_end_time"] <= time.time()


async def test_cli_failed_check_is_pushed_and_exits_1(
    mail_stack: EmbeddedMailStack, pushgateway: Pushgateway, tmp_path: Path,
    restore_logging: None,
) -> None:
    """A failed check (probe lost in transit) still pushes: success 0, no reception duration."""
    mail_stack.smtp.drop = True
    path = write_check_config(tmp_path / "c.toml", mail_stack, pushgateway.url(), timeout=1)
    code = await asyncio.to_thread(main, ["check", "--config", str(path), "--json"])
    assert code == 1
    [seen] = pushgateway.pushes
    pushed = gauges(seen.body)
    assert pushed["selfcheck_success"] == 0.0
    assert "selfcheck_send_duration_seconds" in pushed
    assert "selfcheck_reception_duration_seconds" not in pushed


async def test_cli_check_exit_code_ignores_a_dead_pushgateway(
    mail_stack: EmbeddedMailStack, closed_port: int, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], restore_logging: None,
) -> None:
    """With the Pushgateway down, a successful check still exits 0 and the failed push is logged."""
    path = write_check_config(tmp_path / "c.toml", mail_stack, f"http://127.0.0.1:{closed_port}")
    code = await asyncio.to_thread(main, ["check", "--config", str(path), "--json"])
    assert code == 0
    err = capsys.readouterr().err
    [line] = [x for x in err.splitlines() if x.startswith("pushgateway_push_failed")]
    assert f"url=http://127.0.0.1:{closed_port}" in line and "route=default" in line


def test_a_prefix_prometheus_would_rewrite_is_a_config_error(tmp_path: Path) -> None:
    """`prefix = "my-"` would quietly become `my_`: refused, naming the key."""
    path = tmp_path / "c.toml"
    path.write_text(
        '[[selfcheck.routes]]\nfrom = "a@example.com"\nto = "b@example.com"\n'
        'smtp = { host = "smtp" }\nimap = { host = "imap" }\n'
        '[pushgateway]\nurl = "http://pgw:9091"\nprefix = "my-"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path, {})
    assert [p.split(":")[0] for p in caught.value.problems] == ["pushgateway.prefix"]


def test_the_pushgateway_password_and_path_token_are_redacted(tmp_path: Path) -> None:
    """secret_values() covers the password and the URL's path, not its host."""
    path = tmp_path / "c.toml"
    path.write_text(
        '[[selfcheck.routes]]\nfrom = "a@example.com"\nto = "b@example.com"\n'
        'smtp = { host = "smtp" }\nimap = { host = "imap" }\n'
        '[pushgateway]\nurl = "https://pgw.example:9091/tok-123456"\n'
        'username = "u"\npassword = "pw-7654321"\n')
    values = load_config(path, {}).config.secret_values()
    assert {"pw-7654321", "tok-123456"} <= values
    assert "https://pgw.example:9091" not in values and "pgw.example:9091" not in values


@pytest.mark.parametrize("url", ["127.0.0.1:9091", "127.0.0.1:9091/tok-123456",
                                 "localhost:9091"])
def test_a_bare_host_and_port_is_not_taken_for_a_secret(tmp_path: Path, url: str) -> None:
    """Messages' `IP:PORT` form is read as http://IP:PORT, so its address stays readable
    in log lines (it was scrubbed to `http://…` everywhere) while a path token is not."""
    path = tmp_path / "c.toml"
    path.write_text(
        '[[selfcheck.routes]]\nfrom = "a@example.com"\nto = "b@example.com"\n'
        'smtp = { host = "smtp" }\nimap = { host = "imap" }\n'
        f'[pushgateway]\nurl = "{url}"\n')
    values = load_config(path, {}).config.secret_values()
    assert not any(v in "http://127.0.0.1:9091 http://localhost:9091" for v in values), values
    assert ("tok-123456" in values) == ("tok" in url)


def test_credentials_in_the_url_are_refused(tmp_path: Path) -> None:
    """`http://user:pass@host` would be resolved as a host name by urllib: refused at load."""
    path = tmp_path / "c.toml"
    path.write_text(
        '[[selfcheck.routes]]\nfrom = "a@example.com"\nto = "b@example.com"\n'
        'smtp = { host = "smtp" }\nimap = { host = "imap" }\n'
        '[pushgateway]\nurl = "http://user:hunter2pass@127.0.0.1:9/"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path, {})
    assert caught.value.problems == [
        "pushgateway.url: must not carry credentials; set username and password_file"]
    assert "hunter2pass" not in repr(caught.value.problems)


def test_plain_words_in_the_pushgateway_path_are_not_secrets(tmp_path: Path) -> None:
    """A proxy path like /pushgateway is not scrubbed (it would garble event names)."""
    path = tmp_path / "c.toml"
    path.write_text(
        '[[selfcheck.routes]]\nfrom = "a@example.com"\nto = "b@example.com"\n'
        'smtp = { host = "smtp" }\nimap = { host = "imap" }\n'
        '[pushgateway]\nurl = "http://pushgateway.invalid:9091/pushgateway"\n')
    values = load_config(path, {}).config.secret_values()
    assert not any("pushgateway_push_failed".find(v) >= 0 for v in values)
