"""Master keyring: private file, wrap/unwrap, rotation, rewrap and retirement."""

from __future__ import annotations

import base64
import json
import shutil
import stat

import pytest

from maas.artifacts.keyring import MasterKeyring, WrappedKey
from maas.errors import ArtifactCorrupted, Conflict, InvalidRequest

AAD = b"model/3/model.safetensors"
DATA_KEY = bytes(range(32))


@pytest.fixture
def key_file(tmp_path):
    return tmp_path / "keys" / "master.json"


@pytest.fixture
def keyring(key_file):
    return MasterKeyring.create(key_file)


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_create_then_load(keyring, key_file):
    loaded = MasterKeyring.load(key_file)
    assert loaded.active_version == keyring.active_version == 1
    assert loaded.unwrap(keyring.wrap(DATA_KEY, AAD), AAD) == DATA_KEY
    data = json.loads(key_file.read_text())
    assert data["format"] == 1 and data["active"] == 1
    assert len(base64.b64decode(data["keys"]["1"])) == 32


def test_create_refuses_existing_file(keyring, key_file):
    before = key_file.read_bytes()
    with pytest.raises(Conflict, match="already exists"):
        MasterKeyring.create(key_file)
    assert key_file.read_bytes() == before
    assert [p.name for p in key_file.parent.iterdir()] == ["master.json"]


def test_file_is_private(keyring, key_file):
    assert _mode(key_file) == 0o600
    keyring.rotate()
    assert _mode(key_file) == 0o600


def test_load_refuses_file_readable_by_others(keyring, key_file):
    key_file.chmod(0o644)
    with pytest.raises(InvalidRequest, match="chmod 600"):
        MasterKeyring.load(key_file)


@pytest.mark.parametrize(
    "content, message",
    [
        ("not json", "not valid JSON"),
        ('{"format": 2, "active": 1, "keys": {}}', "not a keyring file"),
        ('{"format": 1, "active": 1, "keys": {}}', 'no "keys"'),
        ('{"format": 1, "active": 1, "keys": {"1": "c2hvcnQ="}}', "not 32 bytes"),
        ('{"format": 1, "active": 1, "keys": {"x": "c2hvcnQ="}}', "not a positive integer"),
        ('{"format": 1, "active": 2, "keys": {"1": "%s"}}', '"active" version'),
    ],
)
def test_load_refuses_malformed_file(key_file, content, message):
    key_file.parent.mkdir()
    key_file.write_text(content.replace("%s", base64.b64encode(DATA_KEY).decode()))
    key_file.chmod(0o600)
    with pytest.raises(InvalidRequest, match=message):
        MasterKeyring.load(key_file)


def test_load_refuses_missing_file(key_file):
    with pytest.raises(InvalidRequest, match="does not exist"):
        MasterKeyring.load(key_file)


def test_wrap_unwrap_round_trip(keyring):
    wrapped = keyring.wrap(DATA_KEY, AAD)
    assert wrapped.master_version == 1 and len(wrapped.nonce) == 12
    assert DATA_KEY not in wrapped.ciphertext
    assert keyring.unwrap(wrapped, AAD) == DATA_KEY
    assert keyring.wrap(DATA_KEY, AAD).nonce != wrapped.nonce


def test_unwrap_with_wrong_aad_fails(keyring):
    wrapped = keyring.wrap(DATA_KEY, AAD)
    with pytest.raises(ArtifactCorrupted, match="failed authentication"):
        keyring.unwrap(wrapped, b"model/4/model.safetensors")


def test_unwrap_tampered_key_fails(keyring):
    wrapped = keyring.wrap(DATA_KEY, AAD)
    flipped = bytes([wrapped.ciphertext[0] ^ 1]) + wrapped.ciphertext[1:]
    with pytest.raises(ArtifactCorrupted, match="failed authentication"):
        keyring.unwrap(WrappedKey(1, wrapped.nonce, flipped), AAD)


def test_rotate_rewrap_retire(keyring, key_file, tmp_path):
    old_file = tmp_path / "old.json"
    shutil.copy2(key_file, old_file)
    old_wrapped = keyring.wrap(DATA_KEY, AAD)

    assert keyring.rotate() == 2
    assert keyring.active_version == 2
    assert MasterKeyring.load(key_file).active_version == 2
    assert keyring.unwrap(old_wrapped, AAD) == DATA_KEY
    rewrapped = keyring.rewrap(old_wrapped, AAD)
    assert rewrapped.master_version == 2

    keyring.retire(1)
    assert keyring.versions == [2]
    for ring in (keyring, MasterKeyring.load(key_file)):
        with pytest.raises(ArtifactCorrupted, match="master key version 1 is not in the keyring"):
            ring.unwrap(old_wrapped, AAD)
        assert ring.unwrap(rewrapped, AAD) == DATA_KEY

    with pytest.raises(ArtifactCorrupted, match="master key version 2 is not in the keyring"):
        MasterKeyring.load(old_file).unwrap(rewrapped, AAD)


def test_rotate_keeps_keys_added_by_another_process(keyring, key_file):
    other = MasterKeyring.load(key_file)
    assert other.rotate() == 2
    wrapped_by_other = other.wrap(DATA_KEY, AAD)
    assert keyring.rotate() == 3
    assert MasterKeyring.load(key_file).unwrap(wrapped_by_other, AAD) == DATA_KEY


def test_retire_active_is_refused(keyring):
    with pytest.raises(Conflict, match="active"):
        keyring.retire(1)
    assert keyring.versions == [1]


def test_repr_has_no_key_material(keyring, key_file):
    keyring.rotate()
    keys = json.loads(key_file.read_text())["keys"].values()
    text = repr(keyring) + str(keyring)
    assert "active_version=2" in text
    for encoded in keys:
        raw = base64.b64decode(encoded)
        assert encoded not in text and raw.hex() not in text and repr(raw) not in text
