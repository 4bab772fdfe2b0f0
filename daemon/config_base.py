"""Building blocks shared by every config section: strict models, ports, URLs, secrets.

Every problem is reported in one pass. A rule about one key is a field validator
(it runs whatever else is wrong in the table); a rule between two scalar keys is
a field validator on the later one, reading the earlier from `info.data`; a rule
between keys or list items that may themselves be invalid is a `check_table`
hook, run on the table as written. Validators raise `ValueError` with the *rule*
only ("must be 1-65535"); the loader prefixes the key path.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, ClassVar, Self
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    ModelWrapValidatorHandler,
    SecretStr,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

# A problem found by a `check_table` hook: the key path inside the table, and the rule.
Problem = tuple[tuple[str | int, ...], str]


class StrictModel(BaseModel):
    """A config section: unknown keys are errors, values are not coerced loosely."""

    # inf and nan are TOML floats, but no interval, timeout or budget: `interval = inf`
    # passed validation and then failed the scheduler (at start, and half-way through a
    # reload).
    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)

    @classmethod
    def check_table(cls, table: dict[str, Any], info: ValidationInfo,
                    problems: list[Problem]) -> dict[str, Any]:
        """Check rules between keys on the table as written; return the table to validate.

        Runs before the fields are validated and whatever is wrong with them, so its
        problems come in the same pass as theirs. A value of the wrong type is left
        to its field's own error.
        """
        return table

    @model_validator(mode="wrap")
    @classmethod
    def _every_problem(cls, data: Any, handler: ModelWrapValidatorHandler[Self],
                       info: ValidationInfo) -> Self:
        problems: list[Problem] = []
        if isinstance(data, dict):
            data = cls.check_table(dict(data), info, problems)
        try:
            model = handler(data)
        except ValidationError as exc:
            if not problems:
                raise
            raise cls._errors(problems, exc.errors()) from None
        if problems:
            raise cls._errors(problems, [])
        return model

    @classmethod
    def _errors(cls, problems: list[Problem], errors: Iterable[Any]) -> ValidationError:
        """One error holding the fields' errors and the table's problems, in key order."""
        # A nested section's own rules come back with their type as a name: give it again.
        details: list[Any] = [
            {**e, "type": _rule_error(e["ctx"]["rule"])} if e["type"] == "config_rule" else e
            for e in errors]
        details += [InitErrorDetails(type=_rule_error(rule), loc=loc, input=None)
                    for loc, rule in problems]
        order: dict[str | int, int] = {}
        for i, (name, field) in enumerate(cls.model_fields.items()):
            order[name] = order[field.alias or name] = i
        details.sort(key=lambda e: order.get(e["loc"][0], len(order)) if e["loc"] else -1)
        return ValidationError.from_exception_data(cls.__name__, details)


def _rule_error(rule: str) -> PydanticCustomError:
    return PydanticCustomError("config_rule", "{rule}", {"rule": rule})


def table_value(item: Any, key: str, default: Any = None) -> Any:
    """`key` of a table as written, or of a section passed in already built."""
    if isinstance(item, dict):
        return item.get(key, default)
    return getattr(item, key, default) if isinstance(item, BaseModel) else default


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


def _check_is_file(value: Path) -> Path:
    if not value.is_file():
        raise ValueError(f"no such file: {value}")
    return value


def url_problem(url: str, *, secret: bool = False) -> str | None:
    """Why `url` is not a usable http(s) URL, or None. A secret URL's parts are never echoed."""
    if any(c.isspace() for c in url):
        return "must not contain spaces or line breaks"
    try:
        parts = urlsplit(url)
    except ValueError:  # an unclosed IPv6 bracket
        return "is not a valid URL"
    if parts.scheme not in ("http", "https") or not url.partition(":")[2].startswith("//"):
        return "must start with http:// or https://"
    if not parts.hostname:
        return "must name a host (http://HOST/...)"
    port = parts.netloc.rpartition("@")[2].rpartition("]")[2].partition(":")[2]
    if port and not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        return "port must be 1-65535" if secret else f"port must be 1-65535 (got {port})"
    return None


def _check_url(value: str) -> str:
    problem = url_problem(value)
    if problem:
        raise ValueError(problem)
    return value


