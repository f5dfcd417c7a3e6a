"""Default sampling parameters of a text-generation model.

A request's field wins; a field it leaves out takes the model's own default (set at import or
later with ``maas models defaults``), then the version's ``generation_config.json`` (as vLLM
does by default), then OpenAI's default (temperature 1, top_p 1, no length cap in chat, 16
tokens in text completions). A default ``max_tokens`` is cut to what the context leaves; a
requested one that does not fit is an error.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from maas.errors import InvalidRequest


class SamplingDefaults(BaseModel):
    """The fields a model may have a default for, with the ranges a request has."""

    model_config = ConfigDict(extra="forbid")

    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    repetition_penalty: float | None = Field(default=None, gt=0, le=10)
    max_tokens: int | None = Field(default=None, ge=1)

    def set_fields(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


GENERATION_CONFIG_FIELDS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}
"""``generation_config.json`` key -> our field: the ones vLLM takes from it."""


def checked(values: dict[str, Any]) -> dict[str, Any]:
    """Validated defaults (400 naming the field otherwise), without the unset ones."""
    try:
        return SamplingDefaults.model_validate(values).set_fields()
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or None
        raise InvalidRequest(f"sampling default {field}: {first['msg']}", param=field) from None


def from_generation_config(config: dict[str, Any] | None) -> dict[str, Any]:
    """The defaults a version's ``generation_config.json`` sets; values out of range are
    skipped (a request could not have sent them either)."""
    found = {}
    for key, field in GENERATION_CONFIG_FIELDS.items():
        if (config or {}).get(key) is None:
            continue
        try:
            found |= checked({field: config[key]})
        except InvalidRequest:
            continue
    return found


def effective_defaults(
    generation_config: dict[str, Any] | None, model_defaults: dict[str, Any]
) -> dict[str, Any]:
    """The model's defaults over the version's ``generation_config.json``."""
    return {**from_generation_config(generation_config), **model_defaults}


def parse_assignments(assignments: list[str]) -> dict[str, Any]:
    """``["temperature=0.2", "max_tokens="]`` -> ``{"temperature": "0.2", "max_tokens": None}``
    (an empty value unsets the field); the values are checked by ``checked``."""
    parsed: dict[str, Any] = {}
    for item in assignments:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InvalidRequest(f"{item!r}: write FIELD=VALUE (FIELD= unsets it)")
        key = key.strip()
        if key not in SamplingDefaults.model_fields:
            known = ", ".join(SamplingDefaults.model_fields)
            raise InvalidRequest(f"unknown sampling default {key!r}; use one of: {known}")
        parsed[key] = value.strip() or None
    return parsed
