"""Building blocks shared by every config section: strict models, ports, secrets.

Validators raise `ValueError` with the *rule* only ("must be 1-65535"); the
loader prefixes the key path. A rule that belongs to a sibling key of the model
being validated is written `@key: rule` so the loader can put the key in the path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, ClassVar
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    SecretStr,
    ValidationInfo,
    model_validator,
)


class StrictModel(BaseModel):
    """A config section: unknown keys are errors, values are not coerced loosely."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def _check_port(value: int) -> int:
    if not 1 <= value <= 65535:
        raise ValueError("must be 1-65535")
    return value


def _check_positive(value: float) -> float:
    if value <= 0:
        raise ValueError("must be greater than 0")
    return value


def _check_non_negative(value: float) -> float:
    if value < 0:
        raise ValueError("must be 0 or more")
    return value


def _check_not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


Port = Annotated[int, AfterValidator(_check_port)]
PositiveFloat = Annotated[float, AfterValidator(_check_positive)]
NonNegativeFloat = Annotated[float, AfterValidator(_check_non_negative)]
NonBlankStr = Annotated[str, AfterValidator(_check_not_blank)]


# Shorter pieces of a URL ("api", "push", "v1") are not secrets and would garble text.
MIN_SECRET_PIECE = 6


def url_secret_pieces(url: str) -> set[str]:
    """The parts of a URL that may carry a token: path segments, query items, credentials."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    pieces = {url, parts.path, parts.query, userinfo, *userinfo.split(":")}
    pieces.update(parts.path.split("/"))
    for item in parts.query.split("&"):
        pieces.update(item.split("="))
    return {p for p in pieces if len(p) >= MIN_SECRET_PIECE}


def key_error(key: str, rule: str) -> ValueError:
    """An error about `key`, a sibling field of the model being validated."""
    return ValueError(f"@{key}: {rule}")


class SecretsModel(StrictModel):
    """A section with secrets, each given inline (`x`), by file (`x_file`) or env (`x_env`).

    After validation the inline field holds the value whichever way it was given,
    so callers read one place. Files are read once at load time; a trailing
    newline (as `echo` and most secret stores write) is dropped.
    """

    secret_fields: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="after")
    def _resolve_secrets(self, info: ValidationInfo) -> Any:
        # load_config passes the environment it was given (tests pass their own).
        environ = (info.context or {}).get("environ", os.environ)
        for name in self.secret_fields:
            inline: SecretStr | None = getattr(self, name)
            path: Path | None = getattr(self, f"{name}_file")
            env: str | None = getattr(self, f"{name}_env")
            given = [k for k, v in ((name, inline), (f"{name}_file", path),
                                    (f"{name}_env", env)) if v is not None]
            if len(given) > 1:
                raise key_error(given[1], f"give only one of {', '.join(given)}")
            if path is not None:
                try:
                    text = path.read_text(encoding="utf-8").rstrip("\r\n")
                except OSError as exc:
                    raise key_error(f"{name}_file", f"cannot read {path}: {exc.strerror}") from None
                setattr(self, name, SecretStr(text))
                # Resolved: leave one way of giving it, so re-validating a built
                # model does not report "give only one of".
                setattr(self, f"{name}_file", None)
            elif env is not None:
                value = environ.get(env)
                if value is None:
                    raise key_error(f"{name}_env", f"environment variable {env} is not set")
                setattr(self, name, SecretStr(value))
                setattr(self, f"{name}_env", None)
        return self
