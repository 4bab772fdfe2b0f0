"""structlog setup: the seed's exact key=value lines, or JSON, for ours and stdlib loggers.

The key=value format prints the event first, then `key=value` pairs with
lowercase booleans and floats to 3 decimals, so a result renders exactly as
`selfcheck_completed success=true send_time=0.150 reception_time=2.340`.
Timestamps and levels are left to the log shipper (awslogs, journald) in that
format unless `timestamps` is on: then each line starts with the UTC time and
the level, `2026-11-23T19:30:26.073041Z info `, and the seed's part follows
unchanged. The JSON format always carries both. Every record is one line, tracebacks
included (quoted, newlines escaped): one line is one CloudWatch event.
`install_exception_hooks` routes what would otherwise reach stderr raw (the
event loop's exception handler, `sys.unraisablehook`) through the same path.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import threading
import traceback
from collections.abc import Callable, Iterable, MutableMapping
from typing import TYPE_CHECKING, Any, TextIO

import structlog

if TYPE_CHECKING:
    from daemon.metrics import Metrics

# Keys rendered as quoted strings always, so a message that happens to have no
# spaces still reads `error="..."` as in the seed.
_ALWAYS_QUOTED = frozenset({"error", "msg", "reason_detail", "cleanup_error", "exception"})
# structlog/stdlib bookkeeping that the key=value format leaves out.
_HIDDEN = frozenset({"level", "timestamp", "logger", "_record", "_from_structlog"})


# Values that must never reach a log line, longest first (see redact_secrets).
_secrets: tuple[str, ...] = ()


def redact_secrets(values: Iterable[str]) -> None:
    """From now on, replace each of `values` by `…` wherever it appears in a log record.

    The last line of defence: code logs no secret on purpose, but an exception
    raised deep in a library (an IMAP command's repr, a URL in a client error)
    can carry one into a traceback.
    """
    global _secrets
    _secrets = tuple(sorted({v for v in values if len(v) >= 6}, key=len, reverse=True))


# The longest value a log field carries (a traceback excepted): a peer answering garbage
# must not write lines that log shippers with a line limit choke on.
MAX_FIELD = 2000


def shorten(text: str, limit: int) -> str:
    """`text`, cut to `limit` characters with a `…` when longer."""
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _bound(_logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> Any:
    for key, value in event_dict.items():
        if key != "exception" and isinstance(value, str) and len(value) > MAX_FIELD:
            event_dict[key] = shorten(value, MAX_FIELD)
    return event_dict


def _redact(_logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> Any:
    if _secrets:
        for key, value in event_dict.items():
            if isinstance(value, str) and any(s in value for s in _secrets):
                for secret in _secrets:
                    value = value.replace(secret, "…")
                event_dict[key] = value
    return event_dict


def _format_value(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.3f}"
    if value is None:
        return "null"
    if isinstance(value, int):
        return str(value)
    text = str(value)
    if key in _ALWAYS_QUOTED or not text or any(c in text for c in ' ="\\\n\t'):
        return json.dumps(text, ensure_ascii=False)
    return text


def render_kv(_logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> str:
    """Render `event k=v ...` in insertion order (the order the caller passed keys)."""
    event = str(event_dict.pop("event", ""))
    parts = [event]
    parts += [f"{k}={_format_value(k, v)}" for k, v in event_dict.items() if k not in _HIDDEN]
    return " ".join(parts)


def render_kv_stamped(logger: Any, name: str, event_dict: MutableMapping[str, Any]) -> str:
    """`<UTC ISO-8601 time> <level> ` before the `event k=v ...` line, which stays as is."""
    stamp, level = event_dict.get("timestamp", "-"), event_dict.get("level", "-")
    return f"{stamp} {level} {render_kv(logger, name, event_dict)}"


def configure_logging(
    fmt: str = "kv", level: str = "info", stream: TextIO | None = None, *,
    timestamps: bool = False,
) -> None:
    """Route structlog and stdlib logging (aiohttp, aiobotocore) through one renderer.

    `timestamps`: kv lines start with the time and the level (JSON always has both)."""
    kv = render_kv_stamped if timestamps else render_kv
    renderer: Any = kv if fmt == "kv" else structlog.processors.JSONRenderer()
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    # Both formats: the traceback becomes the `exception` field of the one line,
    # and no secret survives into any field.
    shared += [structlog.processors.format_exc_info, _redact, _bound]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=shared,
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Library chatter that is noise at info level (and aioimaplib logs commands).
    # pymap and aiosmtpd ("mail.log") only run in the embedded demo stack.
    for noisy in ("aioimaplib", "aiobotocore", "botocore", "mail.log", "aiohttp.access", "pymap",
                  "asyncio"):  # asyncio: "Using selector: EpollSelector" in --verbose
        logging.getLogger(noisy).setLevel(logging.WARNING)


def install_exception_hooks(
    loop: asyncio.AbstractEventLoop, metrics: Metrics | None = None,
) -> Callable[[], None]:
    """Log what escapes its owner through structlog, counted; returns an undo function.

    The event loop's handler gets exceptions of tasks nobody awaited and of
    callbacks; `sys.unraisablehook` gets those raised where nothing can catch
    them (a coroutine's `finally` during garbage collection, `__del__`);
    `threading.excepthook` those of threads (the stdin reader, state writes).
    """
    hooks_log = structlog.get_logger("daemon.internal")

    def count(kind: str) -> None:
        if metrics is not None:
            metrics.internal_errors.labels(kind=kind).inc()

    def loop_handler(_loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        count("event_loop")
        exc = context.get("exception")
        hooks_log.error("event_loop_error", msg=str(context.get("message", "")),
                        exc_info=exc if isinstance(exc, BaseException) else None)

    def thread_exception(args: threading.ExceptHookArgs) -> None:
        count("thread")
        exc = args.exc_value
        hooks_log.error("thread_exception",
                        msg=f"in thread {args.thread.name if args.thread else '?'}",
                        exc_info=exc if isinstance(exc, BaseException) else None)

    def unraisable(info: Any) -> None:
        count("unraisable")
        exc = info.exc_value
        where = info.err_msg or "Exception ignored in"
        hooks_log.warning("unraisable_exception", msg=f"{where}: {info.object!r}",
                          error=f"{type(exc).__name__}: {exc}" if exc else None,
                          exception="".join(traceback.format_exception(exc)).strip()
                          if exc else None)

    previous_handler = loop.get_exception_handler()
    previous_hooks = sys.unraisablehook, threading.excepthook
    loop.set_exception_handler(loop_handler)
    sys.unraisablehook = unraisable
    threading.excepthook = thread_exception

    def undo() -> None:
        if not loop.is_closed():
            loop.set_exception_handler(previous_handler)
        sys.unraisablehook, threading.excepthook = previous_hooks

    return undo
