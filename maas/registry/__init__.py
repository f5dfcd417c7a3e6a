"""The model registry: models, immutable versions, movable aliases, and their files.

Exports load lazily, so a runtime can use the records and manifest types without pulling in
the database layer.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "NoProgress": "maas.registry.importer",
    "Progress": "maas.registry.importer",
    "TASKS": "maas.registry.manifest",
    "Manifest": "maas.registry.manifest",
    "Reference": "maas.registry.names",
    "parse_reference": "maas.registry.names",
    "ModelRecord": "maas.registry.records",
    "OpenedVersion": "maas.registry.records",
    "VersionRecord": "maas.registry.records",
    "Registry": "maas.registry.service",
    "open_registry": "maas.registry.service",
}

__all__ = [
    "TASKS",
    "Manifest",
    "ModelRecord",
    "NoProgress",
    "OpenedVersion",
    "Progress",
    "Reference",
    "Registry",
    "VersionRecord",
    "open_registry",
    "parse_reference",
]

if TYPE_CHECKING:
    from maas.registry.importer import NoProgress, Progress
    from maas.registry.manifest import TASKS, Manifest
    from maas.registry.names import Reference, parse_reference
    from maas.registry.records import ModelRecord, OpenedVersion, VersionRecord
    from maas.registry.service import Registry, open_registry


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'maas.registry' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
