"""Push the results of `selfcheckd check` to a Prometheus Pushgateway, as Messages does.

A one-shot `check` (cron, a scheduled ECS task, a Kubernetes CronJob) leaves
nothing to scrape, so after its runs it pushes the gauges Messages' `selfcheck`
command pushes, with the same names and help texts:

    <prefix>selfcheck_start_time                   wall time the run started
    <prefix>selfcheck_end_time                     wall time the run ended
    <prefix>selfcheck_success                      1 or 0
    <prefix>selfcheck_send_duration_seconds        only when the send was measured
    <prefix>selfcheck_reception_duration_seconds   only when the reception was measured

Each route's registry is pushed with `push_to_gateway`, a PUT that replaces
the whole group, so a duration the run never measured disappears from the group
instead of keeping the previous run's value. (Messages leaves such a gauge unset,
and an unset gauge is exposed as 0; a 0 s send reads as a very fast one, so we
leave it out, which is what Messages documents: "only on successful send".)

With one route the group is `/metrics/job/<job>`, exactly Messages' group, so
its dashboards keep working. With several, each route is its own group,
`/metrics/job/<job>/route/<name>`, so one route's PUT does not wipe another's.

A push never raises and never changes the command's exit code: a failure is one
`pushgateway_push_failed` line. The pushes run in daemon threads with one total
deadline of `timeout` (urllib's timeout is per socket operation and does not
cover name resolution), so a Pushgateway that trickles bytes or a resolver that
hangs cannot hold the command. Logs name the Pushgateway as scheme://host:port
only: its path may carry a proxy token, and the password is never logged.
A result cut short by shutdown (`interrupted`) is no verdict and is not pushed.
"""

from __future__ import annotations

import functools
import threading
import time
import urllib.error
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

import structlog
from prometheus_client import CollectorRegistry, Gauge, push_to_gateway
from prometheus_client.exposition import basic_auth_handler, default_handler

from daemon.checks.result import CheckResult
from daemon.config import PushgatewayConfig, with_scheme
from daemon.config_base import MIN_SECRET_PIECE, scrub, url_secret_pieces

log = structlog.get_logger("daemon.pushgateway")

# Name (after the prefix) -> help text, exactly as Messages registers them.
GAUGES: dict[str, str] = {
    "selfcheck_start_time": "Start timestamp of the self check",
    "selfcheck_end_time": "End timestamp of the self check",
    "selfcheck_success": "Success of the self check",
    "selfcheck_send_duration_seconds": "Send duration of the self check",
    "selfcheck_reception_duration_seconds": "Reception duration of the self check",
}
# Lets urllib's own timeout (which says more) win the race against the join.
_JOIN_MARGIN = 0.25
# How much of a Pushgateway's error body to log (it explains a 400, e.g. a type clash).
_BODY_CHARS = 200


def build_registry(result: CheckResult, prefix: str = "") -> CollectorRegistry:
    """A fresh registry holding `result` as Messages' gauges; unmeasured durations left out."""
    ended = result.finished_at if result.finished_at is not None else time.time()
    values: dict[str, float | None] = {
        "selfcheck_start_time": result.started_at,
        "selfcheck_end_time": ended,
        "selfcheck_success": 1.0 if result.success else 0.0,
        "selfcheck_send_duration_seconds": result.send_time,
        "selfcheck_reception_duration_seconds": result.reception_time,
    }
    registry = CollectorRegistry()
    for name, value in values.items():
        if value is not None:
            Gauge(f"{prefix}{name}", GAUGES[name], registry=registry).set(value)
    return registry


def gateway_origin(url: str) -> str:
    """`scheme://host:port` of the Pushgateway URL (what logs may show of it)."""
    return _parse_gateway(url)[0]


def _parse_gateway(url: str) -> tuple[str, str | None]:
    """(`scheme://host:port`, the reason the URL cannot be pushed to, or None).

    A bare `host:port` means http, as in push_to_gateway. An out-of-range port is
    refused here: urllib would truncate it and connect to another port.
    """
    url = with_scheme(url)
    scheme = url.partition("://")[0].lower()
    invalid = f"{scheme}://<invalid address>"
    try:
        parts = urlsplit(url)
    except ValueError:  # an unclosed IPv6 bracket
        return invalid, "not a valid URL"
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        return invalid, "the port must be a number 1-65535"
    if scheme not in ("http", "https"):
        return invalid, "the scheme must be http or https"
    if not host:
        return invalid, "no host"
    if port == 0:
        return invalid, "the port must be a number 1-65535"
    port = port or (443 if scheme == "https" else 80)
    return f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}", None