def _check_secret_url(value: SecretStr) -> SecretStr:
    problem = url_problem(value.get_secret_value(), secret=True)
    if problem:
        raise ValueError(problem)
    return value


Port = Annotated[int, AfterValidator(_check_port)]
PositiveFloat = Annotated[float, AfterValidator(_check_positive)]
NonNegativeFloat = Annotated[float, AfterValidator(_check_non_negative)]
NonBlankStr = Annotated[str, AfterValidator(_check_not_blank)]
ExistingFile = Annotated[Path, AfterValidator(_check_is_file)]
# http(s)://HOST[:PORT][/...]
HttpUrl = Annotated[str, AfterValidator(_check_url)]
SecretHttpUrl = Annotated[SecretStr, AfterValidator(_check_secret_url)]


# Shorter pieces of a URL ("api", "push", "v1") are not secrets and would garble text.
MIN_SECRET_PIECE = 6


def _token_like(piece: str) -> bool:
    """A path segment or query value that may be a token (not "pushgateway", "status")."""
    if len(piece) >= 16:
        return True
    return (len(piece) >= MIN_SECRET_PIECE and any(c.isdigit() for c in piece)
            and any(c.isalpha() for c in piece))


def url_secret_pieces(url: str) -> set[str]:
    """The parts of a URL that may carry a token, to scrub from any text.

    The whole path, query and credentials, and every path segment or query
    value that looks like a token. Plain words ("api", "push", "pushgateway")
    are left alone: scrubbing them would garble messages, event names included.
    """
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    pieces = {p for p in (parts.path, parts.query, userinfo, userinfo.partition(":")[2])
              if len(p) >= MIN_SECRET_PIECE and p != "/"}
    candidates = parts.path.split("/") + [v for item in parts.query.split("&")
                                          for v in item.split("=")]
    pieces.update(p for p in candidates if _token_like(p))
    return pieces


def scrub(text: str, pieces: Iterable[str]) -> str:
    """`text` with each of `pieces` (longest first) replaced by `…`."""
    for piece in sorted(pieces, key=len, reverse=True):
        text = text.replace(piece, "…")
    return text


def url_origin(url: str) -> str:
    """`scheme://host:port` of a URL: what messages may show of one that carries a token."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port or _DEFAULT_PORTS.get(parts.scheme)
    except ValueError:
        return "<invalid url>"
    if not parts.scheme or not host:
        return "<invalid url>"
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{host}" + (f":{port}" if port is not None else "")


_DEFAULT_PORTS = {"http": 80, "https": 443}


def needs_username(table: dict[str, Any], problems: list[Problem]) -> None:
    """A password, given any way, needs a username."""
    if any(table.get(k) is not None for k in ("password", "password_file", "password_env")) \
            and not table.get("username"):
        problems.append((("username",), "required when a password is set"))


class SecretsModel(StrictModel):
    """A section with secrets, each given inline (`x`), by file (`x_file`) or env (`x_env`).

    The table is resolved before its fields are validated: the inline field gets
    the value whichever way it was given (callers read one place) and the other
    two are dropped. Files are read once at load time; a trailing newline (as
    `echo` and most secret stores write) is dropped.
    """

    secret_fields: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def check_table(cls, table: dict[str, Any], info: ValidationInfo,
                    problems: list[Problem]) -> dict[str, Any]:
        # load_config passes the environment it was given (tests pass their own).
        environ = (info.context or {}).get("environ", os.environ)
        for name in cls.secret_fields:
            given = [k for k in (name, f"{name}_file", f"{name}_env") if table.get(k) is not None]
            if len(given) > 1:
                problems.append(((given[1],), f"give only one of {', '.join(given)}"))
                continue
            path, env = table.get(f"{name}_file"), table.get(f"{name}_env")
            if isinstance(path, str | Path):
                try:
                    table[name] = Path(path).read_text(encoding="utf-8").rstrip("\r\n")
                except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
                    reason = getattr(exc, "strerror", None) or str(exc)
                    problems.append(((f"{name}_file",), f"cannot read {path}: {reason}"))
                    continue
                del table[f"{name}_file"]
            elif isinstance(env, str):
                if env not in environ:
                    problems.append(((f"{name}_env",),
                                     f"environment variable {env} is not set"))
                    continue
                table[name] = environ[env]
                del table[f"{name}_env"]
        return super().check_table(table, info, problems)
