"""Extract .tar.gz / .tar / .zip archives without letting an entry escape the target folder.

Every entry is checked before anything is written: no absolute paths, no ``..``, no links
that lead outside, no devices, and limits on the number of entries and their total size.
Extraction then runs with the same rules again (tarfile's ``data`` filter), so a check
that slipped would still not write outside.
"""

from __future__ import annotations

import posixpath
import shutil
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from maas.errors import UnsafeArchive

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")


@dataclass(frozen=True)
class ArchiveLimits:
    max_bytes: int
    """Largest total uncompressed size."""
    max_members: int
    """Largest number of entries."""


def is_archive(path: Path) -> bool:
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


def extract_archive(archive: Path, target: Path, limits: ArchiveLimits) -> None:
    """Extract ``archive`` into the empty folder ``target``, or raise UnsafeArchive."""
    target.mkdir(parents=True, exist_ok=True)
    if archive.name.lower().endswith(".zip"):
        _extract_zip(archive, target, limits)
    else:
        _extract_tar(archive, target, limits)


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
    def __init__(self, limits: ArchiveLimits) -> None:
        self.limits = limits
        self.members = 0
        self.bytes = 0

    def take(self, name: str, size: int) -> None:
        self.members += 1
        self.bytes += size
        if self.members > self.limits.max_members:
            raise UnsafeArchive(
                f"archive has more than {self.limits.max_members} entries "
                "(MAAS_MAX_ARCHIVE_MEMBERS)"
            )
        if self.bytes > self.limits.max_bytes:
            raise UnsafeArchive(
                f"archive unpacks to more than {self.limits.max_bytes} bytes at {name!r} "
                "(MAAS_MAX_ARCHIVE_BYTES)"
            )


def _extract_tar(archive: Path, target: Path, limits: ArchiveLimits) -> None:
    try:
        with tarfile.open(archive, "r:*") as tar:
            budget = _Budget(limits)
            members = []
            for member in tar:  # one header at a time: a bomb stops at its first oversize entry
                _check_tar_member(member, budget)
                members.append(member)
            # The data filter repeats the containment rules at write time.
            tar.extractall(target, members=members, filter="data")
    except tarfile.FilterError as err:
        raise UnsafeArchive(f"archive entry refused: {_reason(err)}") from None
    except (tarfile.TarError, EOFError, OSError, zlib.error, ValueError) as err:
        raise UnsafeArchive(f"cannot read archive {archive.name}: {_reason(err)}") from None


def _check_tar_member(member: tarfile.TarInfo, budget: _Budget) -> None:
    name = _check_name(member.name)
    if member.issym() or member.islnk():
        _check_link(name, member.linkname, hard=member.islnk())
    elif not (member.isfile() or member.isdir()):
        raise UnsafeArchive(
            f"archive entry {member.name!r} is a device, FIFO or other special file"
        )
    budget.take(member.name, member.size if member.isfile() else 0)


def _extract_zip(archive: Path, target: Path, limits: ArchiveLimits) -> None:
    try:
        with zipfile.ZipFile(archive) as zf:
            budget = _Budget(limits)
            infos = zf.infolist()
            seen: set[str] = set()
            for info in infos:
                name = _check_name(info.filename)
                if name in seen:
                    raise UnsafeArchive(f"archive has the entry {info.filename!r} twice")
                seen.add(name)
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise UnsafeArchive(
                        f"archive entry {info.filename!r} is a symbolic link; "
                        "zip archives may hold only files and folders"
                    )
                budget.take(info.filename, info.file_size)
            for info in infos:
                _write_zip_entry(zf, info, target)
    except (
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        OSError,
        EOFError,
        zlib.error,
        NotImplementedError,  # a compression method zipfile does not know
        RuntimeError,  # an encrypted entry
        ValueError,
    ) as err:
        raise UnsafeArchive(f"cannot read archive {archive.name}: {_reason(err)}") from None


def _write_zip_entry(zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path) -> None:
    relative = _check_name(info.filename)
    destination = (target / relative).resolve()
    if not destination.is_relative_to(target.resolve()):
        raise UnsafeArchive(f"archive entry {info.filename!r} resolves outside the archive")
    if info.is_dir():
        destination.mkdir(parents=True, exist_ok=True)
        return
    destination.parent.mkdir(parents=True, exist_ok=True)
    # zipfile stops at the declared size and checks the CRC, so a lying header
    # cannot unpack more than the budget counted.
    with zf.open(info) as source, open(destination, "xb") as sink:
        shutil.copyfileobj(source, sink, 8 * 1024 * 1024)


def _reason(err: BaseException) -> str:
    """What went wrong, without the server paths an OSError's text carries."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    text = str(err)
    return type(err).__name__ if "/" in text else text or type(err).__name__
