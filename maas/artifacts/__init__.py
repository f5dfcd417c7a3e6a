"""Where version files live: the artifact store, hashing and safe archive extraction."""

from maas.artifacts.hashing import FileEntry, ProgressFn, copy_and_hash, hash_file
from maas.artifacts.store import ArtifactStore, Staging

__all__ = ["ArtifactStore", "FileEntry", "ProgressFn", "Staging", "copy_and_hash", "hash_file"]
