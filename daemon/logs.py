"""structlog setup: the seed's exact key=value lines, or JSON, for ours and stdlib loggers.

The key=value format prints the event first, then `key=value` pairs with
lowercase booleans and floats to 3 decimals, so a result renders exactly as
`selfcheck_completed success=true send_time=0.150 reception_time=2.340`.
Timestamps and levels are left to the log shipper (awslogs, journald) in that
format; the JSON format carries both.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

# Keys rendered as quoted strings always, so a message that happens to have no
# spaces still reads `error="..."` as in the seed.
_ALWAYS_QUOTED = frozenset({"error", "msg", "reason_detail", "cleanup_error"})
# structlog/stdlib bookkeeping that the key=value format leaves out.
_HIDDEN = frozenset({"level", "timestamp", "logger", "_record", "_from_structlog"})


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
    exc = event_dict.pop("exception", None)
    parts = [event]
    parts += [f"{k}={_format_value(k, v)}" for k, v in event_dict.items() if k not in _HIDDEN]
    line = " ".join(parts)
    if exc:
        line += "\n" + str(exc)
    return line


def configure_logging(fmt: str = "kv", level: str = "info", stream: TextIO | None = None) -> None:
    """Route structlog and stdlib logging (aiohttp, aiobotocore) through one renderer."""
    renderer: Any = render_kv if fmt == "kv" else structlog.processors.JSONRenderer()
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if fmt == "json":
        shared.append(structlog.processors.format_exc_info)
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
    for noisy in ("aioimaplib", "aiobotocore", "botocore", "mail.log", "aiohttp.access", "pymap"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
