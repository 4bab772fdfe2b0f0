"""Load and validate selfcheckd's configuration: TOML file, then environment overrides.

The seed's `MESSAGES_SELFCHECK_*` variables and the single-route
`SELFCHECK_SMTP_*` / `SELFCHECK_IMAP_*` variables are applied on top of the
file, so the daemon can run from environment alone (as on ECS). Every problem
is reported as one line `key.path: rule`, all of them at once.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from daemon.config_base import (
    ExistingFile,
    HttpUrl,
    NonBlankStr,
    NonNegativeFloat,
    Port,
    PositiveFloat,
    Problem,
    SecretHttpUrl,
    SecretsModel,
    StrictModel,
    needs_username,
    table_value,
    url_problem,
    url_secret_pieces,
)
from daemon.dns.config import DnsEntry
from daemon.drill.config import DrillConfig
from daemon.logwatch.config import LeakWatchConfig

# A Prometheus metric name (and so a valid prefix of one).
_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


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
    ca_file: ExistingFile | None = None
    verify_tls: bool = True
    connect_timeout: PositiveFloat = 10.0

    secret_fields = ("password",)

    @classmethod
    def check_table(cls, table: dict[str, Any], info: ValidationInfo,
                    problems: list[Problem]) -> dict[str, Any]:
        needs_username(table, problems)
        return super().check_table(table, info, problems)


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
    # Where a misfiled probe is looked for (reason `junk`). None: the mailboxes
    # with the \Junk special-use flag, plus "Junk" and "Spam" when they exist;
    # [] turns the look off.
    junk_mailboxes: list[NonBlankStr] | None = None

    @field_validator("junk_mailboxes")
    @classmethod
    def _junk_is_not_watched(cls, value: list[str] | None, info: ValidationInfo) -> Any:
        watched = info.data.get("mailbox")  # absent when mailbox itself is invalid
        if value is not None and watched is not None and any(
            m == watched or m.upper() == watched.upper() == "INBOX" for m in value
        ):
            raise ValueError(f"must not include the watched mailbox ({watched})")
        return value

    @model_validator(mode="after")
    def _default_port(self) -> Any:
        if self.port is None:
            self.port = 993 if self.security is Security.TLS else 143
        return self


# The results a receiving server may report per method (RFC 8601 2.7, RFC 7489 11.2).
SpfResult = Literal["pass", "fail", "softfail", "neutral", "none", "policy", "temperror",
                    "permerror"]
DkimResult = Literal["pass", "fail", "neutral", "none", "policy", "temperror", "permerror"]
DmarcResult = Literal["pass", "fail", "none", "temperror", "permerror"]


class ExpectConfig(StrictModel):
    """Delivery-quality expectations of a route (docs/delivery-quality.md).

    Only the Authentication-Results of `authserv_id` are trusted; a verdict that
    differs from one given here fails the run with reason `auth`. With
    `authserv_id` alone the verdicts are recorded, never judged.
    """

    authserv_id: NonBlankStr | None = None
    spf: SpfResult | None = None
    dkim: DkimResult | None = None
    dmarc: DmarcResult | None = None

    @field_validator("authserv_id")
    @classmethod
    def _check_authserv_id(cls, value: str | None) -> str | None:
        if value is not None and any(c.isspace() or c in ";()" for c in value):
            raise ValueError("must be the receiving server's authserv-id, e.g. mx.google.com "
                             "(no spaces, ';' or parentheses)")
        return value

    @classmethod
    def check_table(cls, table: dict[str, Any], info: ValidationInfo,
                    problems: list[Problem]) -> dict[str, Any]:
        expected = [m for m in ("spf", "dkim", "dmarc") if table.get(m) is not None]
        if expected and table.get("authserv_id") is None:
            problems.append((("authserv_id",), f"required when {' or '.join(expected)} is "
                             "expected: only that server's verdicts are trusted"))
        return super().check_table(table, info, problems)


class RouteConfig(StrictModel):
    name: NonBlankStr = "default"
    from_: NonBlankStr = Field(alias="from")
    to: NonBlankStr
    smtp: SmtpSettings
    imap: ImapSettings
    expect: ExpectConfig | None = None

    @field_validator("from_", "to")
    @classmethod
    def _check_address(cls, value: str) -> str:
        local, at, domain = value.rpartition("@")
        if not at or not local or not domain or any(c.isspace() for c in value):
            raise ValueError("must be an email address like name@example.com")
        return value


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

    @field_validator("jitter")
    @classmethod
    def _jitter_below_interval(cls, value: float, info: ValidationInfo) -> float:
        interval = info.data.get("interval")  # absent when interval itself is invalid
        if interval is not None and value >= interval:
            raise ValueError("must be less than interval")
        return value

    @classmethod
    def check_table(cls, table: dict[str, Any], info: ValidationInfo,
                    problems: list[Problem]) -> dict[str, Any]:
        names = [n for n in route_names(table) or () if isinstance(n, str)]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            problems.append((("routes",),
                             f"route names must be unique (repeated: {', '.join(dupes)})"))
        return super().check_table(table, info, problems)


def route_names(selfcheck: Any) -> list[Any] | None:
    """The route names of a [selfcheck] table as written (None if it is not a table yet)."""
    routes = table_value(selfcheck, "routes", [])
    if not isinstance(selfcheck, dict | SelfcheckConfig) or not isinstance(routes, list):
        return None
    return [table_value(r, "name", "default") for r in routes]


class HeartbeatKind(StrEnum):
    UPDOWN = "updown"
    HEALTHCHECKS = "healthchecks"
    UPTIME_KUMA = "uptime-kuma"


class HeartbeatTarget(SecretsModel):
    """Where a success pulse goes. The URL is a secret: pulse URLs embed tokens."""

    name: NonBlankStr = "default"
    kind: HeartbeatKind = HeartbeatKind.UPDOWN
    url: SecretHttpUrl | None = None
    url_file: Path | None = None
    url_env: str | None = None
    timeout: PositiveFloat = 10.0
    retries: int = Field(default=3, ge=0, le=10)
    backoff: PositiveFloat = 1.0
    send_start: bool = False
    # The routes this target speaks for (default: every route). It pulses only
    # while the latest completed run of each of them succeeded.
    routes: list[NonBlankStr] | None = Field(default=None, min_length=1)

    secret_fields = ("url",)

    @classmethod
    def check_table(cls, table: dict[str, Any], info: ValidationInfo,
                    problems: list[Problem]) -> dict[str, Any]:
        if all(table.get(k) is None for k in ("url", "url_file", "url_env")):
            problems.append((("url",), "required (or url_file / url_env)"))
        if table.get("send_start") is True and table.get("kind") != "healthchecks":
            # Only healthchecks.io has a start signal: silently ignoring it misleads.
            problems.append((("send_start",), 'only for kind = "healthchecks"'))
        return super().check_table(table, info, problems)


def is_loopback(host: str) -> bool:
    """Whether a listen host is reachable only from this machine (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name other than localhost may resolve anywhere
        return False


class ServerConfig(SecretsModel):
    listen: NonBlankStr = "0.0.0.0:9787"
    # GET /probe?route=NAME runs a round trip on demand. It sends mail, so it is off.
    probe: bool = False
    # The bearer token /probe requires (Prometheus' `authorization` block sends it);
    # required when probe = true on an address that is not loopback.
    probe_token: SecretStr | None = None
    probe_token_file: Path | None = None
    probe_token_env: str | None = None
    # A new run for a route starts at most this often through /probe; requests in
    # between get the latest result, marked as cached.
    probe_min_interval: NonNegativeFloat = 60.0
    # Connections held at once (more are shed, oldest idle first); also capped at a
    # quarter of RLIMIT_NOFILE so the round trip and the leak watcher keep their fds.
    max_connections: int = Field(default=100, ge=1, le=100_000)
    # Seconds a connection may take to send its request line and headers, and may
    # stay idle between keep-alive requests, before it is closed.
    header_timeout: PositiveFloat = 10.0

    secret_fields = ("probe_token",)

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        _host, sep, port = value.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError("must be HOST:PORT with PORT 0-65535")
        return value

    @field_validator("probe_token")
    @classmethod
    def _check_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip():
            raise ValueError("must not be empty")
        return value

    @classmethod
    def check_table(cls, table: dict[str, Any], info: ValidationInfo,
                    problems: list[Problem]) -> dict[str, Any]:
        given = any(table.get(k) is not None
                    for k in ("probe_token", "probe_token_file", "probe_token_env"))
        listen = table.get("listen", "0.0.0.0:9787")
        if table.get("probe") is True and not given and isinstance(listen, str) \
                and not is_loopback(_listen_host(listen)):
            # /probe sends mail: anyone who can reach the port could make it send.
            problems.append((("probe_token",), f"required when probe = true and listen "
                             f"({listen}) is not a loopback address: set probe_token_file "
                             "or probe_token_env, or listen on 127.0.0.1"))
        return super().check_table(table, info, problems)

    @property
    def host(self) -> str:
        return _listen_host(self.listen)

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


def _listen_host(listen: str) -> str:
    return listen.rpartition(":")[0].strip("[]") or "0.0.0.0"


def with_scheme(url: str) -> str:
    """`url`, read as push_to_gateway reads it: a bare HOST:PORT means http://HOST:PORT."""
    return url if "://" in url else f"http://{url}"


class PushgatewayConfig(SecretsModel):
    """Where `selfcheckd check` pushes its result (Messages' Pushgateway metrics)."""

    # A bare HOST:PORT means http://HOST:PORT, as in push_to_gateway (and so in Messages).
    url: NonBlankStr
    job: NonBlankStr = "selfcheck"
    prefix: str = ""
    timeout: PositiveFloat = 10.0
    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = None
    password_env: str | None = None

    secret_fields = ("password",)

    @property
    def absolute_url(self) -> str:
        return with_scheme(self.url)

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        problem = url_problem(with_scheme(value))
        if problem:
            raise ValueError(problem)
        if "@" in urlsplit(with_scheme(value)).netloc:
            # urllib would resolve "user:pass@host" as a host name: every push would fail.
            raise ValueError("must not carry credentials; set username and password_file")
        return value

    @field_validator("prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        # prometheus_client would quietly rewrite other characters ("my-" becomes "my_").
        if value and not _METRIC_NAME.fullmatch(value):
            raise ValueError("must be empty or a metric name prefix: letters, digits, _ and :, "
                             "not starting with a digit")
        return value

    @classmethod
    def check_table(cls, table: dict[str, Any], info: ValidationInfo,
                    problems: list[Problem]) -> dict[str, Any]:
        needs_username(table, problems)
        return super().check_table(table, info, problems)


# DynamoDB table names: 3-255 of letters, digits, `_`, `-` and `.`.
_TABLE_NAME = re.compile(r"[A-Za-z0-9_.-]{3,255}")


class HaConfig(StrictModel):
    """Two tasks, one leader (docs/ha.md): the DynamoDB lease that decides who leads."""

    # The table (one string hash key named `key`); deploy/ creates it, the daemon never does.
    lease_table: NonBlankStr
    # The item: one per group of tasks that share the leader's work.
    lease_key: NonBlankStr = "selfcheckd"
    # How long a lease lasts unless renewed; a leader stops its work once
    # lease_duration - renew_every has passed since its last renewal.
    lease_duration: PositiveFloat = 15.0
    # The leader renews, a standby tries to take the lease, this often.
    renew_every: PositiveFloat = Field(default=5.0, validate_default=True)
    region: str | None = None
    endpoint_url: HttpUrl | None = None

    @field_validator("lease_table")
    @classmethod
    def _table_name(cls, value: str) -> str:
        if not _TABLE_NAME.fullmatch(value):
            raise ValueError("must be a DynamoDB table name: 3-255 letters, digits, _ - .")
        return value

    @field_validator("renew_every")
    @classmethod
    def _renew_within_lease(cls, value: float, info: ValidationInfo) -> float:
        duration = info.data.get("lease_duration")  # absent when itself invalid
        if duration is not None and not 2 * value < duration:
            raise ValueError(
                f"must be less than half of lease_duration ({duration:g}s): the leader stops "
                "its work lease_duration - renew_every after its last renewal, which must "
                "leave room for a renewal and a margin for clocks")
        return value


class LoggingConfig(StrictModel):
    format: Literal["kv", "json"] = "kv"
    level: Literal["debug", "info", "warning", "error"] = "info"
    # kv lines start with the UTC time and the level. Off by default: journald and
    # awslogs stamp each line themselves. JSON lines always carry both.
    timestamps: bool = False


class Config(StrictModel):
    selfcheck: SelfcheckConfig = Field(default_factory=SelfcheckConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    heartbeat: list[HeartbeatTarget] = Field(default_factory=list)
    leakwatch: LeakWatchConfig | None = None
    pushgateway: PushgatewayConfig | None = None
    drill: DrillConfig | None = None
    # DNS and sending-reputation checks (docs/dns.md).
    dns: list[DnsEntry] = Field(default_factory=list)
    ha: HaConfig | None = None
    # Below ECS's default 30 s stopTimeout, so cleanup finishes before SIGKILL.
    shutdown_grace: PositiveFloat = 20.0

    def secret_values(self) -> set[str]:
        """Every configured secret, and the token-bearing pieces of secret URLs (for redaction)."""
        values: set[str] = set()
        found: list[SecretStr | None] = [self.selfcheck.secret, self.server.probe_token]
        for route in self.selfcheck.routes:
            found += [route.smtp.password, route.imap.password]
        if self.pushgateway is not None:
            found.append(self.pushgateway.password)
            # Its path may carry a token; scheme://host:port is what logs show of it.
            values |= url_secret_pieces(self.pushgateway.absolute_url)
        urls: list[SecretStr | None] = [h.url for h in self.heartbeat]
        if self.leakwatch is not None and self.leakwatch.alert is not None:
            found.append(self.leakwatch.alert.secret)
            values |= url_secret_pieces(self.leakwatch.alert.url)
        values |= {s.get_secret_value() for s in found if s is not None}
        for url in urls:
            if url is not None:
                values |= url_secret_pieces(url.get_secret_value())
        return values

    @classmethod
    def check_table(cls, table: dict[str, Any], info: ValidationInfo,
                    problems: list[Problem]) -> dict[str, Any]:
        _check_drill(table, problems)
        ha, leakwatch = table.get("ha"), table.get("leakwatch")
        if isinstance(ha, dict) and table_value(leakwatch, "source") == "stdin":
            problems.append((("ha",), 'cannot be used with leakwatch.source = "stdin" (standard '
                             "input cannot pass from one task to another)"))
        targets = table.get("heartbeat", [])
        if not isinstance(targets, list):
            return super().check_table(table, info, problems)
        names = [n for t in targets if isinstance(n := table_value(t, "name", "default"), str)]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            problems.append((("heartbeat",), "target names must be unique (repeated: "
                             f"{', '.join(repeated)})"))
        known = route_names(table.get("selfcheck", {}))
        # A route whose name is itself invalid leaves the known names unknown.
        if known is None or not all(isinstance(n, str) for n in known):
            return super().check_table(table, info, problems)
        _check_dns_entries(table.get("dns", []), known, problems)
        for i, target in enumerate(targets):
            covered = table_value(target, "routes")
            if not isinstance(covered, list):
                continue
            unknown = [r for r in covered if isinstance(r, str) and r not in known]
            if unknown:
                problems.append((("heartbeat", i, "routes"),
                                 f"no such route: {', '.join(unknown)} "
                                 f"(routes: {', '.join(dict.fromkeys(known)) or 'none'})"))
        return super().check_table(table, info, problems)


def _check_drill(table: dict[str, Any], problems: list[Problem]) -> None:
    """[drill] route names a route; [drill] sender is one the leak watcher allows."""
    drill = table.get("drill")
    if not isinstance(drill, dict):
        return
    route = drill.get("route", "default")
    known = route_names(table.get("selfcheck", {}))
    if isinstance(route, str) and known is not None and all(isinstance(n, str) for n in known) \
            and route not in known:
        problems.append((("drill", "route"),
                         f"no such route: {route} (routes: {', '.join(known) or 'none'}); "
                         "the drill sends its message with that route's SMTP settings"))
    sender = drill.get("sender")
    leakwatch = table.get("leakwatch")
    if isinstance(sender, str) and isinstance(leakwatch, dict):
        allowed = leakwatch.get("allowed_senders", ["qp-test-*@*"])
        if isinstance(allowed, list) and not sender_allowed(sender, allowed):
            problems.append((("drill", "sender"),
                             f"{sender} is not in leakwatch.allowed_senders "
                             f"({', '.join(map(str, allowed))}): the leak watcher would "
                             "alert on the drill's own message"))


def sender_allowed(sender: str, patterns: list[Any]) -> bool:
    """As the leak watcher matches senders: case-insensitive glob patterns."""
    return any(isinstance(p, str) and fnmatch.fnmatchcase(sender.lower(), p.lower())
               for p in patterns)


def _check_dns_entries(entries: Any, routes: list[str], problems: list[Problem]) -> None:
    """[[dns]] names are unique (they label metrics); ips_from_route names a route."""
    if not isinstance(entries, list):
        return
    names = [_dns_name(e) for e in entries]
    repeated = sorted({n for n in names if n is not None and names.count(n) > 1})
    if repeated:
        problems.append((("dns",), "entry names must be unique (repeated: "
                         f"{', '.join(repeated)}); set name = \"...\" to tell them apart"))
    for i, entry in enumerate(entries):
        route = table_value(entry, "ips_from_route")
        if isinstance(route, str) and route.strip() and route not in routes:
            problems.append((("dns", i, "ips_from_route"),
                             f"no such route: {route} "
                             f"(routes: {', '.join(dict.fromkeys(routes)) or 'none'})"))


def _dns_name(entry: Any) -> str | None:
    """An entry's name as it will be: its `name`, else its domain as normalised."""
    name = table_value(entry, "name")
    if isinstance(name, str) and name:
        return name
    domain = table_value(entry, "domain")
    return domain.rstrip(".").lower() if isinstance(domain, str) else None


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
    "SELFCHECKD_LOG_TIMESTAMPS": ("logging", "timestamps"),
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
    "finite_number": "must be a finite number, not inf or nan",
    "bool_parsing": "must be true or false",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "list_type": "must be a list",
    "model_type": "must be a table",
    "dict_type": "must be a table",
    "too_short": "must not be empty (leave the key out for the default)",
}


def _problem(err: Mapping[str, Any], origin: dict[tuple[str | int, ...], str]) -> str:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and "[" in p))
    msg = str(err["msg"]).removeprefix("Value error, ")
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
    elif switch:
        if switch in _FALSE:
            # Said off in so many words: no push, whatever the file's [pushgateway] says
            # (a file shared between a cron job and a host that must not push).
            tree.pop("pushgateway", None)
        else:
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
        problems = [_problem(e, origin) for e in exc.errors()]
    section = tree.get("selfcheck", {})
    if isinstance(section, dict) and not section.get("routes") and tree.get("leakwatch") is None \
            and not tree.get("dns"):
        problems.append(
            "selfcheck.routes: at least one route is required (or a [leakwatch] section, or "
            "[[dns]] entries); "
            "for a single route set MESSAGES_SELFCHECK_FROM/_TO and "
            "SELFCHECK_SMTP_HOST/SELFCHECK_IMAP_HOST")
    if problems:
        raise ConfigError(problems)
    return LoadedConfig(config=config, path=path)
