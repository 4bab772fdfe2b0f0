"""The command line: each subcommand explains itself, `check --route` picks routes."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from daemon.cli import build_parser, main
from daemon.embedded.stack import EmbeddedMailStack
from tests.conftest import StackFactory

COMMANDS = ["run", "check", "config-check", "scan", "init", "demo"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_help_says_what_it_does_its_exit_codes_and_an_example(
    command: str, capsys: pytest.CaptureFixture[str],
) -> None:
    """`selfcheckd COMMAND --help`: a description, the exit codes, an example."""
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args([command, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    usage, description = text.split("\n\n")[:2]
    assert usage.startswith(f"usage: selfcheckd {command}")
    assert len(description.split()) >= 10
    assert "exit codes: 0 " in text
    assert f"example:    selfcheckd {command}" in text


def routes_config(path: Path, *stacks: tuple[str, EmbeddedMailStack]) -> Path:
    text = '[selfcheck]\ntimeout = 5\nsecret = "x"\n'
    for name, stack in stacks:
        r, o = stack.route_table(name), stack.options
        text += (
            f'[[selfcheck.routes]]\nname = "{name}"\nfrom = "{r["from"]}"\nto = "{r["to"]}"\n'
            f'smtp = {{ host = "127.0.0.1", port = {stack.smtp.port}, security = "none" }}\n'
            f'imap = {{ host = "127.0.0.1", port = {stack.imap.port}, security = "none", '
            f'username = "{o.imap_user}", password = "{o.imap_password}" }}\n')
    path.write_text(text)
    return path


async def test_check_route_runs_only_the_named_routes(
    make_stack: StackFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """`check --route a` checks a only; repeating --route adds routes."""
    a, b = await make_stack(), await make_stack()
    cfg = routes_config(tmp_path / "c.toml", ("a", a), ("b", b))
    code = await asyncio.to_thread(main, ["check", "--config", str(cfg), "--json",
                                          "--route", "a"])
    assert code == 0
    assert [json.loads(x)["route"] for x in capsys.readouterr().out.splitlines()] == ["a"]
    assert (a.smtp.delivered, b.smtp.delivered) == (1, 0)
    code = await asyncio.to_thread(main, ["check", "--config", str(cfg), "--json",
                                          "--route", "b", "--route", "a"])
    assert code == 0
    assert sorted(json.loads(x)["route"] for x in capsys.readouterr().out.splitlines()) == [
        "a", "b"]


def test_check_route_unknown_is_a_usage_error_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """An unknown --route is exit 2 with one line naming it and the routes there are."""
    cfg = tmp_path / "c.toml"
    cfg.write_text('[[selfcheck.routes]]\nname = "a"\nfrom = "x@example.com"\n'
                   'to = "y@example.com"\nsmtp = { host = "smtp" }\nimap = { host = "imap" }\n')
    code = main(["check", "--config", str(cfg), "--route", "typo"])
    assert code == 2
    assert capsys.readouterr().err == (
        "selfcheckd check: --route: no such route: typo (routes: a)\n")
    assert main(["check", "--config", str(cfg), "--route", ""]) == 2
    assert capsys.readouterr().err == (
        "selfcheckd check: --route: no such route: '' (routes: a)\n")


def test_an_unknown_flag_shows_the_commands_own_usage(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`check --bogus` is exit 2 with check's usage line, not the top-level one."""
    with pytest.raises(SystemExit) as exited:
        main(["check", "--bogus"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: selfcheckd check ")
    assert err.endswith("selfcheckd check: error: unrecognized arguments: --bogus\n")
