"""Chunked AES-GCM: round trips, and every way of tampering with a file is caught."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

from maas.artifacts.crypto import (
    HEADER_SIZE,
    TAG_SIZE,
    decrypt_bytes,
    decrypt_file,
    decrypt_to_memory_file,
    encrypt_file,
    is_encrypted,
    new_data_key,
)
from maas.errors import ArtifactCorrupted

CHUNK = 64
SEALED = CHUNK + TAG_SIZE
AAD = b"model/3/model.safetensors"
KEY = bytes(range(32))


def _weights(size: int) -> bytes:
    """Recognisable bytes: float32 0, 1, 2, ... cut to ``size``."""
    return np.arange(size // 4 + 1, dtype=np.float32).tobytes()[:size]


def _encrypt(tmp_path: Path, plaintext: bytes, *, chunk_size: int = CHUNK) -> Path:
    tmp_path.mkdir(exist_ok=True)
    source, target = tmp_path / "plain.bin", tmp_path / "sealed.bin"
    source.write_bytes(plaintext)
    encrypt_file(source, target, KEY, AAD, chunk_size=chunk_size)
    return target


def _rewrite(path: Path, change) -> None:
    path.write_bytes(change(path.read_bytes()))


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5])
def test_round_trip(tmp_path, size):
    plaintext = _weights(size)
    sealed = _encrypt(tmp_path, plaintext)
    assert decrypt_bytes(sealed, KEY, AAD) == plaintext
    chunks = list(decrypt_file(sealed, KEY, AAD))
    assert all(len(chunk) == CHUNK for chunk in chunks[:-1])
    assert len(chunks) == max(1, -(-size // CHUNK))


def test_returns_sha256_of_stored_bytes_and_reports_progress(tmp_path):
    source, target = tmp_path / "plain.bin", tmp_path / "sealed.bin"
    source.write_bytes(_weights(3 * CHUNK + 5))
    progress: list[int] = []
    digest = encrypt_file(source, target, KEY, AAD, chunk_size=CHUNK, on_progress=progress.append)
    assert digest == hashlib.sha256(target.read_bytes()).hexdigest()
    assert progress == [CHUNK, CHUNK, CHUNK, 5]
    assert target.stat().st_size == HEADER_SIZE + 3 * SEALED + 5 + TAG_SIZE


def test_ciphertext_does_not_contain_plaintext(tmp_path):
    plaintext = b"WEIGHTS!" * 100
    stored = _encrypt(tmp_path, plaintext).read_bytes()
    assert b"WEIGHTS!" not in stored
    assert _weights(32) not in _encrypt(tmp_path / "b", _weights(1000)).read_bytes()


def test_each_file_gets_fresh_nonces(tmp_path):
    first = _encrypt(tmp_path, b"same")
    second = _encrypt(tmp_path / "again", b"same")
    assert first.read_bytes() != second.read_bytes()


def test_refuses_to_overwrite_target(tmp_path):
    sealed = _encrypt(tmp_path, b"x")
    with pytest.raises(FileExistsError):
        encrypt_file(tmp_path / "plain.bin", sealed, KEY, AAD)


def test_new_data_key_is_random_32_bytes():
    assert len(new_data_key()) == 32
    assert new_data_key() != new_data_key()


@pytest.mark.parametrize("offset", range(HEADER_SIZE, HEADER_SIZE + 3 * SEALED + 5 + TAG_SIZE, 7))
def test_flipped_body_byte_is_detected(tmp_path, offset):
    sealed = _encrypt(tmp_path, _weights(3 * CHUNK + 5))
    _rewrite(sealed, lambda data: data[:offset] + bytes([data[offset] ^ 1]) + data[offset + 1 :])
    with pytest.raises(ArtifactCorrupted, match="failed authentication"):
        decrypt_bytes(sealed, KEY, AAD)


@pytest.mark.parametrize("offset", range(HEADER_SIZE))
def test_flipped_header_byte_is_detected(tmp_path, offset):
    sealed = _encrypt(tmp_path, _weights(2 * CHUNK))
    _rewrite(sealed, lambda data: data[:offset] + bytes([data[offset] ^ 1]) + data[offset + 1 :])
    with pytest.raises(ArtifactCorrupted):
        decrypt_bytes(sealed, KEY, AAD)


def test_swapped_chunks_are_detected(tmp_path):
    sealed = _encrypt(tmp_path, _weights(3 * CHUNK + 5))

    def swap(data: bytes) -> bytes:
        first = data[HEADER_SIZE : HEADER_SIZE + SEALED]
        second = data[HEADER_SIZE + SEALED : HEADER_SIZE + 2 * SEALED]
        return data[:HEADER_SIZE] + second + first + data[HEADER_SIZE + 2 * SEALED :]

    _rewrite(sealed, swap)
    with pytest.raises(ArtifactCorrupted, match="chunk 0 failed authentication"):
        decrypt_bytes(sealed, KEY, AAD)


def test_dropped_final_chunk_is_truncation(tmp_path):
    sealed = _encrypt(tmp_path, _weights(3 * CHUNK + 5))
    _rewrite(sealed, lambda data: data[: HEADER_SIZE + 3 * SEALED])
    with pytest.raises(ArtifactCorrupted, match="is truncated"):
        decrypt_bytes(sealed, KEY, AAD)


@pytest.mark.parametrize("keep", [0, 5, SEALED // 2, SEALED + 3])
def test_file_cut_mid_chunk_is_detected(tmp_path, keep):
    sealed = _encrypt(tmp_path, _weights(3 * CHUNK + 5))
    _rewrite(sealed, lambda data: data[: HEADER_SIZE + keep])
    with pytest.raises(ArtifactCorrupted):
        decrypt_bytes(sealed, KEY, AAD)


def test_empty_file_cut_to_header_is_truncated(tmp_path):
    sealed = _encrypt(tmp_path, b"")
    _rewrite(sealed, lambda data: data[:HEADER_SIZE])
    with pytest.raises(ArtifactCorrupted, match="is truncated"):
        decrypt_bytes(sealed, KEY, AAD)


def test_data_after_full_final_chunk_is_detected(tmp_path):
    sealed = _encrypt(tmp_path, _weights(2 * CHUNK))
    _rewrite(sealed, lambda data: data + b"\0" * SEALED)
    with pytest.raises(ArtifactCorrupted, match="has data after its final chunk"):
        decrypt_bytes(sealed, KEY, AAD)


@pytest.mark.parametrize("extra", [1, TAG_SIZE, SEALED, 3 * SEALED])
def test_appended_bytes_are_detected(tmp_path, extra):
    sealed = _encrypt(tmp_path, _weights(2 * CHUNK + 5))
    _rewrite(sealed, lambda data: data + os.urandom(extra))
    with pytest.raises(ArtifactCorrupted):
        decrypt_bytes(sealed, KEY, AAD)


def test_wrong_key_is_detected(tmp_path):
    sealed = _encrypt(tmp_path, _weights(100))
    with pytest.raises(ArtifactCorrupted, match="failed authentication") as caught:
        decrypt_bytes(sealed, new_data_key(), AAD)
    assert KEY.hex() not in str(caught.value)


def test_wrong_aad_is_detected(tmp_path):
    sealed = _encrypt(tmp_path, _weights(100))
    with pytest.raises(ArtifactCorrupted, match="failed authentication"):
        decrypt_bytes(sealed, KEY, b"model/4/model.safetensors")


def test_plain_file_is_refused(tmp_path):
    plain = tmp_path / "plain.bin"
    plain.write_bytes(_weights(100))
    with pytest.raises(ArtifactCorrupted, match="is not an encrypted maas file"):
        decrypt_bytes(plain, KEY, AAD)


def test_memory_file_holds_plaintext_off_disk(tmp_path):
    plaintext = _weights(3 * CHUNK + 5)
    sealed = _encrypt(tmp_path, plaintext)
    with decrypt_to_memory_file(sealed, KEY, AAD) as memory:
        assert memory.path == f"/proc/self/fd/{memory.fd}"
        assert os.readlink(memory.path).startswith("/memfd:")
        assert os.read(memory.fd, len(plaintext) + 1) == plaintext
        assert Path(memory.path).read_bytes() == plaintext
    with pytest.raises(OSError):
        os.fstat(memory.fd)


def test_memory_file_is_closed_when_decryption_fails(tmp_path):
    sealed = _encrypt(tmp_path, _weights(100))
    open_fds = set(os.listdir("/proc/self/fd"))
    with pytest.raises(ArtifactCorrupted):
        decrypt_to_memory_file(sealed, KEY, b"wrong")
    assert set(os.listdir("/proc/self/fd")) <= open_fds


def test_is_encrypted(tmp_path):
    sealed = _encrypt(tmp_path, b"")
    plain = tmp_path / "plain.bin"
    assert is_encrypted(sealed)
    assert not is_encrypted(plain)
