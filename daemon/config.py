"""Load and validate selfcheckd's configuration: TOML file, then environment overrides.

The seed's `MESSAGES_SELFCHECK_*` variables and the single-route
`SELFCHECK_SMTP_*` / `SELFCHECK_IMAP_*` variables are applied on top of the
file, so the daemon can run from environment alone (as on ECS). Every problem
is reported as one line `key.path: rule`, all of them at once.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, model_validator

from daemon.config_base import (
    NonBlankStr,
    NonNegativeFloat,
    Port,
    PositiveFloat,
    SecretsModel,
    StrictModel,
    key_error,
    url_secret_pieces,
)
from daemon.logwatch.config import LeakWatchConfig


class Security(StrEnum):
    NONE = "none"
    STARTTLS = "starttls"
    TLS = "tls"


class TLSSettings(SecretsModel):
    """Connection settings shared by the SMTP and IMAP sides of a route."""

    host: NonBlankStr
    port: Port | None = None
    security: Security = Security.STARTTLS
    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = None
    password_env: str | None = None
    ca_file: Path | None = None
    verify_tls: bool = True
    connect_timeout: PositiveFloat = 10.0

    secret_fields = ("password",)

    @model_validator(mode="after")
    def _check_auth_and_ca(self) -> Any:
        if self.password is not None and not self.username:
            raise key_error("username", "required when a password is set")
        if self.ca_file is not None and not self.ca_file.is_file():
            raise key_error("ca_file", f"no such file: {self.ca_file}")
        return self


class SmtpSettings(TLSSettings):
    # Passed to EHLO. The library default resolves the host name in a thread,
    # which can stall on a container without working reverse DNS.
    local_hostname: NonBlankStr = "selfcheckd.localdomain"
    timeout: PositiveFloat = 30.0

    @model_validator(mode="after")
    def _default_port(self) -> Any:
        if self.port is None:
            self.port = {Security.NONE: 25, Security.STARTTLS: 587, Security.TLS: 465}[
                self.security
            ]
        return self


class ImapSettings(TLSSettings):
    mailbox: NonBlankStr = "INBOX"
    idle: bool = True
    poll_interval: PositiveFloat = 2.0
    command_timeout: PositiveFloat = 15.0

    @model_validator(mode="after")
    def _default_port(self) -> Any:
        if self.port is None:
            self.port = 993 if self.security is Security.TLS else 143
        return self


class RouteConfig(StrictModel):
    name: NonBlankStr = "default"
    from_: NonBlankStr = Field(alias="from")
    to: NonBlankStr
    smtp: SmtpSettings
    imap: ImapSettings

    @model_validator(mode="after")
    def _check_addresses(self) -> Any:
        for key, value in (("from", self.from_), ("to", self.to)):
            local, at, domain = value.rpartition("@")
            if not at or not local or not domain or any(c.isspace() for c in value):
                raise key_error(key, "must be an email address like name@example.com")
        return self


class SelfcheckConfig(SecretsModel):
    interval: PositiveFloat = 600.0
    timeout: PositiveFloat = 60.0
    jitter: NonNegativeFloat = 0.0
    secret: SecretStr | None = None
    secret_file: Path | None = None
    secret_env: str | None = None
    cleanup_timeout: PositiveFloat = 15.0
    routes: list[RouteConfig] = Field(default_factory=list)

    secret_fields = ("secret",)

    @model_validator(mode="after")
    def _check_routes(self) -> Any:
        if self.jitter >= self.interval:
            raise key_error("jitter", "must be less than interval")
        names = [r.name for r in self.routes]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise key_error("routes", f"route names must be unique (repeated: {', '.join(dupes)})")
        return self


class HeartbeatKind(StrEnum):
    UPDOWN = "updown"
    HEALTHCHECKS = "healthchecks"
    UPTIME_KUMA = "uptime-kuma"


class HeartbeatTarget(SecretsModel):
    """Where a success pulse goes. The URL is a secret: pulse URLs embed tokens."""

    name: NonBlankStr = "default"
    kind: HeartbeatKind = HeartbeatKind.UPDOWN
    url: SecretStr | None = None
    url_file: Path | None = None
    url_env: str | None = None
    timeout: PositiveFloat = 10.0
    retries: int = Field(default=3, ge=0, le=10)
    backoff: PositiveFloat = 1.0
    send_start: bool = False
    # The routes this target speaks for (default: every route). It pulses only
    # while the latest completed run of each of them succeeded.
    routes: list[NonBlankStr] | None = None

    secret_fields = ("url",)

    @model_validator(mode="after")
    def _check_url(self) -> Any:
        if self.url is None:
            raise key_error("url", "required (or url_file / url_env)")
        if not self.url.get_secret_value().startswith(("http://", "https://")):
            raise key_error("url", "must start with http:// or https://")
        return self


class ServerConfig(StrictModel):
    listen: NonBlankStr = "0.0.0.0:9787"
    # GET /probe?route=NAME runs a round trip on demand. It sends mail, so it is off.
    probe: bool = False

    @model_validator(mode="after")
    def _check_listen(self) -> Any:
        _host, sep, port = self.listen.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise key_error("listen", "must be HOST:PORT with PORT 0-65535")
        return self

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]") or "0.0.0.0"

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


class PushgatewayConfig(SecretsModel):
    """Where `selfcheckd check` pushes its result (Messages' Pushgateway metrics)."""

    url: NonBlankStr
    job: NonBlankStr = "selfcheck"
    prefix: str = ""
    timeout: PositiveFloat = 10.0
    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = None
    password_env: str | None = None

    secret_fields = ("password",)

    @model_validator(mode="after")
    def _check_auth(self) -> Any:
        if self.password is not None and not self.username:
            raise key_error("username", "required when a password is set")
        return self


class LoggingConfig(StrictModel):
    format: Literal["kv", "json"] = "kv"
    level: Literal["debug", "info", "warning", "error"] = "info"


class Config(StrictModel):
    selfcheck: SelfcheckConfig = Field(default_factory=SelfcheckConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    heartbeat: list[HeartbeatTarget] = Field(default_factory=list)
    leakwatch: LeakWatchConfig | None = None
    pushgateway: PushgatewayConfig | None = None
    # Below ECS's default 30 s stopTimeout, so cleanup finishes before SIGKILL.
    shutdown_grace: PositiveFloat = 20.0

    def secret_values(self) -> set[str]:
        """Every configured secret, and the token-bearing pieces of secret URLs (for redaction)."""
        values: set[str] = set()
        found: list[SecretStr | None] = [self.selfcheck.secret]
        for route in self.selfcheck.routes:
            found += [route.smtp.password, route.imap.password]
        urls: list[SecretStr | None] = [h.url for h in self.heartbeat]
        if self.leakwatch is not None and self.leakwatch.alert is not None:
            found.append(self.leakwatch.alert.secret)
            values |= url_secret_pieces(self.leakwatch.alert.url)
        values |= {s.get_secret_value() for s in found if s is not None}
        for url in urls:
            if url is not None:
                values |= url_secret_pieces(url.get_secret_value())
        return values

    @model_validator(mode="after")
    def _check_heartbeat_names(self) -> Any:
        names = [h.name for h in self.heartbeat]
        if len(set(names)) != len(names):
            raise key_error("heartbeat", "target names must be unique")
        routes = [r.name for r in self.selfcheck.routes]
        for i, target in enumerate(self.heartbeat):
            unknown = [r for r in target.routes or [] if r not in routes]
            if unknown:
                raise key_error(f"heartbeat[{i}].routes",
                                f"no such route: {', '.join(unknown)} "
                                f"(routes: {', '.join(routes) or 'none'})")
        return self


class ConfigError(Exception):
    """The configuration is invalid; `problems` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


# Seed-compatible variables -> key path in the config tree. A path through
# `routes.0` addresses the single route of the env-only (seed) deployment.
ENV_OVERRIDES: dict[str, tuple[str | int, ...]] = {
    "MESSAGES_SELFCHECK_FROM": ("selfcheck", "routes", 0, "from"),
    "MESSAGES_SELFCHECK_TO": ("selfcheck", "routes", 0, "to"),
    "MESSAGES_SELFCHECK_SECRET": ("selfcheck", "secret"),
    "MESSAGES_SELFCHECK_INTERVAL": ("selfcheck", "interval"),
    "MESSAGES_SELFCHECK_TIMEOUT": ("selfcheck", "timeout"),
    "MESSAGES_SELFCHECK_WEBHOOK_URL": ("heartbeat", 0, "url"),
    "SELFCHECKD_LISTEN": ("server", "listen"),
    "SELFCHECKD_LOG_FORMAT": ("logging", "format"),
    "SELFCHECKD_LOG_LEVEL": ("logging", "level"),
    "SELFCHECKD_SHUTDOWN_GRACE": ("shutdown_grace",),
    **{
        f"SELFCHECK_{proto.upper()}_{key.upper()}": ("selfcheck", "routes", 0, proto, key)
        for proto in ("smtp", "imap")
        for key in ("host", "port", "security", "username", "password")
    },
    "SELFCHECK_IMAP_MAILBOX": ("selfcheck", "routes", 0, "imap", "mailbox"),
}
# Messages' Pushgateway variables: applied only while ..._ENABLED is true, as there.
PUSHGATEWAY_SWITCH = "MESSAGES_SELFCHECK_PROMETHEUS_METRICS_ENABLED"
PUSHGATEWAY_OVERRIDES: dict[str, tuple[str | int, ...]] = {
    "MESSAGES_SELFCHECK_PROMETHEUS_METRICS_PUSHGATEWAY_URL": ("pushgateway", "url"),
    "MESSAGES_SELFCHECK_PROMETHEUS_METRICS_PREFIX": ("pushgateway", "prefix"),
}
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}


@dataclass(frozen=True)
class LoadedConfig:
    config: Config
    path: Path | None


def _set_path(tree: dict[str, Any], path: tuple[str | int, ...], value: str) -> str | None:
    """Set `value` at `path`, creating tables and list items; return a problem or None."""
    node: Any = tree
    for i, key in enumerate(path[:-1]):
        nxt = path[i + 1]
        if isinstance(key, int):
            if len(node) > 1:
                return "only valid with a single route or target; use *_env keys in the file"
            if not node:
                node.append({})
            node = node[0]
        else:
            if key not in node:
                node[key] = [] if isinstance(nxt, int) else {}
            node = node[key]
            if isinstance(nxt, int) and not isinstance(node, list):
                return "conflicts with the file's value at this key"
    last = path[-1]
    if not isinstance(node, dict):
        return "conflicts with the file's value at this key"
    # An env secret replaces the file's way of giving it, whichever that was.
    for suffix in ("_file", "_env"):
        node.pop(f"{last}{suffix}", None)
    node[str(last)] = value
    return None


def _format_loc(loc: tuple[str | int, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


_RULES = {
    "missing": "required",
    "extra_forbidden": "unknown key",
    "int_parsing": "must be an integer",
    "int_type": "must be an integer",
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "bool_parsing": "must be true or false",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "list_type": "must be a list",
    "model_type": "must be a table",
    "dict_type": "must be a table",
}


def _problem(err: Mapping[str, Any], origin: dict[tuple[str | int, ...], str]) -> str:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and "[" in p))
    msg = str(err["msg"]).removeprefix("Value error, ")
    if msg.startswith("@"):
        key, _, msg = msg[1:].partition(": ")
        loc = (*loc, key)
    if err["type"] in _RULES:
        msg = _RULES[err["type"]]
    elif err["type"] in ("enum", "literal_error"):
        expected = err.get("ctx", {}).get("expected", "")
        msg = f"must be one of {expected}".replace("'", "")
    elif err["type"] in ("greater_than_equal", "less_than_equal"):
        msg = str(err["msg"]).replace("Input should be", "must be")
    where = _format_loc(loc)
    env = origin.get(tuple(0 if isinstance(p, int) else p for p in loc))
    return f"{where} (from {env}): {msg}" if env else f"{where}: {msg}"


def load_config(path: Path | None = None, environ: Mapping[str, str] | None = None) -> LoadedConfig:
    """Read the TOML file (if any), apply env overrides, validate; raise ConfigError."""
    env = os.environ if environ is None else environ
    if path is None and env.get("SELFCHECKD_CONFIG"):
        path = Path(env["SELFCHECKD_CONFIG"])
    tree: dict[str, Any] = {}
    if path is not None:
        try:
            tree = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None

    problems: list[str] = []
    origin: dict[tuple[str | int, ...], str] = {}
    overrides = dict(ENV_OVERRIDES)
    switch = env.get(PUSHGATEWAY_SWITCH, "").strip().lower()
    if switch in _TRUE:
        overrides.update(PUSHGATEWAY_OVERRIDES)
        tree.setdefault("pushgateway", {})
    elif switch not in _FALSE:
        problems.append(f"{PUSHGATEWAY_SWITCH}: must be true or false")
    for var, key_path in overrides.items():
        value = env.get(var)
        if not value:
            continue
        problem = _set_path(tree, key_path, value)
        if problem:
            problems.append(f"{var}: {problem}")
        else:
            origin[key_path] = var
    if problems:
        raise ConfigError(problems)

    try:
        config = Config.model_validate(tree, context={"environ": env})
    except ValidationError as exc:
        raise ConfigError([_problem(e, origin) for e in exc.errors()]) from None
    if not config.selfcheck.routes and config.leakwatch is None:
        raise ConfigError([
            "selfcheck.routes: at least one route is required (or a [leakwatch] section); "
            "for a single route set MESSAGES_SELFCHECK_FROM/_TO and "
            "SELFCHECK_SMTP_HOST/SELFCHECK_IMAP_HOST"
        ])
    return LoadedConfig(config=config, path=path)
