"""docs/configuration.md documents every key of the config model, and nothing else."""

from __future__ import annotations

import re
import types
import typing
from pathlib import Path

from pydantic import BaseModel

from daemon.config import Config


def model_keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for name, field in model.model_fields.items():
        key = f"{prefix}{field.alias or name}"
        keys.add(key)
        for arg in _flatten(field.annotation):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                is_list = typing.get_origin(field.annotation) is list
                keys |= model_keys(arg, f"{key}[]." if is_list else f"{key}.")
    return keys


def _flatten(annotation: object) -> list[object]:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, list, typing.Annotated):
        return [a for arg in typing.get_args(annotation) for a in _flatten(arg)]
    return [annotation]


def test_reference_lists_every_key() -> None:
    """Each key of the model appears as a row of docs/configuration.md, and no stale rows."""
    doc = Path("docs/configuration.md").read_text(encoding="utf-8")
    reference = doc.split("## Every key", 1)[1]
    documented = set(re.findall(r"^\| `([^`]+)` \|", reference, flags=re.MULTILINE))
    expected = model_keys(Config)
    assert sorted(expected - documented) == [], "undocumented keys"
    assert sorted(documented - expected) == [], "documented keys that no longer exist"


def test_the_example_shows_every_key() -> None:
    """config.example.toml mentions every key of the model (set or commented out)."""
    text = Path("config.example.toml").read_text(encoding="utf-8")
    # Its header says once that any secret can also be given inline or by `*_env`.
    secret_variants = re.compile(r"\.(password|secret|url)(_env)?$")
    missing = []
    for key in sorted(model_keys(Config)):
        leaf = key.rpartition(".")[2].replace("[]", "")
        mentioned = re.search(rf"(^|[#\s\[.]){re.escape(leaf)}\s*(=|\])", text, re.M)
        if not mentioned and not secret_variants.search(key):
            missing.append(key)
    assert missing == []
