"""`selfcheckd config-check --connect`: reach every configured server, send nothing.

Each thing the daemon talks to is one target: a route's SMTP and IMAP servers,
the leak source (a readable file, or CloudWatch Logs and the SSM parameter),
the heartbeat and alert hosts, the Pushgateway, each [[dns]] entry's nameservers
(one SOA query). A target's probe does only its protocol work, stopping short of
anything with an effect: SMTP ends at AUTH (never MAIL FROM), IMAP at SELECT,
and HTTP endpoints get a TCP connect and a TLS handshake but no request, so no
pulse, alert or push is ever sent.

The runner owns the verdict (as blackbox_exporter's handler does): every
target runs at once under its own deadline, and each prints exactly one line,
in the order of the config, as soon as it and the targets before it are done:

    ok    smtp default  smtp.example.com:587 (STARTTLS, AUTH as selfcheck) 0.12s
    FAIL  imap default  imap.example.com:143: login failed: NO [AUTHENTICATIONFAILED] ... 0.05s

then one summary line naming the failed targets. Lines never carry a secret:
URLs show as scheme://host:port, passwords never, and every line is scrubbed
of the configured secret values as a last defence.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import stat
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TextIO
from urllib.parse import urlsplit

import aiosmtplib
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import (
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
    NoRegionError,
    PartialCredentialsError,
)
from pydantic import SecretStr

from daemon.config import Config, HaConfig, RouteConfig, Security, with_scheme
from daemon.config_base import scrub, url_origin
from daemon.dns.config import DnsEntry
from daemon.ha import create_dynamodb_client
from daemon.logwatch.config import CloudWatchSource, S3Location, SinkholeModeWatch
from daemon.logwatch.sources.cloudwatch import BOTO_ATTEMPTS, create_logs_client
from daemon.roundtrip.imap_client import ImapError, ImapSession
from daemon.roundtrip.tls import client_context, os_error_text
from daemon.threads import in_daemon_thread

# Deadline of a target with no timeout of its own in the config (the log file).
DEFAULT_DEADLINE = 5.0
# Deadline of the lease table's read, and of the S3 state object's.
LEASE_DEADLINE = 10.0
STATE_OBJECT_DEADLINE = 10.0
# How long a finished TLS connection gets to exchange close_notify before it is cut.
CLOSE_GRACE = 1.0
# Secrets shorter than this are not scrubbed from lines (they would mangle ordinary words).
_DEFAULT_PORTS = {"http": 80, "https": 443}
_ACCESS_DENIED = frozenset({"AccessDenied", "AccessDeniedException"})
_BAD_CREDENTIALS = frozenset({
    "UnrecognizedClientException", "InvalidClientTokenId", "InvalidSignatureException",
    "SignatureDoesNotMatch", "ExpiredTokenException", "ExpiredToken",
})

Status = Literal["ok", "FAIL", "skip"]


class TargetError(Exception):
    """The target could not be reached or refused us; the message says what failed."""


class TargetSkippedError(Exception):
    """There is nothing to reach for this target; the message says why."""


@dataclass
class Target:
    """One thing to reach: its label (`kind name`), where it is, its deadline, its probe.

    A probe returns a short detail for the ok line or raises `TargetError`.
    It keeps `step` current so a deadline that cuts it short can say where,
    and may refine `where` once it knows more (the AWS endpoint it resolved).
    """

    kind: str
    name: str
    where: str
    deadline: float
    probe: Callable[[Target], Awaitable[str]] = field(repr=False)
    step: str = "connect"
    ends_at: float = 0.0  # time.monotonic() at the deadline, set when the probe starts

    def time_left(self) -> float:
        return max(self.ends_at - time.monotonic(), 0.0)

    @property
    def label(self) -> str:
        return f"{self.kind} {self.name}" if self.name else self.kind


@dataclass(frozen=True)
class Outcome:
    status: Status
    detail: str
    elapsed: float


async def check_connections(config: Config, out: TextIO) -> bool:
    """Reach every configured server; print one line per target and a summary to `out`.

    True only if no target failed (a skipped target is not a failure).
    """
    targets = build_targets(config)
    secrets = config.secret_values()
    outcomes: list[Outcome] = []
    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(run_target(t)) for t in targets]
        for target, task in zip(targets, tasks, strict=True):
            outcome = await task
            outcomes.append(outcome)
            # Only the detail can carry a server's words; the target column is ours.
            outcome = replace(outcome, detail=scrub(outcome.detail, secrets))
            _emit(out, format_line(target, outcome))
    failed = [t.label for t, o in zip(targets, outcomes, strict=True) if o.status == "FAIL"]
    skipped = sum(1 for o in outcomes if o.status == "skip")
    _emit(out, format_summary(len(targets), failed, skipped))
    return not failed


def build_targets(config: Config) -> list[Target]:
    """Every target of `config`, in the config's order."""
    targets: list[Target] = []
    for route in config.selfcheck.routes:
        targets += [_smtp_target(route), _imap_target(route)]
    for hb in config.heartbeat:
        targets.append(_url_target("heartbeat", hb.name, hb.url, hb.timeout))
    leak = config.leakwatch
    if leak is not None:
        if leak.source == "file":
            path = leak.file.path
            targets.append(Target("logfile", "", str(path), DEFAULT_DEADLINE,
                                  lambda t: _check_file(path, t)))
        elif leak.source == "cloudwatch":
            targets += [_cloudwatch_target(leak.cloudwatch, g) for g in leak.cloudwatch.log_groups]
        else:
            targets.append(Target("stdin", "", "leak source", DEFAULT_DEADLINE, _skip_stdin))
        if (state := leak.state_path) is not None:
            targets.append(Target("statefile", "", str(state), DEFAULT_DEADLINE,
                                  lambda t: _check_state_file(state, t)))
        elif (location := leak.state_s3) is not None:
            targets.append(_state_object_target(location, config.ha))
        if leak.alert is not None:
            targets.append(_url_target("alert", "", leak.alert.url, leak.alert.timeout))
        if leak.sinkhole_mode.enabled:
            targets.append(_ssm_target(leak.sinkhole_mode))
    if config.pushgateway is not None:
        targets.append(_pushgateway_target(config.pushgateway.url, config.pushgateway.timeout))
    targets += [_dns_target(entry) for entry in config.dns]
    if config.ha is not None:
        targets.append(_lease_target(config.ha))
    return targets


