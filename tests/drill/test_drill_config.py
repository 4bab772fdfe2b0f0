"""The [drill] section: its rules, the ones it shares with other sections, config-check."""

from __future__ import annotations

from typing import Any

import pytest

from daemon.cli import drill_warnings
from daemon.config import Config, ConfigError, load_config

ROUTE = {"name": "default", "from": "probe@example.net", "to": "probe@example.net",
         "smtp": {"host": "smtp.example.net"}, "imap": {"host": "imap.example.net"}}


def problems(tmp_path: Any, toml: str) -> list[str]:
    path = tmp_path / "c.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    return err.value.problems


BASE = """
[[selfcheck.routes]]
name = "default"
from = "probe@example.net"
to = "probe@example.net"
smtp = { host = "smtp.example.net" }
imap = { host = "imap.example.net" }
"""


def test_drill_route_must_exist(tmp_path: Any) -> None:
    """[drill] route names a route whose SMTP settings it uses; an unknown one is an error."""
    found = problems(tmp_path, BASE + """
[drill]
driver = "ecs"
environment = "stage"
route = "other"
sender = "qp-test-drill@example.net"
""")
    assert found == ["drill.route: no such route: other (routes: default); the drill sends "
                     "its message with that route's SMTP settings"]


def test_drill_sender_must_be_allowed_by_the_leak_watcher(tmp_path: Any) -> None:
    """A drill sender the leak watcher does not allow would raise a leak alert: refused."""
    found = problems(tmp_path, BASE + """
[leakwatch]
source = "file"
allowed_senders = ["qp-test-*@*"]

[drill]
driver = "ecs"
environment = "stage"
sender = "drill@example.net"
""")
    assert len(found) == 1 and found[0].startswith("drill.sender: drill@example.net is not in "
                                                   "leakwatch.allowed_senders (qp-test-*@*)")


def test_local_driver_needs_its_commands(tmp_path: Any) -> None:
    """driver = "local" without [drill.local] names the missing table."""
    found = problems(tmp_path, BASE + """
[drill]
driver = "local"
environment = "stage"
sender = "qp-test-drill@example.net"
""")
    assert found == ['drill.local: required when driver = "local" (start, mailq and '
                     "run_queue commands)"]


@pytest.mark.parametrize(("value", "problem"), [
    ("fortnightly", "must be weekly, daily, hourly or a duration like 7d, 12h, 90m"),
    ("5m", "must be at least 10m (a drill stops a task and flips the sinkhole)"),
])
def test_bad_schedules_are_named(tmp_path: Any, value: str, problem: str) -> None:
    """A schedule that is no interval, or too short, is refused with the rule."""
    found = problems(tmp_path, BASE + f"""
[drill]
driver = "ecs"
environment = "stage"
sender = "qp-test-drill@example.net"
schedule = "{value}"
""")
    assert found == [f"drill.schedule: {problem}"]


def test_parameter_and_mode_file_are_exclusive(tmp_path: Any) -> None:
    """The sinkhole's mode is an SSM parameter or a file, not both."""
    found = problems(tmp_path, BASE + """
[drill]
driver = "ecs"
environment = "stage"
sender = "qp-test-drill@example.net"
sinkhole = { parameter = "/x", mode_file = "/tmp/m" }
""")
    assert found == ["drill.sinkhole.mode_file: give only one of parameter, mode_file"]


def test_config_check_warns_about_prod_and_an_unlisted_sender() -> None:
    """config-check says that prod will be refused and that the sender would be a leak for
    a leak watcher with the default allowlist."""
    cfg = Config.model_validate({"selfcheck": {"routes": [ROUTE]}, "drill": {
        "driver": "ecs", "environment": "prod", "sender": "drill@example.net"}})
    warnings = drill_warnings(cfg)
    assert any("refuses to run there" in w for w in warnings)
    assert any("does not match the leak watcher's default allowed_senders" in w
               for w in warnings)
    assert cfg.drill is not None and cfg.drill.sinkhole.parameter == "/cabal/sinkhole_mode"


def test_drill_command_without_a_drill_section_exits_2(
        tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """`selfcheckd drill` on a config without [drill] says so and exits 2."""
    from daemon.cli import main

    path = tmp_path / "c.toml"
    path.write_text(BASE)
    assert main(["drill", "queue-persistence", "--config", str(path)]) == 2
    assert "drill: no [drill] section" in capsys.readouterr().err


def test_drill_command_refuses_prod_with_exit_2_and_the_journal(
        tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """`selfcheckd drill --json` in prod: exit 2, the journal says refused, nothing ran."""
    import json

    from daemon.cli import main

    path = tmp_path / "c.toml"
    path.write_text(BASE + f"""
[drill]
driver = "ecs"
environment = "prod"
sender = "qp-test-drill@example.net"
lock_file = "{tmp_path / 'lock'}"
""")
    assert main(["drill", "queue-persistence", "--config", str(path), "--json"]) == 2
    out = capsys.readouterr()
    journal = json.loads(out.out)
    assert journal["result"] == "refused" and journal["steps"] == []
    assert "never runs in production" in out.err


def test_drill_command_refuses_a_journal_path_it_cannot_write_before_anything(
        tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """`--journal` in a directory that does not exist: exit 2 before the drill touches
    anything (no task started, the mode untouched), never a drill whose evidence is lost
    after it stopped a task and flipped the sinkhole."""
    from daemon.cli import main

    mode_file = tmp_path / "mode"
    mode_file.write_text("defer\n")
    started = tmp_path / "started"
    path = tmp_path / "c.toml"
    path.write_text(BASE.replace('smtp = { host = "smtp.example.net" }',
                                 'smtp = { host = "127.0.0.1", port = 9, security = "none" }')
                    + f"""
[drill]
driver = "local"
environment = "stage"
sender = "qp-test-drill@example.net"
mode_cache = 0
settle_timeout = 5
lock_file = "{tmp_path / 'lock'}"
  [drill.sinkhole]
  mode_file = "{mode_file}"
  [drill.local]
  replicas = 1
  work_dir = "{tmp_path / 'work'}"
  start = ["sh", "-c", "touch {started}; exec sleep 30"]
  mailq = ["sh", "-c", "echo '/q is empty'"]
  run_queue = ["true"]
""")
    journal = tmp_path / "no-such-dir" / "drill.json"
    code = main(["drill", "queue-persistence", "--config", str(path), "--journal", str(journal)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"cannot write the journal to {journal}" in err and "nothing was done" in err
    assert not started.exists() and mode_file.read_text() == "defer\n"
