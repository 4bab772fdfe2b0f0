"""Debian's real Prometheus scraping /probe the way the shipped scrape job does."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from daemon.app import Daemon
from daemon.config import Config, LoadedConfig
from daemon.embedded.stack import EmbeddedMailStack
from tests.deploy.test_prometheus_rules import PROM_DIR, probe_job_text
from tests.waiting import until

from .support import find_binary, free_port, require_binaries

TOKEN = "integration-probe-token-0815"


def start_prometheus(binary: str, config: Path, tmp_path: Path,
                     port: int) -> subprocess.Popen[bytes]:
    with (tmp_path / "prometheus.log").open("wb") as log:
        return subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=log)


@contextlib.asynccontextmanager
async def prometheus(tmp_path: Path, scrape_configs: list[dict[str, Any]]) -> AsyncIterator[str]:
    """A Prometheus scraping every second; yields its base URL."""
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
        "scrape_configs": scrape_configs}))
    port = free_port()
    binary = find_binary("prometheus")
    assert binary is not None
    proc = start_prometheus(binary, config, tmp_path, port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def query(base: str, promql: str) -> dict[tuple[tuple[str, str], ...], float]:
    """An instant query's samples, keyed by their sorted labels (empty while not ready)."""
    try:
        async with aiohttp.ClientSession() as http, http.get(
            f"{base}/api/v1/query", params={"query": promql},
            timeout=aiohttp.ClientTimeout(total=5),
        ) as resp:
            body = await resp.json()
    except (aiohttp.ClientError, TimeoutError):
        return {}
    return {tuple(sorted(r["metric"].items())): float(r["value"][1])
            for r in body.get("data", {}).get("result", [])}


async def test_prometheus_scrapes_probe_with_the_token_and_is_refused_without(
    mail_stack: EmbeddedMailStack, tmp_path: Path,
) -> None:
    """The shipped /probe job (its relabelling, its bearer token) gives probe_success 1 in a
    real Prometheus; the same job without the token is a failed scrape and sends no mail."""
    require_binaries("prometheus")
    daemon = Daemon(LoadedConfig(Config.model_validate({
        "selfcheck": {"interval": 600, "timeout": 5, "secret": "x",
                      "routes": [mail_stack.route_table()]},
        "server": {"listen": "127.0.0.1:0", "probe": True, "probe_token": TOKEN},
    }), None))
    await daemon.start()
    try:
        await until(lambda: "default" in daemon.results)
        token_file = tmp_path / "token"
        token_file.write_text(TOKEN + "\n")
        text = (PROM_DIR / "scrape-config.yml").read_text(encoding="utf-8")
        (job,) = yaml.safe_load(probe_job_text(text))
        job.update(scrape_interval="1s", scrape_timeout="1s")
        job["authorization"]["credentials_file"] = str(token_file)
        job["relabel_configs"][-1]["replacement"] = f"127.0.0.1:{daemon.listen_port}"
        anonymous = {k: v for k, v in job.items() if k != "authorization"}
        anonymous["job_name"] = "selfcheckd-probe-anonymous"
        async with prometheus(tmp_path, [job, anonymous]) as base:
            async def scraped() -> bool:
                found = await query(base, 'probe_success{job="selfcheckd-probe",route="default"}')
                return list(found.values()) == [1.0]

            await until(scraped, timeout=60)
            steps = await query(base, 'probe_selfcheck_step_success{step="verify"}')
            assert list(steps.values()) == [1.0]
            await until(lambda: daemon.metrics.registry.get_sample_value(
                "selfcheckd_probe_requests_total", {"outcome": "unauthorized"}), timeout=30)
            up = await query(base, 'up{job="selfcheckd-probe-anonymous"}')
            assert list(up.values()) == [0.0]
            assert await query(base, 'probe_success{job="selfcheckd-probe-anonymous"}') == {}
            await asyncio.sleep(3)  # a few more scrapes a second apart: answered from cache
            cached = await query(base, "probe_selfcheck_cached")
            assert list(cached.values()) == [1.0]
        # The start-up run served the first scrapes; scraped every second, no new run
        # before probe_min_interval (60 s), and none for the anonymous job.
        assert mail_stack.smtp.delivered == 1
    finally:
        await daemon.shutdown()