async def run_target(target: Target) -> Outcome:
    """Run one probe under its deadline; never raises (but for cancellation)."""
    started = time.monotonic()
    target.ends_at = started + target.deadline
    status: Status = "ok"
    deadline = asyncio.timeout(target.deadline)
    try:
        async with deadline:
            detail = await target.probe(target)
    except TimeoutError:
        status = "FAIL"
        if deadline.expired():
            detail = f"{target.step}: no answer within the {target.deadline:g}s deadline"
        else:
            detail = f"{target.step}: timed out"
    except TargetError as exc:
        status, detail = "FAIL", str(exc)
    except TargetSkippedError as exc:
        status, detail = "skip", str(exc)
    except Exception as exc:  # a bug or a library surprise: still one line, no traceback
        status, detail = "FAIL", f"{target.step}: {type(exc).__name__}: {exc}"
    return Outcome(status, detail, time.monotonic() - started)


def format_line(target: Target, outcome: Outcome) -> str:
    """`ok    smtp default  host:587 (STARTTLS, AUTH as u) 0.12s`; failures after a colon."""
    if outcome.status == "ok":
        result = f" ({outcome.detail})" if outcome.detail else ""
    else:
        result = f": {outcome.detail}"
    return (f"{outcome.status:<6}{target.label}  {target.where}{result} "
            f"{outcome.elapsed:.2f}s")


def format_summary(total: int, failed: list[str], skipped: int) -> str:
    if failed:
        return f"{len(failed)} of {_count(total)} failed: {', '.join(failed)}"
    reached = total - skipped
    if skipped:
        return f"{_count(reached)} reachable, {skipped} skipped, none failed"
    return f"all {_count(reached)} reachable"


