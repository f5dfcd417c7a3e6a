"""Format detection and the format-specific checks."""

from __future__ import annotations

import json

import pytest

from maas.errors import InvalidRequest, RefusedArtifact, UnsupportedFormat
from tests.fixtures import files_under, make_gguf, make_hf_folder, make_onnx


@pytest.mark.parametrize("location", ["/etc/passwd", "../outside.data", "sub/../../outside.data"])
def test_onnx_external_data_outside_the_folder_is_refused(registry, tmp_path, location):
    (tmp_path / "outside.data").write_bytes(bytes(64))
    model = make_onnx(tmp_path / "model" / "model.onnx", external_location=location)
    with pytest.raises(RefusedArtifact, match="points outside the model folder"):
        registry.import_model(model, "linear")
    with pytest.raises(RefusedArtifact, match="points outside the model folder"):
        registry.import_model(model.parent, "linear")  # the folder route checks it too
    assert registry.list_models() == []
    assert files_under(registry.store.root) == {".staging"}


@pytest.mark.parametrize("location", ["w\x00.data", "w\n.data", "x" * 256, "a/" * 2100])
def test_onnx_external_data_location_the_file_system_cannot_take_is_refused(
    registry, tmp_path, location
):
    model = make_onnx(tmp_path / "model" / "model.onnx", external_location=location)
    with pytest.raises(RefusedArtifact, match="external data location"):
        registry.import_model(model, "linear")
    assert registry.list_models() == []


def test_onnx_external_data_linked_outside_is_refused(registry, tmp_path):
    (tmp_path / "secret.data").write_bytes(bytes(64))
    model = make_onnx(tmp_path / "model" / "model.onnx", external_location="weights.data")
    (tmp_path / "model" / "weights.data").symlink_to(tmp_path / "secret.data")
    with pytest.raises(RefusedArtifact, match="points outside"):
        registry.import_model(model, "linear")


def test_onnx_missing_external_data(registry, tmp_path):
    model = make_onnx(tmp_path / "model" / "model.onnx", external_location="weights.data")
    with pytest.raises(UnsupportedFormat, match="missing"):
        registry.import_model(model, "linear")


def test_invalid_onnx(registry, tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"\xff\xfe garbage \x00")
    with pytest.raises(UnsupportedFormat, match="not a valid ONNX model"):
        registry.import_model(bad, "linear")


def test_sharded_index_with_a_missing_shard(registry, tmp_path):
    source = make_hf_folder(tmp_path / "hf", sharded=True)
    (source / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(UnsupportedFormat, match="missing"):
        registry.import_model(source, "m")


def test_sharded_index_pointing_outside(registry, tmp_path):
    source = make_hf_folder(tmp_path / "hf", sharded=True)
    index = {"weight_map": {"a": "../../etc/passwd"}}
    (source / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(RefusedArtifact, match="outside"):
        registry.import_model(source, "m")


def test_folder_without_safetensors(registry, tmp_path):
    source = make_hf_folder(tmp_path / "hf")
    (source / "model.safetensors").unlink()
    with pytest.raises(UnsupportedFormat, match="no \\*.safetensors"):
        registry.import_model(source, "m")


def test_several_gguf_files_are_ambiguous(registry, tmp_path):
    make_gguf(tmp_path / "f" / "a.gguf")
    make_gguf(tmp_path / "f" / "b.gguf")
    with pytest.raises(UnsupportedFormat, match="several GGUF"):
        registry.import_model(tmp_path / "f", "m")


def test_chat_template_from_a_jinja_file(registry, tmp_path):
    source = make_hf_folder(tmp_path / "hf", chat_template=None)
    (source / "chat_template.jinja").write_text("{{ messages }}")
    record = registry.import_model(source, "m")
    assert record.task == "chat"
    assert registry.read_manifest(record).chat_template == "{{ messages }}"


def test_unknown_architecture_needs_a_task(registry, tmp_path):
    source = make_hf_folder(
        tmp_path / "hf", architecture="WeirdThing", model_type="weird", chat_template=None
    )
    with pytest.raises(InvalidRequest, match="give one with --task"):
        registry.import_model(source, "m")
    assert registry.import_model(source, "m", task="tensor").task == "tensor"


def _with_metadata(path, **props):
    import onnx

    model = onnx.load(str(path))
    for key, value in props.items():
        model.metadata_props.add(key=key.replace("_", ".", 1), value=value)
    onnx.save(model, str(path))
    return path


def test_onnx_metadata_gives_the_task_labels_and_preprocessing(registry, tmp_path):
    path = _with_metadata(
        make_onnx(tmp_path / "m" / "model.onnx"),
        maas_task='"image-classification"',
        maas_labels='["a", "b", "c", "d"]',
        maas_preprocessing='{"image_size": [4, 4], "mean": [0], "std": [1]}',
        maas_task_options='{"pooling": "cls", "normalize": true}',
    )
    record = registry.import_model(path.parent, "described")
    manifest = registry.open_version(record.reference).manifest
    assert manifest.task == "image-classification" and manifest.labels == ["a", "b", "c", "d"]
    assert manifest.task_options["preprocessing"]["image_size"] == [4, 4]
    assert manifest.task_options["pooling"] == "cls" and manifest.task_options["normalize"]


@pytest.mark.parametrize(
    ("props", "says"),
    [
        ({"maas_labels": "[1, 2]"}, "is not a list"),
        ({"maas_labels": "not json"}, "is not JSON"),
        ({"maas_task": '"poetry"'}, "names no task"),
        ({"maas_preprocessing": "[]"}, "is not a dict"),
        ({"maas_task_options": '"mean"'}, "is not a dict"),
    ],
)
def test_malformed_onnx_metadata_is_refused(registry, tmp_path, props, says):
    path = _with_metadata(make_onnx(tmp_path / "m" / "model.onnx"), **props)
    with pytest.raises(UnsupportedFormat) as refused:
        registry.import_model(path.parent, "described")
    assert says in str(refused.value)
