"""The `[drill]` config section: the queue-persistence drill (docs/drill.md).

Rules between this section and others (the route exists, the sender is one the
leak watcher allows) live in `daemon.config.Config.check_table`.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from daemon.config_base import (
    HttpUrl,
    NonBlankStr,
    NonNegativeFloat,
    PositiveFloat,
    Problem,
    StrictModel,
)

# Environments where the drill refuses to run: it stops a task and flips the sinkhole.
# Any of these words in the name counts (`prod-eu-west-1`, `eu_prod`, `prod2`), not a
# word that merely contains one (`preprod`, `nonprod`).
PRODUCTION = frozenset({"prod", "production", "prd", "live"})
_ENV_WORDS = re.compile(r"[a-z]+")

_SCHEDULE_WORDS = {"hourly": 3600.0, "daily": 86400.0, "weekly": 604800.0}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_UNIT = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def schedule_seconds(value: str) -> float:
    """`weekly`, `daily`, `hourly` or a duration like `7d`, `12h`, `90m`; ValueError if not."""
    word = value.strip().lower()
    if word in _SCHEDULE_WORDS:
        return _SCHEDULE_WORDS[word]
    match = _DURATION.fullmatch(word)
    if match is None:
        raise ValueError("must be weekly, daily, hourly or a duration like 7d, 12h, 90m")
    seconds = float(match.group(1)) * _UNIT[match.group(2)]
    if seconds < 600:
        raise ValueError("must be at least 10m (a drill stops a task and flips the sinkhole)")
    return seconds


class DrillSinkhole(StrictModel):
    """Where the sinkhole's mode is set: an SSM parameter, or a file for a local listener."""

    parameter: NonBlankStr | None = None
    mode_file: Path | None = None
    region: str | None = None
    endpoint_url: HttpUrl | None = None
    request_timeout: PositiveFloat = 10.0

    @classmethod
    def check_table(cls, table: dict[str, Any], info: ValidationInfo,
                    problems: list[Problem]) -> dict[str, Any]:
        if table.get("parameter") is not None and table.get("mode_file") is not None:
            problems.append((("mode_file",), "give only one of parameter, mode_file"))
        elif table.get("parameter") is None and table.get("mode_file") is None:
            table["parameter"] = "/cabal/sinkhole_mode"
        return super().check_table(table, info, problems)


class LocalDriver(StrictModel):
    """A cluster of processes on this machine, each task a set of command lines."""

    replicas: int = Field(default=2, ge=1, le=16)
    start: list[NonBlankStr] = Field(min_length=1)
    mailq: list[NonBlankStr] = Field(min_length=1)
    run_queue: list[NonBlankStr] = Field(min_length=1)
    work_dir: Path | None = None
    # SIGTERM to a stopped task's process group, then SIGKILL after this.
    stop_grace: PositiveFloat = 5.0
    # One mailq or queue run; a command that takes longer is killed and fails.
    command_timeout: PositiveFloat = 60.0


class EcsDriver(StrictModel):
    """The smtp-out service on ECS: ListTasks, StopTask, DescribeServices, ECS Exec."""

    cluster: NonBlankStr = "cabal-mail"
    service: NonBlankStr = "cabal-smtp-out"
    container: NonBlankStr = "smtp-out"
    region: str | None = None
    endpoint_url: HttpUrl | None = None
    request_timeout: PositiveFloat = 20.0
    mailq_command: NonBlankStr = "mailq"
    # MinQueueAge (5m on smtp-out) would skip a message younger than that: the drill
    # forces the retry, as the runbook means `sendmail -q -v` to.
    run_queue_command: NonBlankStr = "sendmail -q -v -OMinQueueAge=0"
    # One ECS Exec command, session included.
    exec_timeout: PositiveFloat = 120.0
    # How ECS Exec's Session Manager stream is spoken (docs/drill.md: why the plugin).
    session_manager_plugin: NonBlankStr = "session-manager-plugin"


