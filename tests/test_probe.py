"""GET /probe: Prometheus metrics for a scrape, a bearer token, one run per route per spacing."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from daemon.app import Daemon
from daemon.config import Config, ConfigError, LoadedConfig, load_config
from daemon.embedded.stack import EmbeddedMailStack
from daemon.probe_metrics import wants_metrics
from tests.fake_time import FakeClock
from tests.test_daemon import samples
from tests.waiting import until

# What Prometheus 2.42 (Debian's) sends with a scrape.
PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
                     "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
TOKEN = "s3cret-probe-token-4711"


def config(stack: EmbeddedMailStack, **server: Any) -> LoadedConfig:
    return LoadedConfig(Config.model_validate({
        "selfcheck": {"interval": 600, "timeout": 5, "secret": "x",
                      "routes": [stack.route_table()]},
        "server": {"listen": "127.0.0.1:0", "probe": True, **server},
    }), None)


async def fetch(port: int, path: str, **headers: str) -> tuple[int, str, dict[str, str]]:
    async with aiohttp.ClientSession() as http, http.get(
        f"http://127.0.0.1:{port}{path}", headers=headers,
        timeout=aiohttp.ClientTimeout(total=10),
    ) as resp:
        return resp.status, await resp.text(), dict(resp.headers)


def promtool_check_metrics(text: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", "check", "metrics"], input=text, text=True,
                          capture_output=True, timeout=30, check=False)


def test_a_scrape_asks_for_metrics_and_everyone_else_gets_json() -> None:
    """Accept negotiation: Prometheus' header and text/plain mean metrics; */*, none, JSON."""
    assert wants_metrics(PROMETHEUS_ACCEPT)
    assert wants_metrics("text/plain;version=0.0.4")
    assert wants_metrics("application/openmetrics-text; version=1.0.0")
    for accept in ("", "*/*", "application/json", "application/json, text/plain;q=0.5",
                   "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
                   "garbage;;;q=x"):
        assert not wants_metrics(accept), accept


async def test_a_scrape_gets_metrics_that_promtool_accepts(
    mail_stack: EmbeddedMailStack,
) -> None:
    """With a scrape's Accept, /probe answers probe_success, durations and the reason as
    metrics `promtool check metrics` accepts; the text format too."""
    daemon = Daemon(config(mail_stack, probe_min_interval=0))
    await daemon.start()
    try:
        await until(lambda: "default" in daemon.results and not daemon.scheduler.running)
        code, body, headers = await fetch(daemon.listen_port, "/probe?route=default",
                                          Accept=PROMETHEUS_ACCEPT)
        assert code == 200, body
        assert headers["Content-Type"].startswith("application/openmetrics-text")
        assert body.endswith("# EOF\n")
        m = samples(body)
        assert m[("probe_success", ())] == 1
        assert m[("probe_duration_seconds", ())] > 0
        assert m[("probe_selfcheck_cached", ())] == 0
        steps = {dict(labels)["step"] for name, labels in m
                 if name == "probe_selfcheck_step_duration_seconds"}
        assert {"smtp_send", "receive", "verify", "cleanup"} <= steps
        assert m[("probe_selfcheck_failure_reason", (("reason", "receive_timeout"),))] == 0
        code, text, headers = await fetch(daemon.listen_port, "/probe?route=default",
                                          Accept="text/plain;version=0.0.4")
        assert code == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
        check = promtool_check_metrics(text)
        assert check.returncode == 0, check.stdout + check.stderr
        assert (check.stdout + check.stderr).strip() == ""  # not even a lint warning
        # A failing route says why, by reason label.
        mail_stack.smtp.drop = True
        code, text, _ = await fetch(daemon.listen_port, "/probe?route=default",
                                    Accept="text/plain;version=0.0.4")
        m = samples(text)
        assert m[("probe_success", ())] == 0
        failed = [dict(labels)["reason"] for (name, labels), value in m.items()
                  if name == "probe_selfcheck_failure_reason" and value == 1]
        assert len(failed) == 1 and failed[0] != "internal"
        assert promtool_check_metrics(text).returncode == 0
    finally:
        await daemon.shutdown()


async def test_probe_wants_the_bearer_token_and_never_shows_it(
    mail_stack: EmbeddedMailStack,
) -> None:
    """With a token set, /probe without it or with a wrong one is 401 and sends no mail;
    the right one runs; the token is in no log line, no /status, no metric."""
    daemon = Daemon(config(mail_stack, probe_token=TOKEN, probe_min_interval=0))
    await daemon.start()
    try:
        await until(lambda: "default" in daemon.results and not daemon.scheduler.running)
        sent = mail_stack.smtp.delivered
        with capture_logs() as logs:
            for auth in ({}, {"Authorization": "Bearer wrong"},
                         {"Authorization": f"Basic {TOKEN}"},
                         {"Authorization": f"Bearer {TOKEN}x"}):
                code, body, headers = await fetch(daemon.listen_port, "/probe?route=default",
                                                  **auth)
                assert code == 401, auth
                assert headers["WWW-Authenticate"].startswith("Bearer")
                assert "routes" not in json.loads(body)  # says nothing about the routes
            code, _, _ = await fetch(daemon.listen_port, "/probe?route=default",
                                     Accept=PROMETHEUS_ACCEPT)
            assert code == 401
            assert mail_stack.smtp.delivered == sent
            code, body, _ = await fetch(daemon.listen_port, "/probe?route=default",
                                        Authorization=f"Bearer {TOKEN}")
            assert code == 200 and json.loads(body)["success"] is True
            assert mail_stack.smtp.delivered == sent + 1
            status = (await fetch(daemon.listen_port, "/status"))[1]
            metrics = (await fetch(daemon.listen_port, "/metrics"))[1]
        assert TOKEN not in repr(logs) and TOKEN not in status and TOKEN not in metrics
        assert daemon.metrics.registry.get_sample_value(
            "selfcheckd_probe_requests_total", {"outcome": "unauthorized"}) == 5
    finally:
        await daemon.shutdown()


