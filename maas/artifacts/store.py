"""The local artifact store: one folder per model version under the artifact root.

Layout::

    <root>/<model>/<version>/manifest.json and the model's files (read-only)
    <root>/.staging/<id>/       a version being built; <id>.lock is held while it is
    <root>/.staging/<id>.lock
    <root>/.orphans/               version folders the database does not know, kept for review

A version becomes visible in one ``rename`` from ``.staging`` into place. Staging folders
whose lock nobody holds belong to a crashed or interrupted import and are swept at start.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import stat
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

STAGING = ".staging"
ORPHANS = ".orphans"


class Staging:
    """A private folder inside the artifact root where one import builds its version."""

    def __init__(self, staging_root: Path) -> None:
        staging_root.mkdir(parents=True, exist_ok=True)
        token = uuid.uuid4().hex
        self.path = staging_root / token
        self._lock_path = staging_root / f"{token}.lock"
        self._lock = os.open(self._lock_path, os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        self.path.mkdir()

    def close(self) -> None:
        """Remove what is left of the folder (nothing, once published) and release the lock."""
        _remove_tree(self.path)
        self._lock_path.unlink(missing_ok=True)
        os.close(self._lock)

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ArtifactStore:
    """Version folders on the local disk."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.staging_root = root / STAGING
        root.mkdir(parents=True, exist_ok=True)

    def stage(self) -> Staging:
        return Staging(self.staging_root)

    @staticmethod
    def relpath(name: str, version: int) -> str:
        return f"{name}/{version}"

    def path(self, relpath: str) -> Path:
        return self.root / relpath

    def publish(self, folder: Path, relpath: str) -> Path:
        """Make ``folder`` read-only, flush it to disk and rename it to ``relpath``.

        Raises FileExistsError if something already sits there.
        """
        target = self.path(relpath)
        target.parent.mkdir(parents=True, exist_ok=True)
        _freeze(folder)
        fsync_dir(folder)
        if target.exists():
            raise FileExistsError(target)
        os.rename(folder, target)
        fsync_dir(target.parent)
        return target

    def discard(self, relpath: str) -> None:
        """Delete a folder this process just published (its transaction failed)."""
        with self.stage() as trash:
            self.move_out(relpath, trash)

    def move_out(self, relpath: str, trash: Staging) -> Path | None:
        """Move a folder into ``trash`` (out of sight, quick); None if it was not there."""
        target = self.path(relpath)
        if not target.exists():
            return None
        moved = trash.path / relpath.replace("/", "__")
        os.rename(target, moved)
        return moved

    def move_back(self, moved: Path, relpath: str) -> None:
        """Undo ``move_out`` (the transaction that deleted the rows did not commit)."""
        target = self.path(relpath)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(moved, target)

    def quarantine(self, relpath: str) -> Path | None:
        """Move a folder the database does not know into ``.orphans`` instead of deleting it:
        it may be a crash's leftover, or real data under a database that is not its own."""
        target = self.path(relpath)
        if not target.exists():
            return None
        stamp = time.strftime("%Y%m%dT%H%M%S")
        destination = (
            self.root / ORPHANS / f"{relpath.replace('/', '__')}-{stamp}-{uuid.uuid4().hex[:6]}"
        )
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.rename(target, destination)
        return destination

    def version_folders(self) -> Iterator[tuple[str, int, Path]]:
        """Every ``<model>/<version>`` folder on disk, registered or not."""
        for model_dir in sorted(self.root.iterdir()):
            if model_dir.name.startswith(".") or not model_dir.is_dir():
                continue
            for version_dir in sorted(model_dir.iterdir()):
                if version_dir.name.isdigit() and version_dir.is_dir():
                    yield model_dir.name, int(version_dir.name), version_dir

    def sweep_staging(self) -> int:
        """Remove staging folders left by imports that crashed; returns how many."""
        if not self.staging_root.exists():
            return 0
        removed = 0
        for entry in self.staging_root.iterdir():
            if entry.suffix == ".lock" or not _is_abandoned(self.staging_root, entry.name):
                continue
            _remove_tree(entry)
            (self.staging_root / f"{entry.name}.lock").unlink(missing_ok=True)
            removed += 1
        # A lock without a folder is either a crash between the two removals in
        # Staging.close or an import that has just created its lock: only old ones go.
        cutoff = time.time() - 3600
        for lock in self.staging_root.glob("*.lock"):
            orphan = not (self.staging_root / lock.stem).exists()
            if (
                orphan
                and lock.stat().st_mtime < cutoff
                and _is_abandoned(self.staging_root, lock.stem)
            ):
                lock.unlink(missing_ok=True)
        return removed


def _is_abandoned(staging_root: Path, token: str) -> bool:
    lock_path = staging_root / f"{token}.lock"
    try:
        fd = os.open(lock_path, os.O_RDWR)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def _freeze(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(stat.S_IRUSR)  # read-only, and for maas's own user only


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new file in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_tree(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)
