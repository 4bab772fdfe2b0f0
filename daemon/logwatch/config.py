"""The `[leakwatch]` config section (placeholder: the leak-watcher work fills it in)."""

from __future__ import annotations

from daemon.config_base import StrictModel


class LeakWatchConfig(StrictModel):
    """Settings of the smtp-out log watcher."""

    domains: list[str] = ["sinkhole.test"]
