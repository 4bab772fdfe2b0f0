"""Configuration: TOML + env overrides, one-line errors naming key and rule, CLI exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from daemon.config import ConfigError, load_config

ROUTE = """
[[selfcheck.routes]]
from = "a@example.com"
to = "b@example.com"
smtp = { host = "smtp.example.com" }
imap = { host = "imap.example.com", username = "b", password = "pw" }
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "selfcheckd.toml"
    path.write_text(text, encoding="utf-8")
    return path


def problems(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text), env or {})
    return err.value.problems


@pytest.mark.parametrize(("text", "expected"), [
    (ROUTE.replace('host = "smtp.example.com"', 'host = "s", port = 70000'),
     "selfcheck.routes[0].smtp.port: must be 1-65535"),
    (ROUTE.replace('host = "smtp.example.com"', 'host = "s", security = "ssl"'),
     "selfcheck.routes[0].smtp.security: must be one of none, starttls or tls"),
    (ROUTE + "\n[selfcheck]\ninterval = 0\n", "selfcheck.interval: must be greater than 0"),
    (ROUTE.replace('to = "b@example.com"', 'to = "nobody"'),
     "selfcheck.routes[0].to: must be an email address like name@example.com"),
    (ROUTE.replace('password = "pw"', 'password = "pw", password_file = "/x"'),
     "selfcheck.routes[0].imap.password_file: give only one of password, password_file"),
    (ROUTE.replace('password = "pw"', 'password_file = "/nonexistent/pw"'),
     "selfcheck.routes[0].imap.password_file: cannot read /nonexistent/pw: "
     "No such file or directory"),
    (ROUTE + '\n[server]\nlisten = "nowhere"\n',
     "server.listen: must be HOST:PORT with PORT 0-65535"),
    (ROUTE + '\n[server]\nlisten = "0.0.0.0:9787"\ncolour = "blue"\n',
     "server.colour: unknown key"),
    (ROUTE.replace('from = "a@example.com"\n', ""), "selfcheck.routes[0].from: required"),
    (ROUTE + ROUTE, "selfcheck.routes: route names must be unique (repeated: default)"),
    (ROUTE + '\n[[heartbeat]]\nurl = "ftp://x"\n',
     "heartbeat[0].url: must start with http:// or https://"),
])
def test_invalid_config_names_key_and_rule(tmp_path: Path, text: str, expected: str) -> None:
    """Each invalid setting yields exactly one line `key.path: rule`."""
    assert problems(tmp_path, text) == [expected]


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    """Several independent mistakes are all listed, not just the first."""
    text = ROUTE.replace('host = "smtp.example.com"', 'host = "s", port = 0')
    text += "\n[logging]\nlevel = 'loud'\n"
    assert problems(tmp_path, text) == [
        "selfcheck.routes[0].smtp.port: must be 1-65535",
        "logging.level: must be one of debug, info, warning or error",
    ]


def test_seed_environment_alone_is_a_config() -> None:
    """The seed's MESSAGES_SELFCHECK_* plus SELFCHECK_SMTP/IMAP_* make a single route."""
    env = {
        "MESSAGES_SELFCHECK_FROM": "selfcheck@example.local",
        "MESSAGES_SELFCHECK_TO": "receiver@example.local",
        "MESSAGES_SELFCHECK_SECRET": "s3cret",
        "MESSAGES_SELFCHECK_WEBHOOK_URL": "https://pulse.updown.io/tok/key",
        "SELFCHECK_SMTP_HOST": "smtp-out", "SELFCHECK_SMTP_SECURITY": "tls",
        "SELFCHECK_IMAP_HOST": "imap.cabal.internal", "SELFCHECK_IMAP_USERNAME": "r",
        "SELFCHECK_IMAP_PASSWORD": "pw", "SELFCHECK_IMAP_MAILBOX": "Selfcheck",
    }
    cfg = load_config(None, env).config
    route = cfg.selfcheck.routes[0]
    assert (cfg.selfcheck.interval, cfg.selfcheck.timeout) == (600, 60)
    assert (route.from_, route.to, route.smtp.port, route.imap.port) == (
        "selfcheck@example.local", "receiver@example.local", 465, 143)
    assert route.imap.mailbox == "Selfcheck"
    assert cfg.heartbeat[0].url is not None
    assert cfg.heartbeat[0].url.get_secret_value() == "https://pulse.updown.io/tok/key"
    assert "s3cret" not in repr(cfg) and "tok/key" not in repr(cfg)


def test_env_overrides_file_and_names_the_variable(tmp_path: Path) -> None:
    """An env value replaces the file's; a bad one is blamed on the variable."""
    cfg = load_config(write(tmp_path, ROUTE), {"MESSAGES_SELFCHECK_INTERVAL": "30"}).config
    assert cfg.selfcheck.interval == 30
    assert problems(tmp_path, ROUTE, {"SELFCHECK_SMTP_PORT": "abc"}) == [
        "selfcheck.routes[0].smtp.port (from SELFCHECK_SMTP_PORT): must be an integer"
    ]


def test_secret_from_file_and_env(tmp_path: Path) -> None:
    """`*_file` drops the trailing newline; `*_env` reads the named variable."""
    (tmp_path / "pw").write_text("from-file\n")
    text = ROUTE.replace('password = "pw"', f'password_file = "{tmp_path / "pw"}"')
    text += '\n[selfcheck]\nsecret_env = "MY_SECRET"\n'
    cfg = load_config(write(tmp_path, text), {"MY_SECRET": "x"}).config
    imap_password = cfg.selfcheck.routes[0].imap.password
    assert imap_password is not None and imap_password.get_secret_value() == "from-file"
    assert problems(tmp_path, text) == [
        "selfcheck.secret_env: environment variable MY_SECRET is not set"
    ]


def test_example_config_is_valid(tmp_path: Path) -> None:
    """config.example.toml validates once its secret files and variables exist."""
    text = Path("config.example.toml").read_text()
    for name in ("selfcheck_secret", "smtp", "imap"):
        (tmp_path / name).write_text("x\n")
        text = text.replace(f"/run/secrets/{name}", str(tmp_path / name))
    env = {"MESSAGES_SELFCHECK_WEBHOOK_URL": "https://pulse.updown.io/a/b",
           "ALERT_SINK_SECRET": "y"}
    cfg = load_config(write(tmp_path, text), env).config
    assert cfg.leakwatch is not None and cfg.selfcheck.routes[0].name == "default"


@pytest.mark.parametrize("cmd", ["config-check", "check", "run"])
def test_cli_bad_config_exits_2_without_traceback(tmp_path: Path, cmd: str) -> None:
    """A broken config prints one line per problem and exits 2, no traceback."""
    path = write(tmp_path, ROUTE.replace('host = "smtp.example.com"', 'host = "s", port = 0'))
    proc = subprocess.run(
        [sys.executable, "-m", "daemon.cli", cmd, "--config", str(path)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr == "selfcheckd: config: selfcheck.routes[0].smtp.port: must be 1-65535\n"