def probe_toml(tmp_path: Path, listen: str, token: str = "") -> Path:
    path = tmp_path / "c.toml"
    path.write_text(f'[server]\nlisten = "{listen}"\nprobe = true\n{token}\n'
                    '[leakwatch]\nsource = "file"\nfile = { path = "/var/log/maillog" }\n')
    return path


@pytest.mark.parametrize("listen", ["0.0.0.0:9787", "[::]:9787", "10.0.0.5:9787",
                                    "mail.example.net:9787"])
def test_config_check_refuses_an_open_probe_without_a_token(tmp_path: Path, listen: str) -> None:
    """probe = true off loopback without a token: one line naming server.probe_token."""
    with pytest.raises(ConfigError) as err:
        load_config(probe_toml(tmp_path, listen), {})
    assert len(err.value.problems) == 1
    assert err.value.problems[0].startswith("server.probe_token: required when probe = true")


def test_on_loopback_the_token_is_optional_and_off_it_a_token_will_do(tmp_path: Path) -> None:
    """Loopback needs no token (one is kept if set); any address with a token loads."""
    for listen in ("127.0.0.1:9787", "localhost:9787", "[::1]:9787"):
        assert load_config(probe_toml(tmp_path, listen), {}).config.server.probe_token is None
    env = {"PROBE_TOKEN": TOKEN}
    for listen in ("127.0.0.1:9787", "0.0.0.0:9787"):
        loaded = load_config(probe_toml(tmp_path, listen, 'probe_token_env = "PROBE_TOKEN"'),
                             env).config
        assert loaded.server.probe_token is not None
        assert loaded.server.probe_token.get_secret_value() == TOKEN
        assert TOKEN in loaded.secret_values()  # scrubbed from every log line


def test_the_listen_override_is_checked_too(tmp_path: Path) -> None:
    """SELFCHECKD_LISTEN moving a token-less probe off loopback is refused as well."""
    path = tmp_path / "c.toml"
    path.write_text('[server]\nlisten = "127.0.0.1:9787"\nprobe = true\n'
                    '[leakwatch]\nsource = "file"\nfile = { path = "/var/log/maillog" }\n')
    with pytest.raises(ConfigError, match=r"server\.probe_token: required"):
        load_config(path, {"SELFCHECKD_LISTEN": "0.0.0.0:9787"})


async def test_eight_clients_hammering_probe_start_one_run_per_spacing(
    mail_stack: EmbeddedMailStack,
) -> None:
    """8 clients asking again and again: in-flight runs are joined, the rest get the latest
    result marked cached; a new run starts only after probe_min_interval."""
    clock = FakeClock()
    daemon = Daemon(config(mail_stack, probe_min_interval=60), clock=clock, sleep=clock.sleep)
    await daemon.start()
    try:
        await until(lambda: "default" in daemon.results and not daemon.scheduler.running)
        assert mail_stack.smtp.delivered == 1  # the start-up run

        async def client() -> list[tuple[int, str]]:
            out = []
            for _ in range(10):
                code, body, _ = await fetch(daemon.listen_port, "/probe?route=default",
                                            Accept="text/plain")
                out.append((code, body))
            return out

        answers = [a for c in await asyncio.gather(*(client() for _ in range(8))) for a in c]
        assert {code for code, _ in answers} == {200}
        assert all(samples(body)[("probe_selfcheck_cached", ())] == 1 for _, body in answers)
        assert mail_stack.smtp.delivered == 1
        await clock.advance(61)
        answers = [a for c in await asyncio.gather(*(client() for _ in range(8))) for a in c]
        assert {code for code, _ in answers} == {200}
        assert mail_stack.smtp.delivered == 2  # one new run for 80 requests
        _, body, _ = await fetch(daemon.listen_port, "/probe?route=default")
        answer = json.loads(body)
        assert answer["cached"] is True and 0 < answer["next_run_in"] <= 60
        assert daemon.metrics.registry.get_sample_value(
            "selfcheckd_probe_requests_total", {"outcome": "ran"}) == 1
    finally:
        await daemon.shutdown()


async def test_a_probe_run_just_before_the_due_time_serves_it_and_keeps_the_cadence(
    mail_stack: EmbeddedMailStack,
) -> None:
    """A /probe run 20 s before the scheduled one is not doubled; the next one is on time."""
    clock = FakeClock()
    daemon = Daemon(config(mail_stack, probe_min_interval=60), clock=clock, sleep=clock.sleep)
    await daemon.start()
    try:
        await until(lambda: "default" in daemon.results and not daemon.scheduler.running)
        await clock.advance(580)
        code, _, _ = await fetch(daemon.listen_port, "/probe?route=default")
        assert code == 200 and mail_stack.smtp.delivered == 2
        await clock.advance(30)  # past the due time at 600
        await asyncio.sleep(0.2)
        assert not daemon.scheduler.running and mail_stack.smtp.delivered == 2
        assert daemon.metrics.registry.get_sample_value(
            "selfcheck_skipped_runs_total", {"route": "default"}) in (None, 0)
        await clock.advance(600)  # the due time at 1200 runs as planned
        await until(lambda: mail_stack.smtp.delivered == 3)
    finally:
        await daemon.shutdown()
