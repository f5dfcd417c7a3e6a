"""Model names, alias names and references (``name``, ``name:3``, ``name@alias``)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from maas.errors import InvalidName, InvalidReference

MODEL_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,127}")
ALIAS_NAME = re.compile(r"[a-z][a-z0-9._-]{0,63}")

LATEST = "latest"
"""A built-in alias: always the newest version. It cannot be set by hand."""
PRODUCTION = "production"
"""The alias a bare model name resolves to when it is set."""


def validate_model_name(name: str, *, kind: str = "model") -> str:
    """Model names (and tenant names, which follow the same rule)."""
    if not isinstance(name, str) or not MODEL_NAME.fullmatch(name):
        raise InvalidName(
            f"invalid {kind} name {name!r}: use 1 to 128 lowercase letters, digits, '-', '_' "
            "or '.', starting with a letter or digit",
            param="name",
        )
    return name


def validate_alias_name(alias: str) -> str:
    if not isinstance(alias, str) or not ALIAS_NAME.fullmatch(alias):
        raise InvalidName(
            f"invalid alias {alias!r}: use 1 to 64 lowercase letters, digits, '-', '_' or '.', "
            "starting with a letter",
            param="alias",
        )
    if alias == LATEST:
        raise InvalidName(
            "'latest' is built in (it always means the newest version)", param="alias"
        )
    return alias


@dataclass(frozen=True)
class Reference:
    """A parsed model reference. At most one of ``version`` and ``alias`` is set."""

    name: str
    version: int | None = None
    alias: str | None = None

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}:{self.version}"
        if self.alias is not None:
            return f"{self.name}@{self.alias}"
        return self.name


def parse_reference(text: str) -> Reference:
    """Parse ``name``, ``name:3`` or ``name@alias``; raise InvalidReference otherwise."""
    if not isinstance(text, str) or not text:
        raise InvalidReference("empty model reference", param="model")
    name, sep_version, version = text.partition(":")
    name, sep_alias, alias = name.partition("@")
    if sep_version and sep_alias:
        raise InvalidReference(
            f"invalid model reference {text!r}: give a version (name:3) or an alias "
            "(name@production), not both",
            param="model",
        )
    try:
        validate_model_name(name)
    except InvalidName as err:
        raise InvalidReference(
            f"invalid model reference {text!r}: {err.message}", param="model"
        ) from None
    if sep_version:
        if not version.isdigit() or version.startswith("0") or not version.isascii():
            raise InvalidReference(
                f"invalid model reference {text!r}: the version must be a number from 1 up",
                param="model",
            )
        return Reference(name, version=int(version))
    if sep_alias:
        if alias != LATEST and not ALIAS_NAME.fullmatch(alias):
            raise InvalidReference(
                f"invalid model reference {text!r}: {alias!r} is not a valid alias", param="model"
            )
        return Reference(name, alias=alias)
    return Reference(name)
