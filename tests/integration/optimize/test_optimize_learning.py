"""The optimize steps that learn from a dataset file: a fine-tune after pruning and
distillation into a smaller student; and the report's accuracy on an evaluation file.
The parent is a digits CNN trained by the ``train`` job on three digits."""

from __future__ import annotations

import time

import numpy as np
import pytest
from safetensors.torch import load_file

from maas.registry.service import CACHE_SECONDS
from tests.fixtures import make_cnn_folder, make_lstm_folder
from tests.integration.optimize.test_optimize_job import infer, optimize, optimized
from tests.integration.training.test_train_job import run_jobs, sentiment_csv, start, upload

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def digits_cnn(app_client, tenant_keys, settings, few_digits):
    """A CNN trained on the three digits of ``few_digits`` (8x8), and that file's id."""
    headers = tenant_keys["acme"]
    file_id = upload(app_client, headers, few_digits)
    start(
        app_client,
        headers,
        training_file=file_id,
        model="digits",
        epochs=4,
        batch_size=16,
        image_size=8,
        arguments={"channels": [8, 16], "hidden": 32},
    )
    run_jobs(settings)
    time.sleep(CACHE_SECONDS)
    return file_id


def weights(app_client, reference: str) -> dict:
    registry = app_client.app.state.registry
    return load_file(registry.folder(registry.resolve(reference)) / "model.safetensors")


def test_a_fine_tune_after_pruning_learns_and_keeps_the_pruned_zeros(
    app_client, tenant_keys, settings, digits_cnn
):
    headers = tenant_keys["acme"]
    common = {"model": "digits:1", "evaluation_file": digits_cnn}
    plain = optimized(app_client, headers, settings, recipe="prune 0.7", **common)
    tuned = optimized(
        app_client,
        headers,
        settings,
        recipe="prune 0.7 fine_tune_steps=40 learning_rate=0.003",
        training_file=digits_cnn,
        **common,
    )
    plain_result, tuned_result = plain["result"], tuned["result"]
    assert tuned_result["reference"] == "digits:3"
    # The report measured both on the evaluation file's 120 images.
    assert tuned_result["evaluation_examples"] == 120
    manifest = app_client.app.state.registry.open_version("digits:3").manifest
    parent_accuracy = manifest.recipe["parent_figures"]["accuracy"]
    assert tuned_result["accuracy_change"] == pytest.approx(
        tuned_result["accuracy"] - parent_accuracy
    )
    assert tuned_result["accuracy"] > plain_result["accuracy"]  # the fine-tune learnt
    assert "fine-tuned 40 steps on 120 examples" in manifest.recipe["notes"][1]
    # The zeros pruning made are zeros still, and the other weights moved.
    pruned, refined = weights(app_client, "digits:2"), weights(app_client, "digits:3")
    for key, weight in pruned.items():
        if weight.dim() > 1:
            assert (refined[key][weight == 0] == 0).all(), key
    assert tuned_result["sparsity"] == pytest.approx(plain_result["sparsity"])
    assert any(not (pruned[k] == refined[k]).all() for k in pruned)
    shown = app_client.get("/api/v1/models/digits/versions/3/report", headers=headers).json()
    assert shown["figures"]["accuracy"] == tuned_result["accuracy"]
    assert shown["ratios"]["accuracy_change"] == tuned_result["accuracy_change"]


def test_distillation_makes_a_quarter_size_student_that_serves(
    app_client, tenant_keys, settings, digits_cnn
):
    headers = tenant_keys["acme"]
    job = optimized(
        app_client,
        headers,
        settings,
        model="digits",
        recipe="distil width=0.5 steps=150 learning_rate=0.005",
        training_file=digits_cnn,
        evaluation_file=digits_cnn,
    )
    result = job["result"]
    manifest = app_client.app.state.registry.open_version("digits:2").manifest
    assert manifest.config["arguments"]["channels"] == [4, 8]
    assert manifest.config["arguments"]["hidden"] == 16
    assert result["parameters_ratio"] < 0.3
    assert result["accuracy"] >= 0.9  # three digits; the teacher is near 1
    assert (
        "distilled a" in manifest.recipe["notes"][0] and "150 steps" in manifest.recipe["notes"][0]
    )
    images = np.random.default_rng(3).standard_normal((4, 3, 8, 8)).astype(np.float32)
    assert infer(app_client, headers, "digits", 2, images).shape == (4, 3)


def test_a_pruned_model_distilled_from_its_parent_keeps_its_pruned_shape(
    app_client, tenant_keys, settings, digits_cnn
):
    headers = tenant_keys["acme"]
    job = optimized(
        app_client,
        headers,
        settings,
        model="digits",
        recipe="prune 0.5 structured -> distil steps=30",
        training_file=digits_cnn,
    )
    manifest = app_client.app.state.registry.open_version("digits:2").manifest
    assert manifest.config["arguments"]["channels"] == [4, 8]  # the pruned student itself
    assert len(manifest.recipe["notes"]) == 2 and "accuracy" not in job["result"]


