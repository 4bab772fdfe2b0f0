"""Log lines: kv with or without a leading timestamp and level; the seed's part stays exact."""

from __future__ import annotations

import asyncio
import io
import logging
import re
from pathlib import Path

import pytest

from daemon.checks.result import CheckResult
from daemon.checks.runner import log_result
from daemon.cli import main
from daemon.config import load_config
from daemon.logs import configure_logging
from tests.conftest import StackFactory
from tests.test_cli import routes_config

SEED = "selfcheck_completed success=true send_time=0.150 reception_time=2.340"
STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z"


def logged(timestamps: bool) -> list[str]:
    out = io.StringIO()
    configure_logging("kv", "info", stream=out, timestamps=timestamps)
    log_result(CheckResult(route="default", run_id="r1", success=True,
                           send_time=0.150_4, reception_time=2.340_4))
    logging.getLogger("aiohttp.client").warning("a library says %s", "hello")
    return out.getvalue().splitlines()


@pytest.mark.usefixtures("restore_logging")
def test_timestamps_put_time_and_level_before_the_exact_seed_line() -> None:
    """`[logging] timestamps = true`: UTC time and level first, then the seed's line byte
    for byte; library (stdlib) lines get the same prefix."""
    completed, result, library = logged(timestamps=True)
    assert re.fullmatch(f"{STAMP} info {SEED} route=default", completed), completed
    assert re.fullmatch(f"{STAMP} info selfcheck_result route=default .*", result), result
    assert re.fullmatch(f"{STAMP} warning a library says hello", library), library


@pytest.mark.usefixtures("restore_logging")
def test_lines_start_with_the_event_by_default() -> None:
    """Off by default (journald and awslogs stamp lines): the line is the seed's, as before."""
    completed, _result, library = logged(timestamps=False)
    assert completed == f"{SEED} route=default"
    assert library == "a library says hello"


def test_the_setting_loads_from_the_file_and_the_environment(tmp_path: Path) -> None:
    """`[logging] timestamps` defaults to false; SELFCHECKD_LOG_TIMESTAMPS overrides it."""
    path = tmp_path / "c.toml"
    route = ('[[selfcheck.routes]]\nfrom = "x@example.com"\nto = "y@example.com"\n'
             'smtp = { host = "smtp" }\nimap = { host = "imap" }\n')
    path.write_text(route + "[logging]\nformat = \"kv\"\n")
    assert load_config(path, {}).config.logging.timestamps is False
    path.write_text(route + "[logging]\ntimestamps = true\n")
    assert load_config(path, {}).config.logging.timestamps is True
    env = {"SELFCHECKD_LOG_TIMESTAMPS": "false"}
    assert load_config(path, env).config.logging.timestamps is False


@pytest.mark.usefixtures("restore_logging")
async def test_check_stamps_its_lines_when_the_config_says_so(
    make_stack: StackFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """The command line honours the setting: `check`'s log lines on stderr carry it."""
    stack = await make_stack()
    cfg = routes_config(tmp_path / "c.toml", ("default", stack))
    cfg.write_text(cfg.read_text() + "[logging]\ntimestamps = true\n")
    assert await asyncio.to_thread(main, ["check", "--config", str(cfg), "--json"]) == 0
    [line] = [x for x in capsys.readouterr().err.splitlines() if "selfcheck_completed" in x]
    assert re.fullmatch(
        f"{STAMP} info selfcheck_completed success=true send_time=\\d+\\.\\d{{3}} "
        "reception_time=\\d+\\.\\d{3} route=default", line), line
