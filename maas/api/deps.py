"""Named dependencies, so a route reads
``def show(name: str, key: CurrentKey, registry: RegistryDep)``."""

from __future__ import annotations

from typing import Annotated, Protocol

from fastapi import Depends, Request

from maas.api import governance
from maas.auth.principal import Principal
from maas.auth.store import KeyStore, TenantStore
from maas.config import Settings
from maas.registry import Registry, VersionRecord


class ModelReadiness(Protocol):
    """Answers whether a version is loaded and can take inference requests: the model pool
    (``routing/``) once the server has started, ``NothingLoaded`` before."""

    def is_ready(self, record: VersionRecord) -> bool: ...


class NothingLoaded:
    def is_ready(self, record: VersionRecord) -> bool:
        return False


def get_registry(request: Request) -> Registry:
    return request.app.state.registry


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_readiness(request: Request) -> ModelReadiness:
    return request.app.state.readiness


def get_keys(request: Request) -> KeyStore:
    return request.app.state.keys


def get_tenants(request: Request) -> TenantStore:
    return request.app.state.tenants


RegistryDep = Annotated[Registry, Depends(get_registry)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
ReadinessDep = Annotated[ModelReadiness, Depends(get_readiness)]
KeysDep = Annotated[KeyStore, Depends(get_keys)]
TenantsDep = Annotated[TenantStore, Depends(get_tenants)]

CurrentKey = Annotated[Principal, Depends(governance.current_key)]
"""Any valid key, admitted under its request limits."""
InferenceKey = Annotated[Principal, Depends(governance.inference_key)]
"""Any valid key, admitted under its request and token limits and its budget."""
MaintainerKey = Annotated[Principal, Depends(governance.maintainer_key)]
AdminKey = Annotated[Principal, Depends(governance.admin_key)]