def _count(n: int) -> str:
    return f"{n} target" if n == 1 else f"{n} targets"


def _emit(out: TextIO, line: str) -> None:
    out.write(line + "\n")
    out.flush()


# -- secrets ----------------------------------------------------------------------------


# -- SMTP -------------------------------------------------------------------------------


def _smtp_target(route: RouteConfig) -> Target:
    s = route.smtp
    return Target("smtp", route.name, f"{_host(s.host)}:{s.port}", s.connect_timeout + s.timeout,
                  lambda t: _check_smtp(route, t))


async def _check_smtp(route: RouteConfig, t: Target) -> str:
    """Connect, EHLO, STARTTLS, EHLO, AUTH, QUIT: everything short of MAIL FROM."""
    s = route.smtp
    password = s.password.get_secret_value() if s.password is not None else None
    client = aiosmtplib.SMTP(
        hostname=s.host, port=s.port, local_hostname=s.local_hostname, timeout=s.timeout,
        use_tls=s.security is Security.TLS, start_tls=False,
        tls_context=client_context(s) if s.security is not Security.NONE else None,
    )
    limit = s.connect_timeout
    done: list[str] = [{Security.NONE: "no TLS", Security.STARTTLS: "STARTTLS",
                        Security.TLS: "TLS"}[s.security]]
    try:
        t.step = "connect"
        await client.connect(timeout=s.connect_timeout)
        limit = s.timeout
        t.step = "EHLO"
        await client.ehlo(timeout=s.timeout)
        if s.security is Security.STARTTLS:
            t.step = "STARTTLS"
            await client.starttls(server_hostname=s.host, timeout=s.timeout)
            t.step = "EHLO"
            await client.ehlo(timeout=s.timeout)
        if password is not None and s.username:
            t.step = "AUTH"
            await client.login(s.username, password, timeout=s.timeout)
            done.append(f"AUTH as {s.username}")
        else:
            done.append("no AUTH")
        t.step = "QUIT"
        await client.quit(timeout=s.timeout)
    except aiosmtplib.SMTPAuthenticationError as exc:
        raise TargetError(f"AUTH failed: {exc.code} {exc.message}") from None
    except aiosmtplib.SMTPTimeoutError as exc:
        raise TargetError(f"{t.step}: {exc.message} (after {limit:g}s)") from None
    except aiosmtplib.SMTPResponseException as exc:
        raise TargetError(f"{t.step}: server said {exc.code} {exc.message}") from None
    except aiosmtplib.SMTPException as exc:
        raise TargetError(f"{t.step}: {_smtp_reason(exc)}") from None
    except ssl.SSLError as exc:
        raise TargetError(f"{t.step}: TLS handshake failed: {_tls_reason(exc)}") from None
    except OSError as exc:
        raise TargetError(f"{t.step}: {os_error_text(exc)}") from None
    finally:
        client.close()
    return ", ".join(done)


def _smtp_reason(exc: aiosmtplib.SMTPException) -> str:
    cause = exc.__cause__
    if isinstance(cause, ssl.SSLError):
        return f"TLS handshake failed: {_tls_reason(cause)}"
    if isinstance(cause, OSError):
        return os_error_text(cause)
    return exc.message


# -- IMAP -------------------------------------------------------------------------------


def _imap_target(route: RouteConfig) -> Target:
    s = route.imap
    return Target("imap", route.name, f"{_host(s.host)}:{s.port}",
                  s.connect_timeout + s.command_timeout, lambda t: _check_imap(route, t))


