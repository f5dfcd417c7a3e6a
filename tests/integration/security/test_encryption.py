"""Weights encrypted at rest: nothing readable on disk, round trip in memory, rotation."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from gguf import GGUFReader
from safetensors.numpy import load_file

from maas.artifacts.crypto import is_encrypted
from maas.artifacts.keyring import MasterKeyring
from maas.errors import ArtifactCorrupted, Unavailable
from maas.registry import open_registry
from tests.fixtures import WEIGHT_PATTERN, make_gguf, make_hf_folder, make_onnx

PATTERN = WEIGHT_PATTERN.tobytes()


@pytest.fixture
def sealed(settings, tmp_path):
    """A registry with a master key, holding a HF folder, a GGUF and an ONNX model."""
    MasterKeyring.create(settings.home / "master.keys")
    settings = settings.model_copy(update={"encryption_key_file": settings.home / "master.keys"})
    registry = open_registry(settings)
    registry.import_model(make_hf_folder(tmp_path / "hf"), "hf")
    registry.import_model(make_gguf(tmp_path / "tiny.gguf"), "tiny")
    onnx = make_onnx(tmp_path / "onnx" / "model.onnx", external_location="weights.data")
    (tmp_path / "onnx" / "weights.data").write_bytes(PATTERN)
    registry.import_model(onnx, "linear")
    yield registry
    registry.close()


def every_file(root):
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]


def test_no_plaintext_weights_anywhere_on_disk(sealed, settings):
    files = every_file(settings.home)
    assert len(files) > 10
    for path in files:
        assert PATTERN not in path.read_bytes(), path
    for name, weights in [
        ("hf", "model.safetensors"),
        ("tiny", "tiny.gguf"),
        ("linear", "model.onnx"),
        ("linear", "weights.data"),
    ]:
        record = sealed.resolve(name)
        assert is_encrypted(sealed.folder(record) / weights)
        entry = next(e for e in sealed.read_manifest(record).files if e.path == weights)
        assert entry.encrypted
    # configs and tokenizers stay readable: they are not weights
    assert not is_encrypted(sealed.folder(sealed.resolve("hf")) / "config.json")


def test_weights_decrypt_in_memory_only(sealed):
    hf = sealed.open_version("hf")
    with hf.open_file("model.safetensors") as path:
        assert str(path).startswith("/proc/self/fd/")
        assert os.readlink(path).startswith("/memfd:")
        np.testing.assert_array_equal(load_file(str(path))["weight"], WEIGHT_PATTERN)
    tiny = sealed.open_version("tiny")
    with tiny.open_file("tiny.gguf") as path:
        reader = GGUFReader(path)
        assert reader.fields["general.architecture"].contents() == "llama"
    linear = sealed.open_version("linear")
    assert linear.read_bytes("weights.data") == PATTERN
    assert linear.read_bytes("model.onnx").startswith(b"\x08")  # a protobuf again


def test_a_tampered_file_is_refused(sealed):
    record = sealed.resolve("tiny")
    path = sealed.folder(record) / "tiny.gguf"
    os.chmod(path, 0o600)
    data = bytearray(path.read_bytes())
    data[100] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactCorrupted):
        sealed.open_version("tiny")


def test_rotation_rewraps_every_key_and_retires_the_old_master(sealed, settings, tmp_path):
    key_file = settings.home / "master.keys"
    old_copy = tmp_path / "old.keys"
    shutil.copy(key_file, old_copy)
    os.chmod(old_copy, 0o600)
    assert sealed.rotate_master_key() == 4  # safetensors, gguf, onnx, external data
    for name in ("hf", "tiny", "linear"):
        opened = sealed.open_version(name)
        for path in opened.data_keys:
            assert opened.read_bytes(path)
    rotated = MasterKeyring.load(key_file)
    assert rotated.versions == [2]
    # the old master key alone unwraps none of what is stored now
    sealed.vault.keyring = MasterKeyring.load(old_copy)
    sealed.vault.key_file = old_copy
    with pytest.raises(ArtifactCorrupted, match="not in the keyring"):
        sealed.open_version("hf")


def test_an_encrypted_version_without_the_master_key_is_a_clear_error(sealed, settings):
    sealed.vault.keyring = None
    with pytest.raises(Unavailable, match="MAAS_ENCRYPTION_KEY_FILE"):
        sealed.open_version("hf")


def test_the_cli_makes_the_key_and_rotates(settings, tmp_path, capsys, monkeypatch):
    import sys

    from maas.cli import main

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["maas", *args])
        try:
            main()
        except SystemExit as done:
            return done.code
        return 0

    assert run("keys", "init-master") == 0
    assert (settings.home / "master.keys").stat().st_mode & 0o777 == 0o600
    assert run("keys", "init-master") == 1
    assert "already exists" in capsys.readouterr().err
    assert run("models", "import", str(make_gguf(tmp_path / "t.gguf")), "--name", "t") == 0
    assert run("artifacts", "rotate-master-key") == 0
    assert "re-wrapped 1 data keys with master key version 2" in capsys.readouterr().out
    assert run("models", "verify", "t") == 0


def test_rotation_in_another_process_does_not_strand_new_versions(sealed, settings, tmp_path):
    from maas.registry import open_registry

    other = open_registry(sealed_settings(settings))  # e.g. the CLI, while a server runs
    try:
        other.rotate_master_key()
    finally:
        other.close()
    # this process still holds the old key file in memory; it imports and serves on
    record = sealed.import_model(make_gguf(tmp_path / "after.gguf"), "after")
    assert sealed.open_version("after").read_bytes("after.gguf")
    assert sealed.open_version("tiny").read_bytes("tiny.gguf")
    restarted = open_registry(sealed_settings(settings))
    try:
        assert restarted.open_version(record.reference).read_bytes("after.gguf")
        assert restarted.keyring.versions == [2]
    finally:
        restarted.close()


def test_a_version_sealed_before_a_rotation_commits_after_it(
    sealed, settings, tmp_path, monkeypatch
):
    import maas.registry.service as service
    from maas.registry import open_registry

    real_commit = service.Registry._commit

    def rotate_then_commit(self, *args, **kwargs):
        other = open_registry(sealed_settings(settings))
        other.rotate_master_key()
        other.close()
        return real_commit(self, *args, **kwargs)

    monkeypatch.setattr(service.Registry, "_commit", rotate_then_commit)
    sealed.import_model(make_gguf(tmp_path / "late.gguf"), "late")
    monkeypatch.undo()
    restarted = open_registry(sealed_settings(settings))
    try:
        assert restarted.open_version("late").read_bytes("late.gguf")
    finally:
        restarted.close()


def sealed_settings(settings):
    return settings.model_copy(update={"encryption_key_file": settings.home / "master.keys"})
