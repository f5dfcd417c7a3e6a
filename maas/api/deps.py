"""Named dependencies, so a route reads ``def show(name: str, registry: RegistryDep)``."""

from __future__ import annotations

from typing import Annotated, Protocol

from fastapi import Depends, Request

from maas.config import Settings
from maas.registry import Registry, VersionRecord


class ModelReadiness(Protocol):
    """Answers whether a version is loaded and can take inference requests.

    The model pool (``routing/``) implements it once runtimes exist; until then nothing is.
    """

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


RegistryDep = Annotated[Registry, Depends(get_registry)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
ReadinessDep = Annotated[ModelReadiness, Depends(get_readiness)]
