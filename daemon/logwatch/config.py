"""The `[leakwatch]` config section: where mail log lines come from and what counts as a leak.

Every key has a default, so `scan --file` works with an empty `LeakWatchConfig()`.
docs/leakwatch.md lists each key with its default.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, SecretStr, ValidationInfo, field_validator

from daemon.config_base import (
    HttpUrl,
    NonBlankStr,
    NonNegativeFloat,
    PositiveFloat,
    Problem,
    SecretsModel,
    StrictModel,
    table_value,
)


@dataclass(frozen=True)
class S3Location:
    """`s3://bucket/key`: the leak watcher's state as one S3 object (daemon/state_s3.py)."""

    bucket: str
    key: str

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


# S3 bucket names: 3-63 lowercase letters, digits, dots and hyphens, not starting or
# ending with a dot or hyphen.
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def _state_location(value: Any) -> Any:
    """`s3://bucket/key` strings become an S3Location; anything else is left to Path."""
    if not (isinstance(value, str) and value[:5].lower() == "s3://"):
        return value
    bucket, _, key = value[5:].partition("/")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise ValueError(f"s3://BUCKET/KEY: {bucket!r} is not an S3 bucket name")
    if not key or key.endswith("/"):
        raise ValueError("s3://BUCKET/KEY: give the object's key, not a prefix")
    return S3Location(bucket, key)


StateLocation = Annotated[Path | S3Location, BeforeValidator(_state_location)]