class DrillConfig(StrictModel):
    driver: Literal["local", "ecs"]
    environment: NonBlankStr
    route: NonBlankStr = "default"
    sender: NonBlankStr
    local_part_prefix: NonBlankStr = "nobody"
    domain: NonBlankStr = "sinkhole.test"
    # The listener's mode cache: every flip waits this long (+1 s) to take effect.
    mode_cache: NonNegativeFloat = 30.0
    settle_timeout: PositiveFloat = 300.0
    # How long steps 3, 5 and 8 wait for mailq to show what they expect.
    queue_timeout: PositiveFloat = 120.0
    trigger: Literal["exec", "wait"] = "exec"
    retry_timeout: PositiveFloat = 1200.0
    poll_interval: PositiveFloat = 2.0
    # What the deferral must say (step 3 and 5): the sinkhole's defer reply.
    deferral: NonBlankStr = "421 4.3.2"
    # Use the [leakwatch] log source (cloudwatch or file) as evidence.
    logs: bool = True
    # The cleanup's time when nothing interrupted the drill (drain, park, retries).
    cleanup_timeout: PositiveFloat = 300.0
    # After SIGTERM/Ctrl-C the cleanup fits in this (ECS kills 30 s after SIGTERM).
    interrupt_budget: PositiveFloat = Field(default=25.0, le=28.0)
    # `selfcheckd run` runs the drill this often (weekly, daily, 7d, 12h); off when unset.
    schedule: NonBlankStr | None = None
    # Every scheduled run's journal is written here (the newest 50 kept).
    journal_dir: Path | None = None
    # Held while a drill runs: two drills on one host never overlap.
    lock_file: Path = Field(
        default_factory=lambda: Path(tempfile.gettempdir()) / "selfcheckd-drill.lock")
    sinkhole: DrillSinkhole = Field(default_factory=DrillSinkhole)
    local: LocalDriver | None = None
    ecs: EcsDriver | None = None

    @field_validator("schedule")
    @classmethod
    def _check_schedule(cls, value: str | None) -> str | None:
        if value is not None:
            schedule_seconds(value)
        return value

    @field_validator("sender")
    @classmethod
    def _check_sender(cls, value: str) -> str:
        local, at, domain = value.rpartition("@")
        if not at or not local or not domain or any(c.isspace() for c in value):
            raise ValueError("must be an email address like qp-test-drill@example.com")
        return value

    @field_validator("local_part_prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9._+-]+", value):
            raise ValueError("must be letters, digits and . _ + - only")
        return value

    @classmethod
    def check_table(cls, table: dict[str, Any], info: ValidationInfo,
                    problems: list[Problem]) -> dict[str, Any]:
        if table.get("driver") == "local" and table.get("local") is None:
            problems.append((("local",), 'required when driver = "local" '
                             "(start, mailq and run_queue commands)"))
        if table.get("driver") == "ecs" and table.get("ecs") is None:
            table["ecs"] = {}
        return super().check_table(table, info, problems)

    @property
    def refused(self) -> bool:
        return any(word in PRODUCTION
                   for word in _ENV_WORDS.findall(self.environment.lower()))

    @property
    def schedule_interval(self) -> float | None:
        return schedule_seconds(self.schedule) if self.schedule is not None else None

    def summary(self) -> dict[str, Any]:
        """What the journal says of the configuration (no secrets live in this section)."""
        out: dict[str, Any] = self.model_dump(
            mode="json", exclude={"local", "ecs", "sinkhole", "lock_file", "journal_dir"})
        out["sinkhole"] = ({"parameter": self.sinkhole.parameter} if self.sinkhole.parameter
                           else {"mode_file": str(self.sinkhole.mode_file)})
        if self.driver == "ecs" and self.ecs is not None:
            out["ecs"] = {"cluster": self.ecs.cluster, "service": self.ecs.service,
                          "container": self.ecs.container}
        if self.driver == "local" and self.local is not None:
            out["local"] = {"replicas": self.local.replicas}
        return out
