"""Optimizations as jobs: ``POST /api/v1/optimizations`` checks the recipe against the parent
before anything is queued; the job makes a new version with its parent, its steps and a
report measured on both; the version serves through the parent's routes."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from maas.registry.service import CACHE_SECONDS
from tests.fixtures import make_cnn_folder, make_lstm_folder
from tests.integration.training.test_train_job import run_jobs

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def acme_cnn(app_client, tenant_keys, tmp_path):
    tenants = app_client.app.state.tenants
    registry = app_client.app.state.registry
    registry.import_model(make_cnn_folder(tmp_path / "cnn"), "cnn", owner=tenants.get_id("acme"))
    return "cnn"


def optimize(client, headers, **body):
    return client.post("/api/v1/optimizations", headers=headers, json=body)


def optimized(client, headers, settings, **body) -> dict:
    """Start an optimization, run it to its end, and return the finished job once the app
    sees its version."""
    created = optimize(client, headers, **body)
    assert created.status_code == 201, created.text
    run_jobs(settings)
    job = client.get(f"/api/v1/jobs/{created.json()['id']}", headers=headers).json()
    assert job["status"] == "succeeded", job["error"]
    time.sleep(CACHE_SECONDS)  # the worker's import reaches the app's cached view
    return job


def infer(client, headers, model: str, version: int, images: np.ndarray) -> np.ndarray:
    answer = client.post(
        f"/v2/models/{model}/versions/{version}/infer",
        headers=headers,
        json={
            "inputs": [
                {
                    "name": "input",
                    "datatype": "FP32",
                    "shape": list(images.shape),
                    "data": images.ravel().tolist(),
                }
            ]
        },
    )
    assert answer.status_code == 200, answer.text
    out = answer.json()["outputs"][0]
    return np.array(out["data"], dtype=np.float32).reshape(out["shape"])


def test_prune_then_quantize_makes_a_measured_version_that_serves(
    app_client, tenant_keys, settings, acme_cnn
):
    headers = tenant_keys["acme"]
    created = optimize(
        app_client, headers, model="cnn", recipe="prune 0.5 -> quantize int8-dynamic"
    )
    assert created.status_code == 201, created.text
    job = created.json()
    assert job["kind"] == "optimize" and job["params"]["model"] == "cnn:1"
    assert job["params"]["recipe"] == [
        {"step": "prune", "amount": 0.5, "structure": "unstructured", "fine_tune_steps": 0},
        {"step": "quantize", "method": "int8-dynamic"},
    ]
    run_jobs(settings)
    done = app_client.get(f"/api/v1/jobs/{job['id']}", headers=headers).json()
    assert done["status"] == "succeeded", done["error"]
    assert done["result"]["reference"] == "cnn:2"
    registry = app_client.app.state.registry
    time.sleep(CACHE_SECONDS)  # the worker's import reaches the app's cached view of "cnn"
    manifest = registry.open_version("cnn:2").manifest
    assert (manifest.parent.name, manifest.parent.version) == ("cnn", 1)
    assert manifest.config["quantization"] in ("int8-dynamic", "int8-dynamic-a8")
    assert [s["step"] for s in manifest.recipe["steps"]] == ["prune", "quantize"]
    assert any("pruned" in note for note in manifest.recipe["notes"])
    figures = manifest.metrics
    assert 0.45 <= figures["sparsity"] <= 0.6  # half the weights, over every layer together
    assert figures["artifact_bytes"] < manifest.recipe["parent_figures"]["artifact_bytes"]
    assert figures["artifact_bytes_ratio"] < 1 and figures["parameters_ratio"] == 1
    for name in ("latency_ms_p50", "throughput_per_s", "max_abs_diff", "top1_agreement"):
        assert figures[name] >= 0, name
    shown = app_client.get("/api/v1/models/cnn/versions/2/report", headers=headers).json()
    assert shown["parent"] == "cnn:1" and [s["step"] for s in shown["steps"]] == [
        "prune",
        "quantize",
    ]
    assert shown["figures"]["sparsity"] == figures["sparsity"]
    assert shown["parent_figures"] == manifest.recipe["parent_figures"]
    assert set(shown["parity"]) == {"max_abs_diff", "top1_agreement"}
    assert shown["ratios"]["artifact_bytes_ratio"] == figures["artifact_bytes_ratio"]
    none = app_client.get("/api/v1/models/cnn/versions/1/report", headers=headers)
    assert none.status_code == 404 and "not made by an optimization" in none.text
    images = np.random.default_rng(0).standard_normal((6, 3, 16, 16)).astype(np.float32)
    parent, child = (infer(app_client, headers, "cnn", v, images) for v in (1, 2))
    assert parent.shape == child.shape == (6, 3)
    assert not np.allclose(parent, child)  # half the weights are gone


def test_quantized_text_classifier_serves_close_to_its_parent(
    app_client, tenant_keys, settings, tmp_path
):
    tenants = app_client.app.state.tenants
    registry = app_client.app.state.registry
    registry.import_model(
        make_lstm_folder(tmp_path / "lstm"), "words", owner=tenants.get_id("acme")
    )
    headers = tenant_keys["acme"]
    recipe = [{"step": "quantize", "method": "int8-dynamic"}]
    job = optimized(app_client, headers, settings, model="words", recipe=recipe)
    child = registry.open_version("words:2")
    assert "and LSTM lstm" in child.manifest.recipe["notes"][0]
    stored = load_file(registry.folder(child.record) / "model.safetensors")
    assert stored["lstm.weight_ih_l0"].dtype == torch.int8 and "lstm.weight_hh_l0_scale" in stored
    assert job["result"]["top1_agreement"] >= 0.9
    assert job["result"]["max_abs_diff"] < 0.05
    answers = [
        app_client.post(
            f"/v1/models/words:{v}:predict",
            headers=headers,
            json={"instances": ["the cat sat on the mat"]},
        )
        for v in (1, 2)
    ]
    assert [a.status_code for a in answers] == [200, 200], answers[1].text
    labels = [a.json()["predictions"][0]["label"] for a in answers]
    assert labels[0] == labels[1]


@pytest.mark.parametrize(
    ("body", "status", "param", "says"),
    [
        ({"recipe": "quantize int8-dynamic -> prune 0.5"}, 400, "recipe", "comes after"),
        ({"recipe": "prune 0.5 -> prune 0.3"}, 400, "recipe", "one prune step"),
        ({"recipe": "prune 1.5"}, 400, "recipe", "above 0 and below 1"),
        ({"recipe": "quantize int3"}, 400, "recipe", "method is one of"),
        ({"recipe": "quantize int4"}, 400, "recipe", "stores an LLM's weights"),
        ({"recipe": "share 4 -> quantize int8-dynamic"}, 400, "recipe", "not both"),
        ({"recipe": "melt"}, 400, "recipe", "unknown step"),
        ({"recipe": []}, 400, "recipe", "at least one step"),
        ({"recipe": "prune 0.5", "model": "nope"}, 404, "model", "not found"),
        ({"recipe": "prune 0.5", "model": "linear"}, 400, "recipe", "onnx runtime"),
        ({"recipe": "prune 0.5", "model": "shared-cnn"}, 400, "name", "shared"),
    ],
)  # fmt: skip
def test_a_recipe_that_cannot_run_is_refused_before_anything_is_queued(
    app_client, tenant_keys, acme_cnn, tmp_path, body, status, param, says
):
    from tests.fixtures import make_onnx

    registry = app_client.app.state.registry
    acme = app_client.app.state.tenants.get_id("acme")
    registry.import_model(make_onnx(tmp_path / "linear.onnx"), "linear", owner=acme)
    registry.import_model(make_cnn_folder(tmp_path / "shared"), "shared-cnn")
    registry.import_model(make_lstm_folder(tmp_path / "words"), "words", owner=acme)
    answer = optimize(app_client, tenant_keys["acme"], **{"model": "cnn", **body})
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert says in error["message"] and error["param"] == param
    jobs = app_client.get("/api/v1/jobs", headers=tenant_keys["admin"]).json()["data"]
    assert jobs == []


def test_text_classifiers_pruned_structured_shrink_and_serve(
    app_client, tenant_keys, settings, tmp_path
):
    from tests.fixtures import make_transformer_folder

    acme = app_client.app.state.tenants.get_id("acme")
    registry = app_client.app.state.registry
    registry.import_model(make_lstm_folder(tmp_path / "lstm"), "words", owner=acme)
    registry.import_model(make_transformer_folder(tmp_path / "tf"), "attends", owner=acme)
    headers = tenant_keys["acme"]
    for model, what in (("words", "hidden_size"), ("attends", "dim_feedforward")):
        job = optimized(app_client, headers, settings, model=model, recipe="prune 0.5 structured")
        before, after = (
            registry.open_version(f"{model}:{v}").manifest.config["arguments"][what] for v in (1, 2)
        )
        assert after == before // 2
        assert job["result"]["parameters_ratio"] < 1
        answer = app_client.post(
            f"/v1/models/{model}:2:predict",
            headers=headers,
            json={"instances": ["the cat sat on the mat"]},
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["predictions"][0]["label"] in ("negative", "positive")


def test_only_maintainers_of_the_models_tenant_optimize_it(app_client, tenant_keys, acme_cnn):
    user = optimize(app_client, tenant_keys["acme-user"], model="cnn", recipe="prune 0.5")
    assert user.status_code == 403
    other = optimize(app_client, tenant_keys["globex"], model="cnn", recipe="prune 0.5")
    assert other.status_code == 404
    anonymous = app_client.post("/api/v1/optimizations", json={"model": "cnn", "recipe": "x"})
    assert anonymous.status_code == 401


def test_shared_weights_store_a_codebook_and_serve_close_to_the_parent(
    app_client, tenant_keys, settings, tmp_path
):
    from safetensors.torch import load_file

    from maas.runtime.shared_weights import unpack

    tenants = app_client.app.state.tenants
    registry = app_client.app.state.registry
    folder = make_cnn_folder(tmp_path / "wide", seed=1)
    registry.import_model(folder, "wide", owner=tenants.get_id("acme"))
    headers = tenant_keys["acme"]
    job = optimized(app_client, headers, settings, model="wide", recipe="prune 0.3 -> share 4")
    child = registry.open_version("wide:2")
    assert child.manifest.config["quantization"] == "weight-sharing"
    stored = load_file(registry.folder(child.record) / "model.safetensors")
    parent = load_file(folder / "model.safetensors")
    for key, weight in parent.items():
        if weight.dim() < 2:
            assert torch.equal(stored[key], weight)  # biases are kept as they were
            continue
        assert key not in stored and stored[f"{key}.codebook"].shape == (16,)
        codes = unpack(stored[f"{key}.codes"].numpy(), 4, weight.numel())
        assert codes.max() < 16 and stored[f"{key}.codebook"][0] == 0  # pruned zeros kept
        assert len(stored[f"{key}.codes"]) == (weight.numel() * 4 + 7) // 8
    assert job["result"]["top1_agreement"] >= 0.8
    assert job["result"]["sparsity"] >= 0.25  # the pruned zeros are still zeros
    images = np.random.default_rng(1).standard_normal((4, 3, 16, 16)).astype(np.float32)
    outputs = [infer(app_client, headers, "wide", v, images) for v in (1, 2)]
    assert outputs[0].shape == outputs[1].shape == (4, 3)


def test_structured_pruning_shrinks_the_architecture_and_serves(
    app_client, tenant_keys, settings, acme_cnn
):
    headers = tenant_keys["acme"]
    job = optimized(app_client, headers, settings, model="cnn", recipe="prune 0.5 structured")
    manifest = app_client.app.state.registry.open_version("cnn:2").manifest
    arguments = manifest.config["arguments"]
    assert arguments["channels"] == [2, 4] and arguments["hidden"] == 8  # from [4, 8] and 16
    assert job["result"]["parameters_ratio"] < 0.4
    assert job["result"]["artifact_bytes_ratio"] < 0.6
    assert "channels [4, 8] -> [2, 4]" in manifest.recipe["notes"][0]
    images = np.random.default_rng(2).standard_normal((5, 3, 16, 16)).astype(np.float32)
    assert infer(app_client, headers, "cnn", 2, images).shape == (5, 3)