class CloudWatchSource(StrictModel):
    """FilterLogEvents polling of the smtp-out log group(s)."""

    log_groups: list[NonBlankStr] = Field(default_factory=lambda: ["/ecs/cabal-smtp-out"])
    stream_prefix: str | None = "smtp-out"
    # Server-side filter; "" fetches every line (needed for sender correlation
    # without the second, targeted query).
    filter_pattern: str = ""
    region: str | None = None
    endpoint_url: HttpUrl | None = None
    poll_interval: PositiveFloat = 10.0
    # Re-queried on every poll so late-ingested events are still seen.
    overlap: PositiveFloat = 300.0
    # How far back the first poll reaches when there is no checkpoint.
    lookback: NonNegativeFloat = 900.0
    # Alias of `[leakwatch] state_file`, the key of earlier releases.
    state_file: Path | None = None
    request_timeout: PositiveFloat = 20.0
    max_backoff: PositiveFloat = 300.0
    # Bound on remembered event ids (each lives for `overlap` seconds anyway).
    max_seen_events: int = Field(default=200_000, ge=1000)
    # With a filter pattern, from= lines are not fetched: look the sender up by
    # queue id within this window before the delivery line (0 disables).
    sender_lookup_window: NonNegativeFloat = 86400.0
    # FilterLogEvents `limit` (events per page); unset lets the service decide.
    page_size: int | None = Field(default=None, ge=1, le=10_000)

    @field_validator("log_groups")
    @classmethod
    def _at_least_one(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("must list at least one log group")
        return value


class FileSource(StrictModel):
    """A local mail log followed like `tail -F`."""

    path: Path = Path("/var/log/maillog")
    poll_interval: PositiveFloat = 1.0
    # Start at the end (like tail -F) or read the whole file first.
    from_beginning: bool = False


class AlertWebhook(SecretsModel):
    """Cabalmail alert_sink compatible webhook (POST summary/severity/source)."""

    url: HttpUrl
    secret: SecretStr | None = None
    secret_file: Path | None = None
    secret_env: str | None = None
    source: NonBlankStr = "selfcheckd-leakwatch"
    severity: Literal["critical", "warning", "info"] = "critical"
    timeout: PositiveFloat = 10.0
    # Undelivered alerts are retried after backoff, doubling up to max_backoff,
    # until the webhook accepts them or they are max_age old. (max_backoff comes
    # first: backoff's rule reads it.)
    max_backoff: PositiveFloat = 300.0
    backoff: PositiveFloat = Field(default=1.0, validate_default=True)
    max_age: PositiveFloat = 86400.0
    # Requests in flight at once, so one hanging request never holds back the rest.
    max_concurrent: int = Field(default=4, ge=1, le=64)
    # At most `rate_limit` alerts start per `rate_period` seconds; the rest are
    # folded into one digest alert.
    rate_limit: int = Field(default=10, ge=1)
    rate_period: PositiveFloat = 60.0
    # Alerts held pending at most (a digest included); a flood beyond it is folded into
    # one digest that counts it, so the outbox and the state file stay small.
    max_pending: int = Field(default=1000, ge=10, le=10_000)
    # Also send blindness and sinkhole-mode warnings (severity "warning").
    send_warnings: bool = True

    secret_fields = ("secret",)

    @field_validator("backoff")
    @classmethod
    def _backoff_below_max(cls, value: float, info: ValidationInfo) -> float:
        max_backoff = info.data.get("max_backoff")  # absent when itself invalid
        if max_backoff is not None and value > max_backoff:
            raise ValueError("must not be greater than max_backoff")
        return value


class SinkholeModeWatch(StrictModel):
    """Poll the SSM parameter that sets the sinkhole's behaviour."""

    enabled: bool = False
    parameter: NonBlankStr = "/cabal/sinkhole_mode"
    interval: PositiveFloat = 60.0
    # Warn when the mode stays accept/accept-log longer than this.
    max_accept_duration: PositiveFloat = 3600.0
    region: str | None = None
    endpoint_url: HttpUrl | None = None
    request_timeout: PositiveFloat = 10.0


class LeakWatchConfig(StrictModel):
    """Settings of the smtp-out log watcher."""

    source: Literal["cloudwatch", "file", "stdin"] = "cloudwatch"
    domains: list[NonBlankStr] = Field(default_factory=lambda: ["sinkhole.test"])
    # Glob patterns (case-insensitive) of senders whose sinkhole mail is expected.
    allowed_senders: list[NonBlankStr] = Field(default_factory=lambda: ["qp-test-*@*"])
    # Warn when sendmail lines flow but no to= line was seen for this long.
    blind_after: PositiveFloat = 3600.0
    # Bounds on the queue-id -> sender map and the alerted (queue id, recipient) set.
    max_tracked_queue_ids: int = Field(default=100_000, ge=100)
    # Queue health (docs/queue-health.md): a message with no line for this long is
    # forgotten (6 days: past sendmail's 5-day queue return), and at most this many
    # messages are tracked and saved in the state file.
    queue_retention: PositiveFloat = 518_400.0
    max_tracked_messages: int = Field(default=20_000, ge=100, le=100_000)
    # A deferred message with no line for this long is silent: no queue runner retries it
    # (2700 s: three of sendmail's 15-minute queue runs).
    queue_silent_after: PositiveFloat = 2700.0
    # Where the watcher keeps what must survive a restart: the source's position
    # (CloudWatch cursor, file offset), the detector's memory, undelivered alerts.
    # A path, or s3://bucket/key (read whole at takeover, written conditionally).
    state_file: StateLocation | None = None
    cloudwatch: CloudWatchSource = Field(default_factory=CloudWatchSource)
    file: FileSource = Field(default_factory=FileSource)
    alert: AlertWebhook | None = None
    sinkhole_mode: SinkholeModeWatch = Field(default_factory=SinkholeModeWatch)

    @classmethod
    def check_table(cls, table: dict[str, Any], info: ValidationInfo,
                    problems: list[Problem]) -> dict[str, Any]:
        main, alias = table.get("state_file"), table_value(table.get("cloudwatch"), "state_file")
        if isinstance(main, str | Path) and isinstance(alias, str | Path) \
                and str(main) != str(alias):
            problems.append((("cloudwatch", "state_file"),
                             "conflicts with leakwatch.state_file (give only one)"))
        return super().check_table(table, info, problems)

    @property
    def state_path(self) -> Path | None:
        """The state file, whichever key gave it (None when the state is in S3)."""
        if isinstance(self.state_file, S3Location):
            return None
        return self.state_file if self.state_file is not None else self.cloudwatch.state_file

    @field_validator("queue_silent_after")
    @classmethod
    def _silent_before_forgotten(cls, value: float, info: ValidationInfo) -> float:
        retention = info.data.get("queue_retention")
        if isinstance(retention, float) and value >= retention:
            raise ValueError(f"must be shorter than leakwatch.queue_retention ({retention:g} s): "
                             "a message is forgotten before it could be silent")
        return value

    @property
    def state_s3(self) -> S3Location | None:
        """The state's S3 object, when `state_file` is an s3:// URL."""
        return self.state_file if isinstance(self.state_file, S3Location) else None

    @field_validator("domains")
    @classmethod
    def _domains(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("must list at least one domain")
        for d in value:
            if "@" in d or any(c.isspace() for c in d):
                raise ValueError(f"not a domain name: {d!r}")
        return value
