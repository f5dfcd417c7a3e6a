"""Versioned master keys that wrap (encrypt) the per-file data keys.

The key file is JSON, mode 0600, always replaced atomically::

    {"format": 1, "active": 2, "keys": {"1": "<base64 of 32 bytes>", "2": "..."}}

New data keys are wrapped with the active version. ``rotate`` adds a version and makes it
active; ``rewrap`` moves a wrapped key onto the active version; once nothing needs an old
version, ``retire`` removes it. Changes hold a lock on ``<file>.lock`` and re-read the file,
so two processes rotating at once cannot drop each other's keys.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from maas.artifacts.store import fsync_dir
from maas.errors import ArtifactCorrupted, Conflict, InvalidRequest, NotFound

FORMAT = 1
KEY_SIZE = 32
NONCE_SIZE = 12


@dataclass(frozen=True)
class WrappedKey:
    """A data key encrypted with one master key version; safe to store next to the data."""

    master_version: int
    nonce: bytes
    ciphertext: bytes


class MasterKeyring:
    """The master keys in one file. Never prints, logs or returns key material."""

    def __init__(self, path: Path, keys: dict[int, bytes], active: int) -> None:
        self.path = path
        self._keys = keys
        self._active = active

    @classmethod
    def load(cls, path: Path) -> MasterKeyring:
        """Read the key file; ``InvalidRequest`` if it is missing, malformed or not private."""
        try:
            mode = path.stat().st_mode
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise _invalid(path, "does not exist") from None
        except OSError as err:
            raise _invalid(path, f"cannot be read: {err.strerror}") from None
        except UnicodeDecodeError:
            raise _invalid(path, "is not valid JSON") from None
        if mode & 0o077:
            raise InvalidRequest(
                f"master key file {path} is readable by other users; run: chmod 600 {path}"
            )
        keys, active = _parse(text, path)
        return cls(path, keys, active)

    @classmethod
    def create(cls, path: Path) -> MasterKeyring:
        """Write a new key file with version 1 active; ``Conflict`` if the file exists."""
        keys = {1: AESGCM.generate_key(bit_length=256)}
        try:
            _write(path, keys, 1, replace=False)
        except FileExistsError:
            raise Conflict(f"master key file {path} already exists") from None
        return cls(path, keys, 1)

    @property
    def active_version(self) -> int:
        return self._active

    @property
    def versions(self) -> list[int]:
        return sorted(self._keys)

    def wrap(self, data_key: bytes, aad: bytes) -> WrappedKey:
        """Encrypt ``data_key`` with the active master key, bound to ``aad``."""
        if len(data_key) != KEY_SIZE:
            raise ValueError(f"a data key is {KEY_SIZE} bytes")
        nonce = os.urandom(NONCE_SIZE)
        ciphertext = AESGCM(self._keys[self._active]).encrypt(nonce, data_key, aad)
        return WrappedKey(self._active, nonce, ciphertext)

    def unwrap(self, wrapped: WrappedKey, aad: bytes) -> bytes:
        """The data key inside ``wrapped``; ``ArtifactCorrupted`` if it cannot be recovered."""
        master_key = self._keys.get(wrapped.master_version)
        if master_key is None:
            raise ArtifactCorrupted(
                f"master key version {wrapped.master_version} is not in the keyring"
            )
        try:
            return AESGCM(master_key).decrypt(wrapped.nonce, wrapped.ciphertext, aad)
        except (InvalidTag, ValueError):  # ValueError: a nonce of impossible length
            raise ArtifactCorrupted(
                "wrapped data key failed authentication (tampered, wrong aad or wrong master key)"
            ) from None

    def rewrap(self, wrapped: WrappedKey, aad: bytes) -> WrappedKey:
        """``wrapped``'s data key, wrapped again with the active master key."""
        return self.wrap(self.unwrap(wrapped, aad), aad)

    def rotate(self) -> int:
        """Add a new random key version, make it active and save; returns the new version."""
        with self._locked():
            version = max(self._keys) + 1
            keys = {**self._keys, version: AESGCM.generate_key(bit_length=256)}
            _write(self.path, keys, version, replace=True)
            self._keys, self._active = keys, version
        return version

    def retire(self, version: int) -> None:
        """Remove a version that is not active and save. Keys it wrapped become unreadable."""
        with self._locked():
            if version == self._active:
                raise Conflict(f"master key version {version} is active; rotate first")
            if version not in self._keys:
                raise NotFound(f"master key version {version} is not in the keyring")
            keys = {v: key for v, key in self._keys.items() if v != version}
            _write(self.path, keys, self._active, replace=True)
            self._keys = keys

    def __repr__(self) -> str:
        return (
            f"MasterKeyring(path={str(self.path)!r}, active_version={self._active}, "
            f"versions={self.versions})"
        )

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold ``<file>.lock`` and bring this keyring up to date with the file first."""
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            current = MasterKeyring.load(self.path)
            self._keys, self._active = current._keys, current._active
            yield
        finally:
            os.close(fd)


def _parse(text: str, path: Path) -> tuple[dict[int, bytes], int]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        raise _invalid(path, "is not valid JSON") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise _invalid(path, f'is not a keyring file ("format": {FORMAT} expected)')
    entries, active = data.get("keys"), data.get("active")
    if not isinstance(entries, dict) or not entries:
        raise _invalid(path, 'has no "keys"')
    keys = {_parse_version(v, path): _decode_key(k, v, path) for v, k in entries.items()}
    if type(active) is not int or active not in keys:
        raise _invalid(path, f'has an "active" version that is not in "keys": {active!r}')
    return keys, active


def _parse_version(text: str, path: Path) -> int:
    if not text.isdigit() or int(text) < 1:
        raise _invalid(path, f"has a key version that is not a positive integer: {text!r}")
    return int(text)


def _decode_key(encoded: object, version: str, path: Path) -> bytes:
    try:
        key = base64.b64decode(encoded, validate=True) if isinstance(encoded, str) else b""
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != KEY_SIZE:
        raise _invalid(path, f"has a key version {version} that is not {KEY_SIZE} bytes of base64")
    return key


def _invalid(path: Path, problem: str) -> InvalidRequest:
    return InvalidRequest(f"master key file {path} {problem}")


def _write(path: Path, keys: dict[int, bytes], active: int, *, replace: bool) -> None:
    """Write the file in one step: a private temp file, fsynced, then renamed or linked."""
    content = {
        "format": FORMAT,
        "active": active,
        "keys": {str(v): base64.b64encode(k).decode("ascii") for v, k in sorted(keys.items())},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(content, out, indent=2)
            out.flush()
            os.fsync(out.fileno())
        # os.link refuses an existing target, so create() can never clobber a keyring.
        if replace:
            os.replace(temp, path)
        else:
            os.link(temp, path)
    finally:
        Path(temp).unlink(missing_ok=True)
    fsync_dir(path.parent)
