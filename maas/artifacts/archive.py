"""Extract .tar.gz / .tar / .zip archives without letting them escape the target or fill the disk.

Two passes. The first reads every entry's header and refuses the archive before a byte is
written: no absolute paths, no ``..``, no links that lead outside, no devices, no name the
caller's policy refuses (pickle files), no more than ``max_members`` entries, no more than
``max_bytes`` declared in all, and no compression ratio past ``max_ratio`` (per zip entry and
for the whole archive; a tar stream is metered while its headers are read). The second pass
writes the entries itself and counts the real bytes, because headers can lie: an entry that
grows past its declared size, a total past ``max_bytes`` or a ratio past ``max_ratio`` stops
it at once. Links keep tarfile's ``data`` filter rules, nothing is written through a link,
and on any failure the target is emptied again.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import posixpath
import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from maas.errors import UnsafeArchive

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
MiB = 1024**2
CHUNK = MiB
TAR_HEADER_ALLOWANCE = 4096
"""Stream bytes allowed per tar entry beyond its file size: header, pax header, padding."""

_DECOMPRESSORS: tuple[tuple[bytes, Callable[[BinaryIO], BinaryIO]], ...] = (
    (b"\x1f\x8b", lambda raw: gzip.GzipFile(fileobj=raw, mode="rb")),
    (b"BZh", bz2.BZ2File),
    (b"\xfd7zXZ\x00", lzma.LZMAFile),
)
_READ_ERRORS = (
    tarfile.TarError,
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    OSError,
    EOFError,
    zlib.error,
    lzma.LZMAError,
    NotImplementedError,  # a compression method zipfile does not know
    RuntimeError,  # an encrypted zip entry
    ValueError,
)

NameCheck = Callable[[Iterable[str]], object]
"""Raises to refuse an archive by the names of its files (the registry's file-name policy)."""


@dataclass(frozen=True)
class ArchiveLimits:
    max_bytes: int
    """Largest total uncompressed size."""
    max_members: int
    """Largest number of entries."""
    max_ratio: float
    """Largest uncompressed / compressed size, per zip entry and for a whole archive."""
    ratio_floor: int = MiB
    """Sizes up to this pass whatever their ratio: small JSON files compress very well."""

    def check_ratio(self, what: str, uncompressed: int, compressed: int) -> None:
        if uncompressed > self.ratio_floor and uncompressed > self.max_ratio * compressed:
            raise UnsafeArchive(
                f"{what} expands more than {self.max_ratio:g} times its compressed size "
                "(MAAS_MAX_ARCHIVE_RATIO); it looks like a decompression bomb"
            )

    def too_big(self, name: str | None = None) -> UnsafeArchive:
        where = "" if name is None else f" at {name!r}"
        return UnsafeArchive(
            f"archive unpacks to more than {self.max_bytes} bytes{where} (MAAS_MAX_ARCHIVE_BYTES)"
        )


def is_archive(path: Path) -> bool:
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


def _accept(names: Iterable[str]) -> None:
    pass


def extract_archive(
    archive: Path, target: Path, limits: ArchiveLimits, check_names: NameCheck = _accept
) -> None:
    """Extract ``archive`` into the empty folder ``target``, or raise UnsafeArchive.

    ``check_names`` is called with the name of every file and link before anything is
    written, and refuses the archive by raising. On any error ``target`` is left empty.
    """
    target.mkdir(parents=True, exist_ok=True)
    if any(target.iterdir()):
        raise ValueError(f"{target} is not empty")
    extract = _extract_zip if archive.name.lower().endswith(".zip") else _extract_tar
    try:
        extract(archive, target, limits, check_names)
    except tarfile.FilterError as err:
        _empty(target)
        raise UnsafeArchive(f"archive entry refused: {_reason(err)}") from None
    except _READ_ERRORS as err:
        _empty(target)
        raise UnsafeArchive(f"cannot read archive {archive.name}: {_reason(err)}") from None
    except BaseException:
        _empty(target)
        raise


def _check_name(name: str) -> str:
    """Return the normalised relative path of an entry, or refuse it."""
    if "\\" in name or "\x00" in name:
        raise UnsafeArchive(f"archive entry {name!r} has a backslash or NUL in its name")
    if (
        name.startswith("/")
        or PurePosixPath(name).is_absolute()
        or (len(name) > 1 and name[1] == ":")
    ):
        raise UnsafeArchive(f"archive entry {name!r} has an absolute path")
    parts = PurePosixPath(name).parts
    if ".." in parts:
        raise UnsafeArchive(f"archive entry {name!r} climbs out with '..'")
    normalised = posixpath.normpath(name)
    if normalised in (".", ""):
        return "."
    return normalised


def _check_link(name: str, link_target: str, *, hard: bool) -> None:
    """A link must resolve inside the archive. Hard link targets are archive paths."""
    if link_target.startswith("/") or "\\" in link_target:
        raise UnsafeArchive(f"archive link {name!r} points outside the archive")
    base = "" if hard else posixpath.dirname(name)
    resolved = posixpath.normpath(posixpath.join(base, link_target))
    if resolved == ".." or resolved.startswith("../") or resolved == ".":
        raise UnsafeArchive(f"archive link {name!r} points outside the archive")


class _Budget:
    """What the headers declare, checked one entry at a time before anything is written."""

    def __init__(self, limits: ArchiveLimits, check_names: NameCheck) -> None:
        self.limits = limits
        self.check_names = check_names
        self.members = 0
        self.bytes = 0
        self.names: set[str] = set()

    def take(self, name: str, size: int, *, is_dir: bool) -> None:
        self.members += 1
        if self.members > self.limits.max_members:
            raise UnsafeArchive(
                f"archive has more than {self.limits.max_members} entries "
                "(MAAS_MAX_ARCHIVE_MEMBERS)"
            )
        if not is_dir:
            if name == "." or name in self.names:
                raise UnsafeArchive(f"archive has the entry {name!r} twice")
            self.names.add(name)
            self.check_names([name])
        self.bytes += size
        if self.bytes > self.limits.max_bytes:
            raise self.limits.too_big(name)


class _Writer:
    """Writes entries under ``target``, counting the real bytes against the limits.

    ``archive_size`` (zip) also caps the ratio of everything written to the archive's size;
    a tar stream meters that itself (``_MeteredStream``).
    """

    def __init__(self, target: Path, limits: ArchiveLimits, archive_size: int | None = None):
        self.target = target
        self.limits = limits
        self.archive_size = archive_size
        self.written = 0

    def directory(self, relpath: str) -> None:
        if relpath != ".":
            self._place(relpath).mkdir(exist_ok=True)

    def file(
        self, relpath: str, source: BinaryIO, declared: int, compressed: int | None = None
    ) -> None:
        """Copy ``source`` to ``relpath``; ``compressed`` is the entry's own compressed size."""
        with open(self._place(relpath), "xb") as sink:  # "x": never through a planted link
            size = 0
            while chunk := source.read(CHUNK):
                size += len(chunk)
                self.written += len(chunk)
                if size > declared:
                    raise UnsafeArchive(
                        f"archive entry {relpath!r} holds more than the {declared} bytes "
                        "its header declares"
                    )
                if self.written > self.limits.max_bytes:
                    raise self.limits.too_big(relpath)
                if compressed is not None:
                    self.limits.check_ratio(f"archive entry {relpath!r}", size, compressed)
                if self.archive_size is not None:
                    self.limits.check_ratio("the archive", self.written, self.archive_size)
                sink.write(chunk)

    def symlink(self, relpath: str, link_target: str) -> None:
        os.symlink(link_target, self._place(relpath))

    def hardlink(self, relpath: str, link_target: str) -> None:
        original = self._place(link_target)
        if original.is_symlink() or not original.is_file():
            raise UnsafeArchive(
                f"archive link {relpath!r} must follow the file {link_target!r} it links to"
            )
        os.link(original, self._place(relpath))

    def _place(self, relpath: str) -> Path:
        """The path of ``relpath`` under the target with its folders made, none of them a link."""
        path = self.target
        *folders, name = PurePosixPath(relpath).parts
        for folder in folders:
            path = path / folder
            if path.is_symlink():
                raise UnsafeArchive(
                    f"archive entry {relpath!r} would be written through the link {folder!r}"
                )
            path.mkdir(exist_ok=True)
        return path / name


class _MeteredStream:
    """A tar archive's decompressed stream that refuses to pass the size or the ratio cap.

    The ratio is the whole stream's: bytes produced so far over compressed bytes read so far.
    tarfile reads and seeks through this object, so both passes are metered.
    """

    def __init__(self, stream: BinaryIO, raw: BinaryIO, limits: ArchiveLimits) -> None:
        self._stream = stream
        self._raw = raw
        self._limits = limits
        self._cap = limits.max_bytes + limits.max_members * TAR_HEADER_ALLOWANCE

    def tell(self) -> int:
        return self._stream.tell()

    def read(self, size: int = -1) -> bytes:
        room = self._cap - self.tell()
        wanted = room + 1 if size < 0 or size > room else size  # one byte more shows overflow
        parts = []
        while wanted > 0 and (part := self._stream.read(min(wanted, CHUNK))):
            wanted -= len(part)
            parts.append(part)
            self._check()
        return b"".join(parts)

    def seek(self, position: int, whence: int = io.SEEK_SET) -> int:
        if whence != io.SEEK_SET:
            raise io.UnsupportedOperation("only absolute seeks")
        if position < self.tell():
            self._stream.seek(position)  # rewinds: decompresses again from the start
        while self.tell() < position and self.read(min(position - self.tell(), CHUNK)):
            pass  # skipping forward decompresses too, so it is metered like a read
        return self.tell()

    def _check(self) -> None:
        produced = self.tell()
        if produced > self._cap:
            raise self._limits.too_big()
        self._limits.check_ratio("the archive", produced, self._raw.tell())


def _extract_tar(
    archive: Path, target: Path, limits: ArchiveLimits, check_names: NameCheck
) -> None:
    with open(archive, "rb") as raw, _decompressed(raw) as stream:
        metered = stream if stream is raw else _MeteredStream(stream, raw, limits)
        with tarfile.open(fileobj=metered, mode="r:") as tar:
            budget = _Budget(limits, check_names)
            # One header at a time: a bomb stops at its first oversize entry.
            members = [_check_tar_member(member, budget) for member in tar]
            writer = _Writer(target, limits)
            for member in members:
                _write_tar_member(tar, member, writer)


def _decompressed(raw: BinaryIO) -> BinaryIO:
    magic = raw.read(6)
    raw.seek(0)
    for prefix, opener in _DECOMPRESSORS:
        if magic.startswith(prefix):
            return opener(raw)
    return raw


def _check_tar_member(member: tarfile.TarInfo, budget: _Budget) -> tarfile.TarInfo:
    name = _check_name(member.name)
    if member.issym() or member.islnk():
        _check_link(name, member.linkname, hard=member.islnk())
    elif member.issparse() or not (member.isfile() or member.isdir()):
        raise UnsafeArchive(
            f"archive entry {member.name!r} is a device, FIFO, sparse or other special file"
        )
    budget.take(name, member.size if member.isfile() else 0, is_dir=member.isdir())
    return member


def _write_tar_member(tar: tarfile.TarFile, member: tarfile.TarInfo, writer: _Writer) -> None:
    # tarfile's data filter repeats the containment rules against what is on disk now.
    filtered = tarfile.data_filter(member, str(writer.target))
    relpath = _check_name(filtered.name)
    if member.isdir():
        writer.directory(relpath)
    elif member.issym():
        writer.symlink(relpath, filtered.linkname)
    elif member.islnk():
        writer.hardlink(relpath, _check_name(filtered.linkname))
    else:
        with tar.extractfile(member) as source:  # a regular file: never None
            writer.file(relpath, source, member.size)


def _extract_zip(
    archive: Path, target: Path, limits: ArchiveLimits, check_names: NameCheck
) -> None:
    archive_size = archive.stat().st_size
    with zipfile.ZipFile(archive) as zf:
        budget = _Budget(limits, check_names)
        entries = [(_check_zip_entry(info, budget), info) for info in zf.infolist()]
        limits.check_ratio("the archive", budget.bytes, archive_size)
        writer = _Writer(target, limits, archive_size)
        for relpath, info in entries:
            if info.is_dir():
                writer.directory(relpath)
                continue
            with zf.open(info) as source:
                writer.file(relpath, source, info.file_size, info.compress_size)


def _check_zip_entry(info: zipfile.ZipInfo, budget: _Budget) -> str:
    name = _check_name(info.filename)
    kind = stat.S_IFMT(info.external_attr >> 16)
    if kind == stat.S_IFLNK:
        raise UnsafeArchive(
            f"archive entry {info.filename!r} is a symbolic link; "
            "zip archives may hold only files and folders"
        )
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise UnsafeArchive(f"archive entry {info.filename!r} is a device, FIFO or special file")
    budget.take(name, info.file_size, is_dir=info.is_dir())
    what = f"archive entry {info.filename!r}"
    budget.limits.check_ratio(what, info.file_size, info.compress_size)
    return name


def _empty(target: Path) -> None:
    """Remove everything under ``target`` (which was empty before extraction)."""
    for child in target.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def _reason(err: BaseException) -> str:
    """What went wrong, without the server paths an OSError's text carries."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    text = str(err)
    return type(err).__name__ if "/" in text else text or type(err).__name__
