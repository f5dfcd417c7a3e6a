"""The model registry: models, immutable versions, movable aliases, and their files."""

from maas.registry.importer import NoProgress, Progress
from maas.registry.manifest import TASKS, Manifest
from maas.registry.names import Reference, parse_reference
from maas.registry.records import ModelRecord, OpenedVersion, VersionRecord
from maas.registry.service import Registry, open_registry

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
