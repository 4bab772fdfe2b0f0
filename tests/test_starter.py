"""`selfcheckd init`: a starter config that loads once its marked placeholders are filled in."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from daemon.cli import main
from daemon.config import ConfigError, load_config
from daemon.invocation import invoked_as
from tests.test_config import assert_placeholders_all_replaced, fill_placeholders

# A commented-out config line of the starter (`# [leakwatch]`, `# key = value`), not prose.
COMMENTED_OUT = re.compile(r"^# (\[.*\]|[a-z_]+ = .*)$", re.MULTILINE)


def init(path: Path, *flags: str) -> int:
    return main(["init", "--output", str(path), *flags])


def test_init_writes_valid_toml_and_says_what_next(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """The file is TOML as written; one line says to replace the marks and how to check."""
    path = tmp_path / "selfcheckd.toml"
    assert init(path) == 0
    tomllib.loads(path.read_text(encoding="utf-8"))
    out, err = capsys.readouterr()
    assert (out, err) == (
        f"wrote {path}: replace every value marked REPLACE, then check it with "
        f"`{invoked_as()} config-check --config {path} --connect`\n", "")


def test_starter_loads_once_its_placeholders_are_filled_in(tmp_path: Path) -> None:
    """Filled in, the starter is a one-route config with nothing of the placeholders left."""
    path = tmp_path / "selfcheckd.toml"
    assert init(path) == 0
    with pytest.raises(ConfigError):  # as written: its password files do not exist
        load_config(path, {})
    text, environ = fill_placeholders(path.read_text(encoding="utf-8"), tmp_path)
    path.write_text(text, encoding="utf-8")
    config = load_config(path, environ).config
    assert [r.name for r in config.selfcheck.routes] == ["default"]
    assert (config.heartbeat, config.leakwatch) == ([], None)
    assert_placeholders_all_replaced(config)


def test_config_check_warns_about_example_domains_left_in_place(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """Only the secret files filled in, the starter validates, but config-check says which
    hosts and addresses are still example.com placeholders; filled in, it says nothing."""
    path = tmp_path / "selfcheckd.toml"
    assert init(path) == 0
    text = path.read_text(encoding="utf-8")
    for name in re.findall(r'_file = "(/etc/selfcheckd/[^"]+)"', text):
        (tmp_path / Path(name).name).write_text("x\n")
        text = text.replace(name, str(tmp_path / Path(name).name))
    path.write_text(text, encoding="utf-8")
    capsys.readouterr()
    assert main(["config-check", "--config", str(path)]) == 0
    warned = [line.split(" = ")[0] for line in capsys.readouterr().out.splitlines()
              if line.startswith("warning: ")]
    assert warned == [f"warning: selfcheck.routes[0].{k}"
                      for k in ("from", "to", "smtp.host", "imap.host")]
    filled, _ = fill_placeholders(text, tmp_path)
    path.write_text(filled, encoding="utf-8")
    assert main(["config-check", "--config", str(path)]) == 0
    assert "warning" not in capsys.readouterr().out


def test_starter_optional_sections_load_once_uncommented(tmp_path: Path) -> None:
    """Uncommenting the heartbeat and leak watcher sections and filling them in also loads."""
    path = tmp_path / "selfcheckd.toml"
    assert init(path) == 0
    text = COMMENTED_OUT.sub(r"\1", path.read_text(encoding="utf-8"))
    text, environ = fill_placeholders(text, tmp_path)
    path.write_text(text, encoding="utf-8")
    config = load_config(path, environ).config
    assert [h.kind for h in config.heartbeat] == ["updown"]
    assert config.leakwatch is not None and config.leakwatch.source == "file"
    assert config.leakwatch.alert is not None
    assert config.logging.timestamps is True
    assert_placeholders_all_replaced(config)


def test_starter_says_when_to_turn_on_timestamps(tmp_path: Path) -> None:
    """The starter leaves log timestamps to journald/awslogs and says when to turn them on."""
    path = tmp_path / "selfcheckd.toml"
    assert init(path) == 0
    text = path.read_text(encoding="utf-8")
    assert "# timestamps = true" in text
    assert "plain file or a terminal" in text and "journald" in text


def test_init_refuses_to_overwrite_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """An existing file is kept (exit 2, one line); --force replaces it."""
    path = tmp_path / "selfcheckd.toml"
    path.write_text("mine\n", encoding="utf-8")
    assert init(path) == 2
    assert path.read_text(encoding="utf-8") == "mine\n"
    assert capsys.readouterr().err == (
        f"selfcheckd init: {path} already exists (use --force to overwrite it)\n")
    assert init(path, "--force") == 0
    assert "[[selfcheck.routes]]" in path.read_text(encoding="utf-8")


def test_init_into_a_missing_directory_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """A path that cannot be written is exit 2 with one line naming it, no traceback."""
    path = tmp_path / "no-such-dir" / "selfcheckd.toml"
    assert init(path) == 2
    assert capsys.readouterr().err == (
        f"selfcheckd init: cannot write {path}: No such file or directory\n")
