"""Getting word out: the alert outbox (at-least-once, persisted) and heartbeat pings."""

from __future__ import annotations

from collections.abc import Callable

import aiohttp

from daemon import __version__

SessionFactory = Callable[[], aiohttp.ClientSession]


def default_session() -> aiohttp.ClientSession:
    """The HTTP client session of a delivery component (one per component, owned by it)."""
    return aiohttp.ClientSession(headers={"User-Agent": f"selfcheckd/{__version__}"})