async def _check_imap(route: RouteConfig, t: Target) -> str:
    """Connect, STARTTLS, LOGIN, SELECT (the round trip's own session), then LOGOUT."""
    s = route.imap
    session = ImapSession(s)
    t.step = "connect, STARTTLS, LOGIN, SELECT"
    try:
        await session.connect()
    except ImapError as exc:
        raise TargetError(str(exc).removeprefix(f"{session.where}: ")) from None
    else:
        t.step = "LOGOUT"
    finally:
        await session.close()  # LOGOUT when healthy, else just drop the connection
    tls = {Security.NONE: "no TLS", Security.STARTTLS: "STARTTLS", Security.TLS: "TLS"}
    login = f"LOGIN as {s.username}" if s.username else "no LOGIN"
    return f"{tls[s.security]}, {login}, SELECT {s.mailbox}"


# -- the leak source --------------------------------------------------------------------


async def _check_file(path: Path, t: Target) -> str:
    """The file the watcher follows exists, is a regular file and can be opened for reading."""
    t.step = "open"
    try:
        size = await in_daemon_thread(_open_for_reading, path, name="connect-check")
    except FileNotFoundError:
        raise TargetError("no such file") from None
    except PermissionError:
        raise TargetError(f"not readable by uid {os.getuid()}: permission denied") from None
    except OSError as exc:
        raise TargetError(f"cannot open: {exc.strerror or exc}") from None
    return f"readable regular file, {size} bytes"


def _open_for_reading(path: Path) -> int:
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):
        what = "a directory" if stat.S_ISDIR(info.st_mode) else "a special file"
        raise TargetError(f"not a regular file: {what}")
    with path.open("rb") as fh:
        return os.fstat(fh.fileno()).st_size


async def _check_state_file(path: Path, t: Target) -> str:
    """The state file can be written where it is configured (nothing is written here)."""
    t.step = "access"
    return await in_daemon_thread(_state_file_access, path, name="connect-check")


def _state_file_access(path: Path) -> str:
    uid = os.getuid()
    if path.is_dir():
        raise TargetError("is a directory")
    if path.exists() and not os.access(path, os.R_OK):
        raise TargetError(f"not readable by uid {uid}: permission denied")
    # Saving writes a temporary file beside it and renames it over: the directory, or the
    # nearest one that exists when it is still to be created, must be writable.
    directory = path.parent
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    if not directory.is_dir():
        raise TargetError(f"{directory} is not a directory")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise TargetError(f"{directory} is not writable by uid {uid}")
    if directory != path.parent:
        return f"{path.parent} will be created in {directory}"
    return "exists, writable" if path.exists() else "writable directory, file not yet written"


async def _skip_stdin(_t: Target) -> str:
    raise TargetSkippedError("lines come from standard input at run time; nothing to reach")


def _cloudwatch_target(cfg: CloudWatchSource, group: str) -> Target:
    where = _redact_url(cfg.endpoint_url) if cfg.endpoint_url else _region(cfg.region)
    return Target("cloudwatch", group, where, cfg.request_timeout,
                  lambda t: _check_log_group(cfg, group, t))


async def _check_log_group(cfg: CloudWatchSource, group: str, t: Target) -> str:
    """DescribeLogStreams (limit 1) on the group, with the watcher's own client settings."""
    action = "logs:DescribeLogStreams"
    t.step = "create client"
    try:
        async with create_logs_client(cfg) as client:
            t.where = _redact_url(client.meta.endpoint_url)
            t.step = "DescribeLogStreams"
            if cfg.stream_prefix:
                resp = await client.describe_log_streams(
                    logGroupName=group, limit=1, logStreamNamePrefix=cfg.stream_prefix)
            else:
                resp = await client.describe_log_streams(logGroupName=group, limit=1)
    except Exception as exc:
        raise TargetError(_aws_reason(exc, action, f"log group {group}")) from None
    streams = resp.get("logStreams", [])
    prefix = f" named {cfg.stream_prefix}*" if cfg.stream_prefix else ""
    if not streams:
        return f"DescribeLogStreams: group exists, no stream{prefix} yet"
    return f"DescribeLogStreams: a stream{prefix}: {streams[0].get('logStreamName', '?')}"


