"""Turn a user's path into a staged version folder: collect, copy and hash, check, inspect.

Nothing here touches the database; ``Registry.import_model`` commits what this builds.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from maas.artifacts import crypto
from maas.artifacts.archive import ArchiveLimits, extract_archive, is_archive
from maas.artifacts.hashing import FileEntry, copy_and_hash, hash_file
from maas.artifacts.keyring import MasterKeyring, WrappedKey
from maas.errors import InvalidRequest, RefusedArtifact
from maas.registry.formats import FormatInfo, inspect_folder
from maas.registry.manifest import MANIFEST
from maas.registry.policy import check_file_names, check_load_policy

SKIPPED_DIRS = frozenset({".git", ".cache", ".huggingface", "__pycache__"})


class Progress(Protocol):
    """How long work reports itself; the CLI draws a Rich progress bar from it."""

    def start(self, description: str, total: int) -> None: ...

    def advance(self, amount: int) -> None: ...


class NoProgress:
    def start(self, description: str, total: int) -> None:
        pass

    def advance(self, amount: int) -> None:
        pass


@dataclass(frozen=True)
class SourceFile:
    relpath: str
    """Where the file goes inside the version folder (POSIX)."""
    path: Path
    size: int


@dataclass(frozen=True)
class SealedFile:
    """A weight file stored encrypted, with its data key wrapped by the master key."""

    path: str
    aad: str
    wrapped: WrappedKey


@dataclass(frozen=True)
class StagedVersion:
    id: str
    folder: Path
    files: list[FileEntry]
    info: FormatInfo
    sealed: list[SealedFile]


def stage_version(
    source: Path,
    staging: Path,
    limits: ArchiveLimits,
    progress: Progress,
    *,
    consume: bool = False,
    keyring: MasterKeyring | None = None,
) -> StagedVersion:
    """Build a checked version folder at ``staging/version`` from ``source``.

    ``consume`` moves the source files instead of copying them (for uploads and archives
    that already sit inside the staging folder). With a ``keyring``, weight files are
    encrypted once they have been checked.
    """
    folder = staging / "version"
    folder.mkdir()
    if is_archive(source):
        unpacked = staging / "unpacked"
        progress.start(f"Unpacking {source.name}", 0)
        extract_archive(source, unpacked, limits, check_names=check_file_names)
        files = collect_files(_model_root(unpacked), contained=True)
        consume = True
    else:
        files = collect_files(source, contained=False)
    check_file_names(file.relpath for file in files)
    entries = _transfer(files, folder, progress, consume=consume)
    check_load_policy(folder)
    info = inspect_folder(folder)
    version_id = uuid.uuid4().hex
    sealed: list[SealedFile] = []
    if keyring is not None:
        entries, sealed = _seal(folder, entries, info.weight_files, version_id, keyring, progress)
    return StagedVersion(version_id, folder, entries, info, sealed)


def collect_files(source: Path, *, contained: bool) -> list[SourceFile]:
    """The files an import takes from ``source`` (a folder, or one .gguf/.onnx file).

    With ``contained``, a symbolic link must resolve inside ``source`` (archives); a user's own
    folder may link elsewhere (the Hugging Face cache links to its blob store).
    """
    try:
        is_dir, is_file = source.is_dir(), source.is_file()
    except OSError as err:  # a name too long, no permission to look
        raise InvalidRequest(f"cannot read {source}: {err.strerror}", param="path") from None
    if is_dir:
        return _collect_folder(source, contained)
    if not is_file:
        raise InvalidRequest(f"{source} does not exist or is not a file or folder", param="path")
    if source.name == MANIFEST:
        raise InvalidRequest("import the folder, not its manifest.json", param="path")
    files = [SourceFile(source.name, source, source.stat().st_size)]
    if source.suffix.lower() == ".onnx":
        from maas.registry.formats import onnx_file  # onnx: 7 MiB where no ONNX is read

        model = onnx_file.load_graph(source)
        for relpath in onnx_file.external_data_files(model, source, source.parent):
            path = source.parent / relpath
            files.append(SourceFile(relpath, path, path.stat().st_size))
    return files


def _collect_folder(root: Path, contained: bool) -> list[SourceFile]:
    files: list[SourceFile] = []
    real_root = root.resolve()
    for dirpath, dirnames, filenames in os.walk(root):
        current = Path(dirpath)
        for name in list(dirnames):
            if name in SKIPPED_DIRS:
                dirnames.remove(name)
            elif (current / name).is_symlink():
                raise RefusedArtifact(
                    f"refusing {name!r}: symbolic links to folders are not followed"
                )
        for name in filenames:
            path = current / name
            relpath = path.relative_to(root).as_posix()
            if relpath == MANIFEST:
                raise RefusedArtifact("the folder already has a manifest.json; maas writes its own")
            resolved = path.resolve()
            if contained and not resolved.is_relative_to(real_root):
                raise RefusedArtifact(f"refusing {relpath!r}: it links outside the archive")
            if not resolved.is_file():
                raise RefusedArtifact(f"refusing {relpath!r}: not a regular file")
            files.append(SourceFile(relpath, resolved, resolved.stat().st_size))
    if not files:
        where = "the archive" if contained else str(root)
        raise InvalidRequest(f"{where} holds no files", param="path")
    return sorted(files, key=lambda file: file.relpath)


def _model_root(unpacked: Path) -> Path:
    """An archive often wraps the model in one folder; look inside it."""
    entries = [entry for entry in unpacked.iterdir() if entry.name not in SKIPPED_DIRS]
    if len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink():
        return entries[0]
    return unpacked


def _seal(
    folder: Path,
    entries: list[FileEntry],
    weight_files: list[str],
    version_id: str,
    keyring: MasterKeyring,
    progress: Progress,
) -> tuple[list[FileEntry], list[SealedFile]]:
    """Encrypt the weight files in place, each with a fresh data key."""
    weights = set(weight_files)
    progress.start("Encrypting", sum(e.size for e in entries if e.path in weights))
    sealed_entries, sealed = [], []
    for entry in entries:
        if entry.path not in weights:
            sealed_entries.append(entry)
            continue
        plain = folder / entry.path
        target = plain.with_name(plain.name + ".sealing")
        aad = f"{version_id}/{entry.path}"
        data_key = crypto.new_data_key()
        digest = crypto.encrypt_file(
            plain, target, data_key, aad.encode(), on_progress=progress.advance
        )
        os.replace(target, plain)
        sealed.append(SealedFile(entry.path, aad, keyring.wrap(data_key, aad.encode())))
        size = plain.stat().st_size
        sealed_entries.append(FileEntry(path=entry.path, size=size, sha256=digest, encrypted=True))
    return sealed_entries, sealed


def _transfer(
    files: list[SourceFile], folder: Path, progress: Progress, *, consume: bool
) -> list[FileEntry]:
    progress.start("Hashing" if consume else "Copying and hashing", sum(f.size for f in files))
    entries = []
    moved: dict[Path, Path] = {}  # two links to one file: move it once, copy it after
    for file in files:
        target = folder / file.relpath
        if consume and file.path not in moved:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(file.path, target)
            moved[file.path] = target
            digest = hash_file(target, progress.advance)
        else:
            digest = copy_and_hash(moved.get(file.path, file.path), target, progress.advance)
        entries.append(FileEntry(path=file.relpath, size=target.stat().st_size, sha256=digest))
    return entries
