"""Model names, alias names and references (``name``, ``name:3``, ``name@alias``).

A fine-tuning job names its model as OpenAI does, ``ft:<base>:<suffix>:<id>`` (the suffix may be
empty). Such a name holds colons, so a reference to it is read by its shape: the ``ft:`` name is
its first four colon-separated parts, and a fifth part is the version
(``ft:base:suffix:id:2``); ``@alias`` follows the name as usual. Only fine-tuning jobs make
models with these names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from maas.errors import InvalidName, InvalidReference

MODEL_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,127}")
ALIAS_NAME = re.compile(r"[a-z][a-z0-9._-]{0,63}")
FINE_TUNED_PREFIX = "ft:"
FINE_TUNED_NAME = re.compile(r"ft:[a-z0-9][a-z0-9._-]*:[a-z0-9._-]*:[a-z0-9]+")
SUFFIX = re.compile(r"[a-z0-9._-]{0,64}")
MAX_NAME = 128

LATEST = "latest"
"""A built-in alias: always the newest version. It cannot be set by hand."""
PRODUCTION = "production"
"""The alias a bare model name resolves to when it is set."""


def validate_model_name(name: str, *, kind: str = "model") -> str:
    """Model names (and tenant names, which follow the same rule but for the ``ft:`` form)."""
    if kind == "model" and is_fine_tuned_name(name):
        return name
    if not isinstance(name, str) or not MODEL_NAME.fullmatch(name):
        raise InvalidName(
            f"invalid {kind} name {name!r}: use 1 to 128 lowercase letters, digits, '-', '_' "
            "or '.', starting with a letter or digit",
            param="name",
        )
    return name


def is_fine_tuned_name(name: object) -> bool:
    return isinstance(name, str) and len(name) <= MAX_NAME and bool(FINE_TUNED_NAME.fullmatch(name))


def fine_tuned_name(base: str, suffix: str, job_id: str) -> str:
    """``ft:<base>:<suffix>:<id>`` for a job's model; InvalidName when it cannot be made
    (``job_id`` is letters and digits)."""
    if not SUFFIX.fullmatch(suffix):
        raise InvalidName(
            f"invalid suffix {suffix!r}: use up to 64 lowercase letters, digits, '-', '_' or '.'",
            param="suffix",
        )
    name = f"{FINE_TUNED_PREFIX}{base}:{suffix}:{job_id}"
    if not is_fine_tuned_name(name):
        raise InvalidName(
            f"the fine-tuned model's name {name!r} would be {len(name)} characters, over "
            f"{MAX_NAME}: use a shorter suffix",
            param="suffix",
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
    """Parse ``name``, ``name:3`` or ``name@alias`` (``ft:`` names too, see above); raise
    InvalidReference otherwise."""
    if not isinstance(text, str) or not text:
        raise InvalidReference("empty model reference", param="model")
    if text.startswith(FINE_TUNED_PREFIX):
        head, sep_alias, alias = text.partition("@")
        parts = head.split(":")
        name = ":".join(parts[:4])
        sep_version, version = (":", ":".join(parts[4:])) if len(parts) > 4 else ("", "")
    else:
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
