"""The watcher's state file: CloudWatch cursor + seen event ids + detector memory.

Written atomically (temp file + rename) so an ECS task killed mid-write leaves
the previous checkpoint intact. A missing or unreadable file means "no
checkpoint": the watcher then looks back `cloudwatch.lookback` seconds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger()

VERSION = 1
# The detector's memory is bounded in the file too, so a write stays small.
MAX_PERSISTED_ENTRIES = 20_000


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("leakwatch_checkpoint_unreadable", path=str(path), error=str(exc))
        return None
    if not isinstance(data, dict) or data.get("version") != VERSION:
        log.warning("leakwatch_checkpoint_ignored", path=str(path), reason="unknown format")
        return None
    return data


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    payload = json.dumps({"version": VERSION, **state}, separators=(",", ":"))
    with tmp.open("w", encoding="utf-8") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def trim(entries: list[Any]) -> list[Any]:
    return entries[-MAX_PERSISTED_ENTRIES:]