def _ssm_target(cfg: SinkholeModeWatch) -> Target:
    where = _redact_url(cfg.endpoint_url) if cfg.endpoint_url else _region(cfg.region)
    return Target("ssm", cfg.parameter, where, cfg.request_timeout,
                  lambda t: _check_parameter(cfg, t))


async def _check_parameter(cfg: SinkholeModeWatch, t: Target) -> str:
    """GetParameter on the sinkhole-mode parameter, as the watcher calls it."""
    config = AioConfig(
        retries={"mode": "standard", "max_attempts": BOTO_ATTEMPTS},
        connect_timeout=min(cfg.request_timeout, 10.0),
        read_timeout=cfg.request_timeout,
    )
    t.step = "create client"
    try:
        async with get_session().create_client(
            "ssm", region_name=cfg.region, endpoint_url=cfg.endpoint_url, config=config
        ) as client:
            t.where = _redact_url(client.meta.endpoint_url)
            t.step = "GetParameter"
            resp = await client.get_parameter(Name=cfg.parameter)
    except Exception as exc:
        raise TargetError(_aws_reason(exc, "ssm:GetParameter", f"parameter {cfg.parameter}")
                           ) from None
    value = str(resp.get("Parameter", {}).get("Value", "")).strip()
    return f"GetParameter: mode {value[:40]!r}"


def _state_object_target(location: S3Location, ha: HaConfig | None) -> Target:
    region, endpoint = (ha.region, ha.endpoint_url) if ha is not None else (None, None)
    return Target("stateobject", "", str(location), STATE_OBJECT_DEADLINE,
                  lambda t: _check_state_object(location, region, endpoint, t))


async def _check_state_object(location: S3Location, region: str | None,
                              endpoint: str | None, t: Target) -> str:
    """HeadObject on the state object (s3:GetObject): readable, or not there yet.

    Nothing is written: whether the task may write it (s3:PutObject, conditionally)
    shows at its first save.
    """
    from daemon.state_s3 import META_HOLDER, META_TOKEN, create_s3_client

    t.step = "create client"
    try:
        async with create_s3_client(region, endpoint, STATE_OBJECT_DEADLINE / 2) as client:
            t.where = f"{location} via {_redact_url(client.meta.endpoint_url)}"
            t.step = "HeadObject"
            head = await client.head_object(Bucket=location.bucket, Key=location.key)
    except ClientError as exc:
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = exc.response.get("Error", {}).get("Code")
        if status == 404 or code in ("404", "NoSuchKey", "NotFound"):
            return "HeadObject: no state yet (the first leader creates it)"
        if code == "NoSuchBucket":
            raise TargetError(f"s3:GetObject: bucket {location.bucket} not found") from None
        if status == 403 or code in ("403", "AccessDenied"):
            raise TargetError(
                f"s3:GetObject: access denied on {location}: the role needs s3:GetObject on "
                "the object, and s3:ListBucket on the bucket (without it a missing object "
                "is answered 403)") from None
        raise TargetError(_aws_reason(exc, "s3:GetObject", str(location))) from None
    except Exception as exc:
        raise TargetError(_aws_reason(exc, "s3:GetObject", str(location))) from None
    meta = {k.lower(): v for k, v in (head.get("Metadata") or {}).items()}
    size = head.get("ContentLength", 0)
    writer = meta.get(META_HOLDER)
    by = f", written by {writer} (token {meta.get(META_TOKEN)})" if writer else ""
    version = head.get("VersionId")
    versioned = "" if version not in (None, "null") else "; the bucket is not versioned"
    return f"HeadObject: {size} bytes{by}{versioned}"


def _lease_target(cfg: HaConfig) -> Target:
    where = _redact_url(cfg.endpoint_url) if cfg.endpoint_url else _region(cfg.region)
    return Target("lease", f"{cfg.lease_table}/{cfg.lease_key}", where, LEASE_DEADLINE,
                  lambda t: _check_lease(cfg, t))