def test_the_report_measures_a_text_classifier_on_a_csv(
    app_client, tenant_keys, settings, tmp_path
):
    acme = app_client.app.state.tenants.get_id("acme")
    app_client.app.state.registry.import_model(
        make_lstm_folder(tmp_path / "lstm"), "words", owner=acme
    )
    headers = tenant_keys["acme"]
    data = tmp_path / "reviews.csv"
    data.write_bytes(sentiment_csv(40))
    file_id = upload(app_client, headers, data)
    job = optimized(
        app_client,
        headers,
        settings,
        model="words",
        recipe="quantize int8-dynamic",
        evaluation_file=file_id,
    )
    result = job["result"]
    assert result["evaluation_examples"] == 40
    assert 0 <= result["accuracy"] <= 1 and abs(result["accuracy_change"]) <= 0.1


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        ({"recipe": "distil"}, "training_file",
         "step 1 (distil) learns or calibrates from data: give a training_file"),
        ({"recipe": "prune 0.5 fine_tune_steps=5"}, "training_file", "learns"),
        ({"recipe": "distil", "training_file": "file-nope"}, "training_file", "no file"),
        ({"recipe": "distil", "training_file": "CSV"}, "training_file",
         "archive of image folders"),
        ({"recipe": "distil", "training_file": "DIGITS"}, "training_file",
         "classes the model does not know"),
        ({"recipe": "prune 0.5", "evaluation_file": "CSV"}, "evaluation_file",
         "archive of image folders"),
        ({"recipe": "distil teacher=nope", "training_file": "PETS"}, "recipe",
         "no teacher model 'nope'"),
        ({"recipe": "distil teacher=words", "training_file": "PETS"}, "recipe",
         "is a text-classification model"),
        ({"recipe": "distil teacher=fishy", "training_file": "PETS"}, "recipe",
         "gives other labels"),
        ({"recipe": "distil width=1", "training_file": "PETS"}, "recipe",
         "learns nothing new"),
        ({"recipe": "distil layers=3", "training_file": "PETS"}, "recipe",
         "the teacher has 2 layer(s)"),
        ({"recipe": "quantize int8-static -> export onnx"}, "training_file", "calibrates"),
        ({"recipe": "quantize int8-static", "training_file": "PETS"}, "recipe",
         "end the recipe with export onnx"),
        ({"recipe": "share 4 -> export onnx"}, "recipe", "export without share"),
        ({"recipe": "export onnx", "model": "words"}, "recipe",
         "lstm-classifier does not export to ONNX"),
    ],
)  # fmt: skip
def test_learning_steps_without_fitting_data_or_teacher_are_refused(
    app_client, tenant_keys, few_digits, tmp_path, body, param, says
):
    headers = tenant_keys["acme"]
    acme = app_client.app.state.tenants.get_id("acme")
    registry = app_client.app.state.registry
    registry.import_model(make_cnn_folder(tmp_path / "cnn"), "cnn", owner=acme)
    registry.import_model(make_lstm_folder(tmp_path / "words"), "words", owner=acme)
    registry.import_model(make_cnn_folder(tmp_path / "f", num_classes=4), "fishy", owner=acme)
    csv = tmp_path / "reviews.csv"
    csv.write_bytes(sentiment_csv(10))
    pets = tmp_path / "pets.zip"
    _image_archive(pets, ["cat", "dog"])
    files = {
        "CSV": upload(app_client, headers, csv),
        "DIGITS": upload(app_client, headers, few_digits),
        "PETS": upload(app_client, headers, pets),
    }
    body = {k: files.get(v, v) for k, v in body.items()}
    answer = optimize(app_client, headers, **{"model": "cnn", **body})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert says in error["message"] and error["param"] == param
    assert app_client.get("/api/v1/jobs", headers=tenant_keys["admin"]).json()["data"] == []


def _image_archive(path, classes: list[str]) -> None:
    import io
    import zipfile

    from PIL import Image

    with zipfile.ZipFile(path, "w") as archive:
        for label in classes:
            for n in range(2):
                buffer = io.BytesIO()
                Image.new("RGB", (16, 16), (40 * n, 90, 200)).save(buffer, format="PNG")
                archive.writestr(f"pets/{label}/{n}.png", buffer.getvalue())


