"""What every command needs: settings from the environment and the registry they name."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from pydantic import ValidationError

from maas import registry as registry_module
from maas.config import Settings
from maas.errors import InvalidRequest
from maas.registry import Registry


def load_settings(**overrides: object) -> Settings:
    """Settings from MAAS_* variables; a bad value becomes one readable error."""
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        raise InvalidRequest(f"invalid setting MAAS_{field.upper()}: {first['msg']}") from None


@contextmanager
def open_registry() -> Iterator[Registry]:
    registry = registry_module.open_registry(load_settings())
    try:
        yield registry
    finally:
        registry.close()
