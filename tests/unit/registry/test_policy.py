"""The load policy: pickle weights, auto_map and links are refused, by every importer."""

from __future__ import annotations

import json
import os

import pytest

from maas.errors import RefusedArtifact, UnsupportedFormat
from maas.registry.policy import check_load_policy
from tests.fixtures import files_under, make_hf_folder, make_zip, tar_folder


@pytest.mark.parametrize(
    "filename",
    [
        "pytorch_model.bin",
        "model.pt",
        "model.pth",
        "weights.pkl",
        "training_args.bin",
        "x.ckpt",
        "MODEL.PT",
    ],
)
def test_pickle_files_in_a_folder_are_refused_with_a_conversion_hint(registry, tmp_path, filename):
    source = make_hf_folder(tmp_path / "hf")
    (source / filename).write_bytes(b"\x80\x04K\x01.")  # a real pickle: the int 1
    with pytest.raises(RefusedArtifact) as caught:
        registry.import_model(source, "m")
    message = str(caught.value)
    assert filename in message and "pickle" in message
    assert "safetensors" in message and "weights_only=True" in message
    assert registry.list_models() == []
    assert files_under(registry.store.root) == {".staging"}


def test_a_single_pickle_file_is_refused(registry, tmp_path):
    source = tmp_path / "model.pt"
    source.write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(RefusedArtifact, match="pickle"):
        registry.import_model(source, "m")


def test_pickle_inside_an_archive_is_refused(registry, tmp_path):
    source = make_hf_folder(tmp_path / "hf")
    (source / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    archive = tar_folder(tmp_path / "hf.tar.gz", source, "hf")
    with pytest.raises(RefusedArtifact, match="pytorch_model.bin"):
        registry.import_model(archive, "m")
    zipped = make_zip(tmp_path / "hf.zip", {"model.pkl": b"\x80\x04K\x01."})
    with pytest.raises(RefusedArtifact, match="model.pkl"):
        registry.import_model(zipped, "m")


@pytest.mark.parametrize("config_file", ["config.json", "tokenizer_config.json"])
def test_auto_map_is_refused(registry, tmp_path, config_file):
    source = make_hf_folder(tmp_path / "hf")
    config = json.loads((source / config_file).read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (source / config_file).write_text(json.dumps(config))
    (source / "modeling_evil.py").write_text("import os; os.system('touch /tmp/pwned')")
    with pytest.raises(RefusedArtifact, match="auto_map") as caught:
        registry.import_model(source, "m")
    assert config_file in str(caught.value)
    assert registry.list_models() == []


def test_auto_map_in_an_archive_is_refused(registry, tmp_path):
    source = make_hf_folder(tmp_path / "hf", config_extra={"auto_map": {"AutoConfig": "x.Y"}})
    with pytest.raises(RefusedArtifact, match="auto_map"):
        registry.import_model(tar_folder(tmp_path / "hf.tgz", source, "."), "m")


def test_invalid_safetensors_is_refused(registry, tmp_path):
    source = make_hf_folder(tmp_path / "hf")
    (source / "model.safetensors").write_bytes(b"\x80\x04K\x01.")  # a pickle in disguise
    with pytest.raises(RefusedArtifact, match="not a valid safetensors file"):
        registry.import_model(source, "m")


def test_policy_refuses_links_in_a_version_folder(tmp_path):
    folder = tmp_path / "v"
    folder.mkdir()
    os.symlink("/etc/hostname", folder / "config.txt")
    with pytest.raises(RefusedArtifact, match="symbolic links"):
        check_load_policy(folder)


def test_user_folder_links_are_copied_as_files(registry, tmp_path):
    """A Hugging Face cache snapshot links to blobs elsewhere; the version holds real bytes."""
    blobs = tmp_path / "blobs"
    source = make_hf_folder(blobs)
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    for path in blobs.iterdir():
        os.symlink(path, snapshot / path.name)
    record = registry.import_model(snapshot, "cached")
    folder = registry.folder(record)
    assert not any(p.is_symlink() for p in folder.rglob("*"))
    assert (folder / "model.safetensors").read_bytes() == (
        source / "model.safetensors"
    ).read_bytes()


def test_linked_folders_are_refused(registry, tmp_path):
    source = make_hf_folder(tmp_path / "hf")
    os.symlink(tmp_path, source / "escape")
    with pytest.raises(RefusedArtifact, match="symbolic links to folders"):
        registry.import_model(source, "m")


# JSON files from outside are parsed in bounded memory and depth: a nesting bomb was a
# RecursionError (a 500), an oversize index or template was read whole.
JSON_BOMBS = {
    "config.json": ("[" * 200_000, RefusedArtifact, "nested too deep"),
    "tokenizer_config.json": ('{"a": "' + "x" * (17 * 2**20) + '"}', RefusedArtifact, "16 MiB"),
    "model.safetensors.index.json": ("[" * 200_000, UnsupportedFormat, "nested too deep"),
    "chat_template.json": (
        '{"chat_template": "' + "x" * (17 * 2**20) + '"}',
        UnsupportedFormat,
        "16 MiB",
    ),
}


@pytest.mark.parametrize("name", sorted(JSON_BOMBS))
def test_json_files_of_a_model_are_parsed_in_bounded_memory_and_depth(registry, tmp_path, name):
    text, error, message = JSON_BOMBS[name]
    source = make_hf_folder(tmp_path / "hf")
    (source / name).write_text(text)
    with pytest.raises(error, match=message):
        registry.import_model(source, "m")
    assert registry.list_models() == []
