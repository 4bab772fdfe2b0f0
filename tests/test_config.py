"""Configuration: TOML + env overrides, one-line errors naming key and rule, CLI exit codes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, SecretStr

from daemon.config import Config, ConfigError, load_config

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
    (ROUTE + "\n[selfcheck]\ninterval = inf\n",
     "selfcheck.interval: must be a finite number, not inf or nan"),
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


def test_rules_between_keys_come_in_the_same_pass(tmp_path: Path) -> None:
    """Rules spanning keys, files and sections are reported alongside every field error."""
    text = """
[selfcheck]
interval = 10
jitter = 10
secret_file = "/nonexistent/secret"
[[selfcheck.routes]]
from = "a@example.com"
to = "b@example.com"
smtp = { host = "s", port = 0, password = "pw" }
imap = { host = "i", mailbox = "", ca_file = "/nonexistent/ca.pem" }
[[selfcheck.routes]]
from = "a@example.com"
to = "b@example.com"
smtp = { host = "s" }
imap = { host = "i" }
[[heartbeat]]
timeout = 0
[[heartbeat]]
name = "b"
url = "https://pulse.example.net/tok"
routes = ["typo"]
[leakwatch]
blind_after = 0
state_file = "/a.json"
cloudwatch = { state_file = "/b.json" }
alert = { url = "https://alerts.example.net/", timeout = 0, backoff = 600 }
[pushgateway]
url = "http://pgw:9091"
job = ""
password = "pw"
"""
    assert problems(tmp_path, text) == [
        "selfcheck.jitter: must be less than interval",
        "selfcheck.secret_file: cannot read /nonexistent/secret: No such file or directory",
        "selfcheck.routes[0].smtp.port: must be 1-65535",
        "selfcheck.routes[0].smtp.username: required when a password is set",
        "selfcheck.routes[0].imap.ca_file: no such file: /nonexistent/ca.pem",
        "selfcheck.routes[0].imap.mailbox: must not be empty",
        "selfcheck.routes: route names must be unique (repeated: default)",
        "heartbeat[0].url: required (or url_file / url_env)",
        "heartbeat[0].timeout: must be greater than 0",
        "heartbeat[1].routes: no such route: typo (routes: default)",
        "leakwatch.blind_after: must be greater than 0",
        "leakwatch.cloudwatch.state_file: conflicts with leakwatch.state_file (give only one)",
        "leakwatch.alert.timeout: must be greater than 0",
        "leakwatch.alert.backoff: must not be greater than max_backoff",
        "pushgateway.job: must not be empty",
        "pushgateway.username: required when a password is set",
    ]


def test_no_route_is_reported_with_the_other_problems(tmp_path: Path) -> None:
    """A config without routes or [leakwatch] says so next to its other problems."""
    assert problems(tmp_path, "[logging]\nlevel = 'loud'\n") == [
        "logging.level: must be one of debug, info, warning or error",
        "selfcheck.routes: at least one route is required (or a [leakwatch] section, or "
        "[[dns]] entries); for a single route set MESSAGES_SELFCHECK_FROM/_TO and "
        "SELFCHECK_SMTP_HOST/SELFCHECK_IMAP_HOST",
    ]


def test_a_rule_between_two_keys_reads_their_defaults(tmp_path: Path) -> None:
    """jitter is held to the default interval, backoff to the default max_backoff."""
    text = ROUTE + "\n[selfcheck]\njitter = 600\n[leakwatch.alert]\n" \
        'url = "http://127.0.0.1/a"\nmax_backoff = 0.5\n'
    assert problems(tmp_path, text) == [
        "selfcheck.jitter: must be less than interval",
        "leakwatch.alert.backoff: must not be greater than max_backoff",
    ]


LEAKWATCH = '\n[leakwatch]\nalert = {{ url = "{alert}" }}\n' \
    'cloudwatch = {{ endpoint_url = "{cloudwatch}" }}\n' \
    'sinkhole_mode = {{ endpoint_url = "{ssm}" }}\n'
GOOD = {"alert": "https://alerts.example.net/a?x=1", "cloudwatch": "http://[::1]:4566",
        "ssm": "HTTPS://user:pw@ssm.example.net:443/"}


@pytest.mark.parametrize(("key", "url", "expected"), [
    ("alert", "http://alerts.example.net:70000/a", "port must be 1-65535 (got 70000)"),
    ("alert", "http://alerts.example.net:0/a", "port must be 1-65535 (got 0)"),
    ("alert", "http://alerts.example.net:http/a", "port must be 1-65535 (got http)"),
    ("alert", "alerts.example.net/a", "must start with http:// or https://"),
    ("alert", "ftp://alerts.example.net/a", "must start with http:// or https://"),
    ("alert", "http:/alerts.example.net/a", "must start with http:// or https://"),
    ("alert", "https:///a", "must name a host (http://HOST/...)"),
    ("alert", "https://alerts.example.net/a b", "must not contain spaces or line breaks"),
    ("cloudwatch", "http://localhost:99999", "port must be 1-65535 (got 99999)"),
    ("cloudwatch", "http://[::1", "is not a valid URL"),
    ("ssm", "https://:443", "must name a host (http://HOST/...)"),
])
def test_urls_need_scheme_host_and_port_in_range(
    tmp_path: Path, key: str, url: str, expected: str,
) -> None:
    """Every URL key is checked: http(s), a host, a port 1-65535, no whitespace."""
    text = ROUTE + LEAKWATCH.format(**{**GOOD, key: url})
    name = {"alert": "alert.url", "cloudwatch": "cloudwatch.endpoint_url",
            "ssm": "sinkhole_mode.endpoint_url"}[key]
    assert problems(tmp_path, text) == [f"leakwatch.{name}: {expected}"]


def test_good_urls_pass(tmp_path: Path) -> None:
    """IPv6 hosts, credentials, ports, queries and upper-case schemes are accepted."""
    leakwatch = load_config(write(tmp_path, ROUTE + LEAKWATCH.format(**GOOD)), {}).config.leakwatch
    assert leakwatch is not None and leakwatch.cloudwatch.endpoint_url == GOOD["cloudwatch"]


@pytest.mark.parametrize(("url", "expected"), [
    ("pgw.example.net:9091", None),  # push_to_gateway (and so Messages) reads it as http://
    ("https://pgw.example.net/", None),
    ("pgw.example.net:99999", "port must be 1-65535 (got 99999)"),
    ("ftp://pgw.example.net", "must start with http:// or https://"),
])
def test_pushgateway_url_may_omit_the_scheme(
    tmp_path: Path, url: str, expected: str | None,
) -> None:
    """pushgateway.url is checked like the others, a bare HOST:PORT meaning http."""
    text = ROUTE + f'\n[pushgateway]\nurl = "{url}"\n'
    if expected is None:
        pushgateway = load_config(write(tmp_path, text), {}).config.pushgateway
        assert pushgateway is not None and pushgateway.url == url
    else:
        assert problems(tmp_path, text) == [f"pushgateway.url: {expected}"]


TOKEN = "tok-3f9a1c77e2"


@pytest.mark.parametrize(("url", "expected"), [
    (f"https://pulse.example.net:123456/{TOKEN}", "port must be 1-65535"),
    (f"https://pulse.example.net:{TOKEN}/x", "port must be 1-65535"),
    (f"pulse.example.net/{TOKEN}", "must start with http:// or https://"),
    (f"https:///{TOKEN}", "must name a host (http://HOST/...)"),
])
def test_a_secret_url_is_checked_without_being_echoed(
    tmp_path: Path, url: str, expected: str,
) -> None:
    """A heartbeat URL carries a token: its problem names the rule, never the URL or port."""
    assert problems(tmp_path, ROUTE + f'\n[[heartbeat]]\nurl = "{url}"\n') == [
        f"heartbeat[0].url: {expected}"]
    assert problems(tmp_path, ROUTE, {"MESSAGES_SELFCHECK_WEBHOOK_URL": url}) == [
        f"heartbeat[0].url (from MESSAGES_SELFCHECK_WEBHOOK_URL): {expected}"]


# The example's placeholders: `key = "value"  # ... REPLACE: what goes there`.
PLACEHOLDER = re.compile(r'^(\s*)([a-z_]+) = "([^"]*)"(\s*#.*\bREPLACE:.*)$', re.MULTILINE)
WORKING_URL = "http://127.0.0.1:9/working"


def fill_placeholders(text: str, tmp_path: Path) -> tuple[str, dict[str, str]]:
    """Put a working value in place of every value marked REPLACE; return (text, environ).

    A secret file becomes a temp file, a variable named by *_env is set, a URL
    points at localhost, an address is selfcheck@localhost, a host localhost.
    """
    marked = [line for line in text.splitlines()
              if "REPLACE:" in line and not line.lstrip().startswith("#")]
    assert len(PLACEHOLDER.findall(text)) == len(marked), "a REPLACE mark in another form"
    environ: dict[str, str] = {}

    def working(match: re.Match[str]) -> str:
        indent, key, value, comment = match.groups()
        if key.endswith("_file"):
            path = tmp_path / f"placeholder-{match.start()}"
            path.write_text("working\n", encoding="utf-8")
            value = str(path)
        elif key.endswith("_env"):
            environ[value] = WORKING_URL
        elif key.endswith("url"):
            value = WORKING_URL
        else:
            value = "selfcheck@localhost" if "@" in value else "localhost"
        return f'{indent}{key} = "{value}"{comment}'

    return PLACEHOLDER.sub(working, text), environ


def strings(value: Any) -> list[str]:
    """Every string in a loaded config, secrets included."""
    if isinstance(value, BaseModel):
        return [s for name in type(value).model_fields for s in strings(getattr(value, name))]
    if isinstance(value, list | tuple):
        return [s for item in value for s in strings(item)]
    if isinstance(value, SecretStr):
        return [value.get_secret_value()]
    return [str(value)] if value is not None else []


def assert_placeholders_all_replaced(config: Config) -> None:
    """Nothing left of the example values: no example.* name, no /run/secrets file."""
    left = [s for s in strings(config) if "example." in s or "/run/secrets" in s]
    assert left == [], "placeholders without a REPLACE mark"


def test_example_config_marks_every_placeholder(tmp_path: Path) -> None:
    """With only its REPLACE-marked values filled in, config.example.toml loads."""
    # An unmarked secret file or variable fails the load; an unmarked example.* host,
    # address or URL is left in the loaded config and fails the last assert.
    text, environ = fill_placeholders(Path("config.example.toml").read_text(), tmp_path)
    config = load_config(write(tmp_path, text), environ).config
    assert config.leakwatch is not None and config.heartbeat and config.selfcheck.routes
    assert_placeholders_all_replaced(config)


def test_example_config_copied_as_is_lists_every_problem_in_one_pass(tmp_path: Path) -> None:
    """The example as copied reports all its problems at once; fixing those, it loads."""
    secrets = tmp_path / "secrets"  # absent, wherever the tests run
    text = Path("config.example.toml").read_text().replace("/run/secrets/", f"{secrets}/")
    assert problems(tmp_path, text) == [
        f"selfcheck.secret_file: cannot read {secrets}/selfcheck_secret: "
        "No such file or directory",
        f"selfcheck.routes[0].smtp.password_file: cannot read {secrets}/smtp: "
        "No such file or directory",
        f"selfcheck.routes[0].imap.password_file: cannot read {secrets}/imap: "
        "No such file or directory",
        "heartbeat[0].url_env: environment variable MESSAGES_SELFCHECK_WEBHOOK_URL is not set",
        "leakwatch.alert.secret_env: environment variable ALERT_SINK_SECRET is not set",
    ]
    environ: dict[str, str] = {}
    for problem in problems(tmp_path, text):  # each fixed the way it says
        if missing := re.search(r"cannot read (\S+): No such file", problem):
            Path(missing[1]).parent.mkdir(exist_ok=True)
            Path(missing[1]).write_text("x\n", encoding="utf-8")
        else:
            unset = re.search(r"environment variable (\w+) is not set", problem)
            assert unset is not None, problem
            environ[unset[1]] = WORKING_URL
    assert load_config(write(tmp_path, text), environ).config.leakwatch is not None


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