def push_results(
    cfg: PushgatewayConfig, results: list[CheckResult], *, grouped: bool | None = None,
) -> None:
    """Push each result to the Pushgateway; log every outcome; never raise.

    `grouped` (default: more than one result) adds the route as a grouping key.
    A caller that checks a subset of several configured routes (`check --route`)
    should pass `grouped=True`, so the route lands in the group its full runs use.
    """
    try:
        _push_all(cfg, [r for r in results if not r.interrupted], grouped)
    except Exception as exc:  # a bug here must not change the check's exit code
        log.error("pushgateway_push_failed", url=gateway_origin(cfg.url),
                  error=_scrub(f"{type(exc).__name__}: {exc}", _secrets(cfg)))


class _Push:
    """One route's push, run in a daemon thread."""

    def __init__(self, cfg: PushgatewayConfig, result: CheckResult, grouped: bool) -> None:
        self.cfg = cfg
        self.result = result
        self.grouping_key = {"route": result.route} if grouped else None
        self.error: str | None = None
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name=f"pushgateway-{result.route}")

    def _run(self) -> None:
        cfg = self.cfg
        try:
            push_to_gateway(cfg.url, job=cfg.job, registry=build_registry(self.result, cfg.prefix),
                            grouping_key=self.grouping_key, timeout=cfg.timeout,
                            handler=_handler(cfg))
        except Exception as exc:
            self.error = _scrub(_describe(exc, cfg.timeout), _secrets(cfg))


def _push_all(cfg: PushgatewayConfig, results: list[CheckResult], grouped: bool | None) -> None:
    if grouped is None:
        grouped = len(results) > 1
    where, problem = _parse_gateway(cfg.url)
    if problem is not None:
        for result in results:
            log.error("pushgateway_push_failed", route=result.route, url=where,
                      error=f"invalid url: {problem}")
        return
    pushes = [_Push(cfg, result, grouped) for result in results]
    deadline = time.monotonic() + cfg.timeout + _JOIN_MARGIN
    for push in pushes:
        push.thread.start()
    for push in pushes:
        push.thread.join(max(0.0, deadline - time.monotonic()))
        route = push.result.route
        if push.thread.is_alive():  # left behind: a daemon thread dies with the process
            log.error("pushgateway_push_failed", route=route, url=where,
                      error=f"no answer within {cfg.timeout:g}s")
        elif push.error is not None:
            log.error("pushgateway_push_failed", route=route, url=where, error=push.error)
        else:
            log.info("pushgateway_pushed", route=route, url=where, job=cfg.job,
                     success=push.result.success)


def _handler(cfg: PushgatewayConfig) -> Callable[..., Callable[[], None]]:
    if cfg.username is None:
        return default_handler
    password = cfg.password.get_secret_value() if cfg.password is not None else ""
    return functools.partial(basic_auth_handler, username=cfg.username, password=password)


def _describe(exc: Exception, timeout: float) -> str:
    """One line a person can act on, from what urllib and push_to_gateway raise."""
    if isinstance(exc, urllib.error.HTTPError):
        body = ""
        try:
            body = " ".join(exc.read(_BODY_CHARS).decode("utf-8", "replace").split())
        except Exception:  # noqa: S110 - the status alone still says what happened
            pass
        finally:
            exc.close()
        return f"HTTP {exc.code} {exc.reason}" + (f": {body}" if body else "")
    if isinstance(exc, urllib.error.URLError):
        reason: Any = exc.reason
        if isinstance(reason, TimeoutError):
            return f"no answer within {timeout:g}s"
        if isinstance(reason, OSError) and reason.strerror:
            return reason.strerror
        return str(reason)
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g}s"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return f"{type(exc).__name__}: {exc}"


def _secrets(cfg: PushgatewayConfig) -> set[str]:
    try:
        found = url_secret_pieces(cfg.absolute_url)
    except ValueError:  # not parseable (an unclosed IPv6 bracket): hide all of it
        found = {cfg.url}
    if cfg.password is not None and len(cfg.password.get_secret_value()) >= MIN_SECRET_PIECE:
        found.add(cfg.password.get_secret_value())
    return found


def _scrub(text: str, secrets: Iterable[str]) -> str:
    return scrub(text, secrets)
