"""What every command needs: settings from the environment and the stores they name."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from pydantic import ValidationError

from maas import registry as registry_module
from maas.auth.bootstrap import open_stores
from maas.auth.store import KeyStore, TenantStore
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
    os.umask(0o077)
    registry = registry_module.open_registry(load_settings())
    try:
        yield registry
    finally:
        registry.close()


@dataclass
class Access:
    settings: Settings
    registry: Registry
    keys: KeyStore
    tenants: TenantStore


@contextmanager
def open_access() -> Iterator[Access]:
    """The registry and the key and tenant stores, straight on the database (no key needed:
    whoever can read MAAS_HOME is the operator)."""
    settings = load_settings()
    with open_registry() as registry:
        keys, tenants = open_stores(settings, registry.engine)
        yield Access(settings, registry, keys, tenants)