def test_a_named_teacher_teaches_the_parent_itself(app_client, tenant_keys, settings, digits_cnn):
    headers = tenant_keys["acme"]
    start(
        app_client,
        headers,
        training_file=digits_cnn,
        model="big-digits",
        epochs=2,
        batch_size=16,
        image_size=8,
        arguments={"channels": [16, 32], "hidden": 64},
    )
    run_jobs(settings)
    time.sleep(CACHE_SECONDS)
    job = optimized(
        app_client,
        headers,
        settings,
        model="digits",
        recipe="distil teacher=big-digits width=1 steps=20",
        training_file=digits_cnn,
    )
    manifest = app_client.app.state.registry.open_version("digits:2").manifest
    assert manifest.config["arguments"]["channels"] == [8, 16]  # the parent, taught
    assert job["result"]["parameters_ratio"] == 1
    big = sum(w.numel() for w in weights(app_client, "big-digits").values())
    assert f"distilled a {big:,}-parameter teacher" in manifest.recipe["notes"][0]
    before, after = weights(app_client, "digits:1"), weights(app_client, "digits:2")
    assert any(not (before[k] == after[k]).all() for k in before)


@pytest.mark.parametrize(
    ("recipe", "quantized"),
    [
        ("export onnx", None),
        ("quantize int8-dynamic -> export onnx", "MatMulInteger"),
        ("quantize int8-static -> export onnx", "QuantizeLinear"),
    ],
)
def test_an_onnx_export_serves_through_the_parent_s_routes(
    app_client, tenant_keys, settings, digits_cnn, few_digits, recipe, quantized
):
    import onnx

    headers = tenant_keys["acme"]
    job = optimized(
        app_client,
        headers,
        settings,
        model="digits",
        recipe=recipe,
        training_file=digits_cnn,
        evaluation_file=digits_cnn,
    )
    result = job["result"]
    registry = app_client.app.state.registry
    child = registry.open_version("digits:2")
    manifest = child.manifest
    assert (manifest.format, manifest.runtime) == ("onnx", "onnx")
    assert manifest.task == "image-classification" and manifest.labels == ["0", "1", "2"]
    assert (manifest.parent.name, manifest.parent.version) == ("digits", 1)
    graph = onnx.load_model_from_string(child.read_bytes("model.onnx"))
    ops = {node.op_type for node in graph.graph.node}
    if quantized is None:
        assert result["max_abs_diff"] < 1e-4 and result["top1_agreement"] == 1
        assert result["accuracy_change"] == 0
    else:
        assert quantized in ops, ops
        assert result["top1_agreement"] >= 0.8 and abs(result["accuracy_change"]) <= 0.05
    assert "exported to ONNX" in manifest.recipe["notes"][-1]
    # The same routes as the parent: v2 tensors and :predict with images and labels.
    images = np.random.default_rng(4).standard_normal((3, 3, 8, 8)).astype(np.float32)
    assert infer(app_client, headers, "digits", 2, images).shape == (3, 3)
    import base64
    import zipfile

    with zipfile.ZipFile(few_digits) as archive:
        png = archive.read(next(n for n in archive.namelist() if n.startswith("digits/1/")))
    answers = [
        app_client.post(
            f"/v1/models/digits:{v}:predict",
            headers=headers,
            json={"instances": [{"b64": base64.b64encode(png).decode()}]},
        )
        for v in (1, 2)
    ]
    assert [a.status_code for a in answers] == [200, 200], answers[1].text
    labels = [a.json()["predictions"][0]["label"] for a in answers]
    assert labels[0] == labels[1]


def test_a_text_classifier_exports_to_onnx_and_classifies_texts(
    app_client, tenant_keys, settings, tmp_path
):
    from tests.fixtures import make_transformer_folder

    acme = app_client.app.state.tenants.get_id("acme")
    app_client.app.state.registry.import_model(
        make_transformer_folder(tmp_path / "encoder"), "encoder", owner=acme
    )
    headers = tenant_keys["acme"]
    job = optimized(app_client, headers, settings, model="encoder", recipe="export onnx")
    assert job["result"]["max_abs_diff"] < 1e-4
    child = app_client.app.state.registry.open_version("encoder:2").manifest
    assert child.runtime == "onnx" and child.task == "text-classification"
    assert "tokenizer.json" in {f.path for f in child.files}
    texts = ["the cat sat on the mat", "a big red car runs fast"]
    answers = [
        app_client.post(
            f"/v1/models/encoder:{v}:predict", headers=headers, json={"instances": texts}
        )
        for v in (1, 2)
    ]
    assert [a.status_code for a in answers] == [200, 200], answers[1].text
    first, second = (a.json()["predictions"] for a in answers)
    assert [p["label"] for p in first] == [p["label"] for p in second]
    for a, b in zip(first, second, strict=True):
        assert a["score"] == pytest.approx(b["score"], abs=1e-4)