async def _check_lease(cfg: HaConfig, t: Target) -> str:
    """GetItem (strongly consistent) on the lease item: the table is there and readable.

    Nothing is written: whether the task may also write the lease (UpdateItem) shows
    when it runs (selfcheckd_lease_errors_total{reason="access_denied"}).
    """
    t.step = "create client"
    try:
        async with create_dynamodb_client(cfg, LEASE_DEADLINE / 2) as client:
            t.where = _redact_url(client.meta.endpoint_url)
            t.step = "GetItem"
            resp = await client.get_item(TableName=cfg.lease_table,
                                         Key={"key": {"S": cfg.lease_key}},
                                         ConsistentRead=True)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") == "ResourceNotFoundException":
            raise TargetError(
                f"dynamodb:GetItem: table {cfg.lease_table} not found: create it (deploy/"
                "terraform, or docs/ha.md: one string hash key named `key`); selfcheckd "
                "never creates tables") from None
        raise TargetError(_aws_reason(exc, "dynamodb:GetItem", f"table {cfg.lease_table}")
                          ) from None
    except Exception as exc:
        raise TargetError(_aws_reason(exc, "dynamodb:GetItem", f"table {cfg.lease_table}")
                          ) from None
    item = resp.get("Item")
    if not item:
        return "GetItem: table readable, no lease yet (the first task to start takes it)"
    holder = item.get("holder", {}).get("S")
    token = item.get("token", {}).get("N", "?")
    if holder is None:
        return f"GetItem: table readable, lease free (released), token {token}"
    try:
        left = float(item.get("expires", {}).get("N", "0")) - time.time()
    except ValueError:
        left = 0.0
    state = f"expires in {left:.0f}s" if left >= 0 else f"expired {-left:.0f}s ago"
    return f"GetItem: held by {holder}, token {token}, {state}"


def _aws_reason(exc: Exception, action: str, resource: str) -> str:
    """What an operator needs from an AWS failure, in one line: no traceback, no secret."""
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return ("no AWS credentials (none in the environment, the shared credentials/config "
                "files, or a task/instance role)")
    if isinstance(exc, NoRegionError):
        return "no AWS region (set region in the config, or AWS_REGION/AWS_DEFAULT_REGION)"
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", "")) or "error"
        message = str(error.get("Message", "")).strip()
        if code in _ACCESS_DENIED:
            return (f"{action}: access denied: the credentials in use lack {action} on "
                    f"{resource} ({message or code})")
        if code in _BAD_CREDENTIALS:
            return f"{action}: AWS rejected the credentials: {code}"
        if code in ("ResourceNotFoundException", "ParameterNotFound"):
            return f"{action}: {resource} not found ({code})"
        return f"{action}: {code}: {message}" if message else f"{action}: {code}"
    if isinstance(exc, EndpointConnectionError):
        return f"{action}: cannot reach the endpoint: {exc}"
    return f"{action}: {type(exc).__name__}: {exc}"


def _region(region: str | None) -> str:
    if region:
        return f"region {region}"
    return f"region {os.environ.get('AWS_REGION') or os.environ.get('AWS_DEFAULT_REGION') or '?'}"


# -- HTTP endpoints: TCP and TLS, no request ---------------------------------------------


def _pushgateway_target(url: str, timeout: float) -> Target:
    """The push goes through urllib, which honours http(s)_proxy / no_proxy: test that path."""
    url = with_scheme(url)
    host = urlsplit(url).hostname or ""
    proxy = None if urllib.request.proxy_bypass(host) else \
        urllib.request.getproxies().get(urlsplit(url).scheme)
    if proxy is None:
        return _url_target("pushgateway", "", url, timeout)
    where = f"{_redact_url(url)} via proxy {_redact_url(proxy)}"
    return Target("pushgateway", "", where, timeout, lambda t: _check_tcp_tls(proxy, t))


def _dns_target(entry: DnsEntry) -> Target:
    where = ", ".join(entry.nameservers) if entry.nameservers else "system resolver"
    # The resolver's own bound is `timeout`; one second more for the answer to arrive.
    return Target("dns", entry.name, where, entry.timeout + 1.0,
                  lambda t: _check_dns(entry, t))


