"""Weight files encrypted at rest: chunked AES-256-GCM, one fresh data key per file.

A STREAM construction (as in Tink's streaming AEAD and age), so a file of many GB is
encrypted and verified one chunk at a time. Layout::

    header   b"MAASENC1" | chunk_size (uint32 BE) | nonce_prefix (7 random bytes)
    chunk 0  AES-GCM(plaintext[0:chunk_size]) + 16-byte tag
    ...
    chunk n  AES-GCM(the rest, 0..chunk_size bytes) + 16-byte tag     (the final chunk)

Chunk ``i`` uses the nonce ``nonce_prefix | i (uint32 BE) | last`` where ``last`` is 1 only
for the final chunk, and every chunk authenticates ``header + aad``. The caller's ``aad``
binds the file to its identity (e.g. ``b"model/3/model.safetensors"``). So a flipped byte,
reordered, dropped or appended chunks, truncation, a wrong key or a wrong aad all fail.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from maas.errors import ArtifactCorrupted

MAGIC = b"MAASENC1"
CHUNK_SIZE = 1024 * 1024
MAX_CHUNK_SIZE = 64 * 1024 * 1024
"""Larger chunk sizes are refused, so a forged header cannot make us read gigabytes at once."""
KEY_SIZE = 32
TAG_SIZE = 16
NONCE_PREFIX_SIZE = 7
MAX_CHUNKS = 2**32
_HEADER = struct.Struct(f">{len(MAGIC)}sI{NONCE_PREFIX_SIZE}s")
HEADER_SIZE = _HEADER.size

ProgressFn = Callable[[int], None]


def new_data_key() -> bytes:
    """A fresh random 32-byte key for one file."""
    return AESGCM.generate_key(bit_length=256)


def is_encrypted(path: Path) -> bool:
    """Whether ``path`` starts with the magic of an encrypted maas file."""
    with open(path, "rb") as source:
        return source.read(len(MAGIC)) == MAGIC


def encrypt_file(
    source: Path,
    target: Path,
    data_key: bytes,
    aad: bytes,
    *,
    chunk_size: int = CHUNK_SIZE,
    on_progress: ProgressFn | None = None,
) -> str:
    """Encrypt ``source`` into a new file ``target`` (fsynced) and return its sha256.

    The hash is of the bytes written, since the manifest records what is stored.
    ``on_progress`` gets the plaintext size of each chunk. A half-written ``target`` is removed.
    """
    cipher = _cipher(data_key)
    if not 0 < chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk_size must be between 1 and {MAX_CHUNK_SIZE}")
    header = _HEADER.pack(MAGIC, chunk_size, os.urandom(NONCE_PREFIX_SIZE))
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(source, "rb") as src, open(target, "xb") as dst:
            digest = hashlib.sha256(header)
            dst.write(header)
            for index, chunk, last in _plaintext_chunks(src, chunk_size):
                sealed = cipher.encrypt(_nonce(header, index, last), chunk, header + aad)
                digest.update(sealed)
                dst.write(sealed)
                if on_progress:
                    on_progress(len(chunk))
            dst.flush()
            os.fsync(dst.fileno())
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    return digest.hexdigest()


def decrypt_file(path: Path, data_key: bytes, aad: bytes) -> Iterator[bytes]:
    """Yield the verified plaintext of ``path`` chunk by chunk, holding one chunk in memory.

    Every yielded chunk is authentic, but the file is complete and untouched only if the
    iteration ends without raising ``ArtifactCorrupted``.
    """
    cipher = _cipher(data_key)
    with open(path, "rb") as source:
        header, chunk_size = _read_header(source, path)
        for index, sealed, last in _sealed_chunks(source, chunk_size + TAG_SIZE, path):
            try:
                yield cipher.decrypt(_nonce(header, index, last), sealed, header + aad)
            except InvalidTag:
                raise _diagnose(cipher, header, aad, index, sealed, last, path) from None


def decrypt_bytes(path: Path, data_key: bytes, aad: bytes) -> bytes:
    """The whole verified plaintext of ``path``; for small files."""
    return b"".join(decrypt_file(path, data_key, aad))


class MemoryFile:
    """Plaintext in an anonymous in-RAM file (``memfd``) that never touches a disk.

    ``path`` lets libraries that want a file name open it, from this process only.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.path = f"/proc/self/fd/{fd}"
        self._closed = False

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self.fd)

    def __enter__(self) -> MemoryFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def decrypt_to_memory_file(path: Path, data_key: bytes, aad: bytes) -> MemoryFile:
    """Decrypt ``path`` into a new ``MemoryFile``, positioned at its start. Linux only."""
    memory = MemoryFile(os.memfd_create(f"maas:{path.name}", os.MFD_CLOEXEC))
    try:
        with os.fdopen(memory.fd, "wb", closefd=False) as out:
            for chunk in decrypt_file(path, data_key, aad):
                out.write(chunk)
        os.lseek(memory.fd, 0, os.SEEK_SET)
    except BaseException:
        memory.close()
        raise
    return memory


