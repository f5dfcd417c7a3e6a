"""A child's folder before it is a version, read as one, so the harness measures it through
the runtime that will serve it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from maas.registry.records import OpenedVersion


def opened_folder(parent: OpenedVersion, folder: Path) -> OpenedVersion:
    """``folder`` as the runtime's loaders read a version: the parent's manifest with the
    folder's own config and files."""
    from maas.artifacts.hashing import FileEntry
    from maas.registry.formats import inspect_folder

    info = inspect_folder(folder)
    files = [
        FileEntry(path=p.relative_to(folder).as_posix(), size=p.stat().st_size, sha256="")
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    ]
    manifest = parent.manifest.model_copy(
        update={"config": info.config, "files": files, "format": info.format}
    )
    return replace(parent, manifest=manifest, folder=folder, data_keys={})


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