async def _check_dns(entry: DnsEntry, t: Target) -> str:
    """Ask the entry's nameservers for the domain's SOA: any answer (NXDOMAIN included)
    shows they answer; what the answer says is `selfcheckd dns`'s business."""
    from daemon.dns.resolver import DnsError, Resolver  # dnspython only when used

    t.step = f"SOA {entry.domain}"
    try:
        answer = await Resolver(entry.servers, entry.timeout).query(entry.domain, "SOA")
    except DnsError as exc:
        raise TargetError(str(exc)) from None
    said = "SOA" if answer.records else ("NXDOMAIN" if not answer.exists else "no SOA")
    return f"answered {said} for {entry.domain}"


def _url_target(kind: str, name: str, url: str | SecretStr | None, timeout: float) -> Target:
    raw = url.get_secret_value() if isinstance(url, SecretStr) else (url or "")
    return Target(kind, name, _redact_url(raw), timeout, lambda t: _check_tcp_tls(raw, t))


async def _check_tcp_tls(url: str, t: Target) -> str:
    """TCP connect and, for https, the TLS handshake with the HTTP client's default trust."""
    t.step = "URL"
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port or _DEFAULT_PORTS.get(parts.scheme)
    except ValueError as exc:
        raise TargetError(f"invalid URL: {exc}") from None
    if not host or port is None:
        raise TargetError("invalid URL: needs http:// or https:// and a host")
    t.step = "TCP connect"
    try:
        _reader, writer = await asyncio.open_connection(host, port)
    except OSError as exc:
        raise TargetError(f"TCP connect: {os_error_text(exc)}") from None
    if parts.scheme != "https":
        await _close(writer, t)
        return "TCP connect; http, so no TLS; no request sent"
    t.step = "TLS handshake"
    try:
        await writer.start_tls(_https_context(), server_hostname=host)
    except BaseException as exc:
        writer.transport.abort()
        if isinstance(exc, ssl.SSLError):
            raise TargetError(f"TLS handshake failed: {_tls_reason(exc)}") from None
        if isinstance(exc, OSError):
            raise TargetError(f"TLS handshake: {os_error_text(exc)}") from None
        if isinstance(exc, EOFError):
            raise TargetError("TLS handshake: the server closed the connection") from None
        raise
    ssl_object: Any = writer.get_extra_info("ssl_object")
    version = ssl_object.version() if ssl_object is not None else "TLS"
    expiry = _cert_expiry(writer.get_extra_info("peercert"))
    await _close(writer, t)
    return f"TCP connect, {version} handshake{expiry}; no request sent"


def _https_context() -> ssl.SSLContext:
    """What aiohttp (heartbeats, alerts) and urllib (Pushgateway) verify with by default."""
    ctx = ssl.create_default_context()
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def _cert_expiry(cert: Any) -> str:
    not_after = cert.get("notAfter") if isinstance(cert, dict) else None
    if not not_after:
        return ""
    with contextlib.suppress(ValueError):
        when = datetime.fromtimestamp(ssl.cert_time_to_seconds(not_after), UTC)
        return f", certificate valid until {when:%Y-%m-%d}"
    return ""


async def _close(writer: asyncio.StreamWriter, t: Target) -> None:
    """Close politely (TLS close_notify) while time is left, then cut the connection.

    The check has passed by now: a peer slow to say goodbye must not turn it into
    a deadline failure, so the wait ends well before the target's deadline.
    """
    writer.close()
    grace = min(CLOSE_GRACE, t.time_left() / 2)
    try:
        async with asyncio.timeout(grace):
            await writer.wait_closed()
    except (TimeoutError, OSError):
        writer.transport.abort()


def _tls_reason(exc: ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"certificate verify failed: {exc.verify_message}"
    return str(exc.reason or exc)


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _redact_url(url: str | None) -> str:
    """scheme://host:port and nothing else: paths, queries and user info carry tokens."""
    return url_origin(url) if url else "<no url>"