def _cipher(data_key: bytes) -> AESGCM:
    if len(data_key) != KEY_SIZE:
        raise ValueError(f"a data key is {KEY_SIZE} bytes")
    return AESGCM(data_key)


def _nonce(header: bytes, index: int, last: bool) -> bytes:
    """``nonce_prefix | index (uint32 BE) | last flag``: 12 bytes, never reused within a key."""
    if index >= MAX_CHUNKS:
        raise ValueError("too many chunks for one file; use a larger chunk_size")
    return header[-NONCE_PREFIX_SIZE:] + struct.pack(">IB", index, int(last))


def _plaintext_chunks(source: BinaryIO, chunk_size: int) -> Iterator[tuple[int, bytes, bool]]:
    """``(index, chunk, last)``; reads one chunk ahead to know which is last."""
    chunk = source.read(chunk_size)
    index = 0
    while True:
        following = source.read(chunk_size) if len(chunk) == chunk_size else b""
        yield index, chunk, not following
        if not following:
            return
        chunk, index = following, index + 1


def _sealed_chunks(
    source: BinaryIO, sealed_size: int, path: Path
) -> Iterator[tuple[int, bytes, bool]]:
    """``(index, sealed chunk, last)`` as stored; a short read can only be the final chunk."""
    sealed = source.read(sealed_size)
    index = 0
    while True:
        if len(sealed) < TAG_SIZE:
            raise ArtifactCorrupted(f"{path.name} is truncated")
        following = source.read(sealed_size) if len(sealed) == sealed_size else b""
        yield index, sealed, not following
        if not following:
            return
        sealed, index = following, index + 1


def _read_header(source: BinaryIO, path: Path) -> tuple[bytes, int]:
    header = source.read(HEADER_SIZE)
    if len(header) < HEADER_SIZE or not header.startswith(MAGIC):
        raise ArtifactCorrupted(f"{path.name} is not an encrypted maas file")
    _, chunk_size, _ = _HEADER.unpack(header)
    if not 0 < chunk_size <= MAX_CHUNK_SIZE:
        raise ArtifactCorrupted(f"{path.name} has an invalid chunk size in its header")
    return header, chunk_size


def _diagnose(
    cipher: AESGCM, header: bytes, aad: bytes, index: int, sealed: bytes, last: bool, path: Path
) -> ArtifactCorrupted:
    """Name the failure: a chunk that verifies with the other ``last`` flag was cut or extended."""
    try:
        cipher.decrypt(_nonce(header, index, not last), sealed, header + aad)
    except InvalidTag:
        return ArtifactCorrupted(
            f"{path.name} chunk {index} failed authentication (tampered, reordered or wrong key)"
        )
    if last:
        return ArtifactCorrupted(f"{path.name} is truncated")
    return ArtifactCorrupted(f"{path.name} has data after its final chunk")
