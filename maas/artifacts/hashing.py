"""sha256 of files, computed while copying so big weights are read once."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel

CHUNK = 8 * 1024 * 1024

ProgressFn = Callable[[int], None]
"""Called with the number of bytes just processed; the caller knows the total."""


class FileEntry(BaseModel):
    """One file of a version, as the manifest records it."""

    path: str
    """Relative POSIX path inside the version folder."""
    size: int
    """Size of the stored bytes."""
    sha256: str
    """sha256 of the stored bytes (the ciphertext, for an encrypted file)."""
    encrypted: bool = False


def hash_file(path: Path, on_progress: ProgressFn | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        while chunk := source.read(CHUNK):
            digest.update(chunk)
            if on_progress:
                on_progress(len(chunk))
    return digest.hexdigest()


def copy_and_hash(source: Path, target: Path, on_progress: ProgressFn | None = None) -> str:
    """Copy ``source`` to a new file ``target`` (fsynced) and return the sha256 of the bytes."""
    digest = hashlib.sha256()
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(source, "rb") as src, open(target, "xb") as dst:
        while chunk := src.read(CHUNK):
            digest.update(chunk)
            dst.write(chunk)
            if on_progress:
                on_progress(len(chunk))
        dst.flush()
        os.fsync(dst.fileno())
    return digest.hexdigest()
