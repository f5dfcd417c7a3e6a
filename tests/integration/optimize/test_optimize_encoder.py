"""A Hugging Face encoder quantized to dynamic int8 (stored as int8 weights with scales, run
by the transformers runtime as dynamically quantized linears) or exported to ONNX (float, or
quantized by ONNX Runtime, dynamic or calibrated static), through the parent's routes."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.torch import load_file

from tests.fixtures import make_bert_classifier, make_bert_embedder
from tests.integration.optimize.test_optimize_job import optimize, optimized
from tests.integration.training.test_train_job import upload

pytestmark = pytest.mark.timeout(300)

TEXTS = ["the cat sat on the mat", "a big red car runs fast", "the dog runs", "red mat"]


def _imported(client, folder, name: str):
    """The app's registry, with ``folder`` imported as ``name`` for tenant acme."""
    registry = client.app.state.registry
    registry.import_model(folder, name, owner=client.app.state.tenants.get_id("acme"))
    return registry


def _predictions(client, headers, reference: str) -> list[dict]:
    answer = client.post(
        f"/v1/models/{reference}:predict", headers=headers, json={"instances": TEXTS}
    )
    assert answer.status_code == 200, answer.text
    return answer.json()["predictions"]


def test_an_int8_embedder_serves_embeddings_close_to_its_parent(
    app_client, tenant_keys, settings, tmp_path
):
    registry = _imported(app_client, make_bert_embedder(tmp_path / "bert"), "bert")
    headers = tenant_keys["acme"]
    evaluation = tmp_path / "texts.jsonl"
    evaluation.write_text("".join(f'{{"text": "{t}"}}\n' for t in TEXTS))
    job = optimized(
        app_client,
        headers,
        settings,
        model="bert",
        recipe="quantize int8-dynamic",
        evaluation_file=upload(app_client, headers, evaluation),
    )
    result = job["result"]
    child = registry.open_version("bert:2")
    assert child.manifest.config["maas_quantization"] in ("int8-dynamic", "int8-dynamic-a8")
    assert "activations kept (mean error to float" in child.manifest.recipe["notes"][0]
    assert child.manifest.task == "embeddings" and child.manifest.runtime == "transformers"
    stored = load_file(registry.folder(child.record) / "model.safetensors")
    int8 = [k for k, v in stored.items() if v.dtype.is_floating_point is False and v.dim() == 2]
    assert int8 and all(f"{k}_scale" in stored for k in int8)
    assert result["artifact_bytes_ratio"] < 1
    assert result["cosine_to_parent"] >= 0.98 and result["evaluation_texts"] == 32  # 4, repeated
    assert {"latency_ms_p50", "throughput_per_s_ratio", "max_abs_diff"} <= set(result)
    vectors = [_embeddings(app_client, headers, f"bert:{v}") for v in (1, 2)]
    cosine = (vectors[0] * vectors[1]).sum(axis=1)  # both normalised
    assert cosine.min() >= 0.97
    assert not np.allclose(vectors[0], vectors[1])  # the child really runs in int8


def test_an_int8_text_classifier_gives_its_parent_s_labels(
    app_client, tenant_keys, settings, tmp_path
):
    _imported(app_client, make_bert_classifier(tmp_path / "bert"), "judge")
    headers = tenant_keys["acme"]
    evaluation = tmp_path / "texts.csv"
    evaluation.write_text("text\n" + "\n".join(TEXTS) + "\n")
    job = optimized(
        app_client,
        headers,
        settings,
        model="judge",
        recipe="quantize int8-dynamic",
        evaluation_file=upload(app_client, headers, evaluation),
    )
    predictions = [_predictions(app_client, headers, f"judge:{v}") for v in (1, 2)]
    # The report's agreement is what the two versions answer (this random tiny model's
    # logits nearly tie, so int8 rounding may flip some labels: the report must say so).
    same = [a["label"] == b["label"] for a, b in zip(*predictions, strict=True)]
    assert job["result"]["top1_agreement"] == pytest.approx(sum(same) / len(same))
    assert job["result"]["max_abs_diff"] < 0.01
    for parent, child in zip(*predictions, strict=True):
        assert child["score"] == pytest.approx(parent["score"], abs=0.01)


@pytest.mark.parametrize(
    ("recipe", "says"),
    [
        ("prune 0.5", "runs quantize int8-dynamic, export onnx"),
        ("share 4", "runs quantize int8-dynamic, export onnx"),
        ("quantize int8-static", "end the recipe with export onnx"),
        ("quantize int8-static -> export onnx", "give a training_file"),
        ("export gguf", "re-encodes a GGUF LLM"),
    ],
)
def test_other_encoder_steps_and_requantizing_are_refused(
    app_client, tenant_keys, settings, tmp_path, recipe, says
):
    _imported(app_client, make_bert_embedder(tmp_path / "bert"), "bert")
    headers = tenant_keys["acme"]
    answer = optimize(app_client, headers, model="bert", recipe=recipe)
    assert answer.status_code == 400 and says in answer.json()["error"]["message"]
    optimized(app_client, headers, settings, model="bert", recipe="quantize int8-dynamic")
    again = optimize(app_client, headers, model="bert:2", recipe="quantize int8-dynamic")
    assert again.status_code == 400 and "already; optimize its float parent" in again.text


def _embeddings(client, headers, reference: str) -> np.ndarray:
    answer = client.post(
        "/v1/embeddings", headers=headers, json={"model": reference, "input": TEXTS}
    )
    assert answer.status_code == 200, answer.text
    return np.array([row["embedding"] for row in answer.json()["data"]])


def _ops(registry, reference: str) -> set[str]:
    import onnx

    opened = registry.open_version(reference)
    return {
        node.op_type
        for node in onnx.load_model_from_string(opened.read_bytes("model.onnx")).graph.node
    }


def test_an_embedder_exported_to_onnx_serves_the_same_embeddings(
    app_client, tenant_keys, settings, tmp_path
):
    registry = _imported(app_client, make_bert_embedder(tmp_path / "bert"), "bert")
    headers = tenant_keys["acme"]
    job = optimized(app_client, headers, settings, model="bert", recipe="export onnx")
    result = job["result"]
    parent, child = (registry.open_version(f"bert:{v}").manifest for v in (1, 2))
    assert (child.format, child.runtime, child.task) == ("onnx", "onnx", "embeddings")
    for option in ("pooling", "normalize"):
        assert child.task_options.get(option) == parent.task_options.get(option)
    assert child.task_options["max_seq_length"] > 0
    assert "exported to ONNX (float32)" in child.recipe["notes"][0]
    assert result["max_abs_diff"] < 1e-4 and result["cosine_to_parent"] > 0.9999
    served = [_embeddings(app_client, headers, f"bert:{v}") for v in (1, 2)]
    np.testing.assert_allclose(served[1], served[0], atol=1e-5)
    assert "MatMulInteger" not in _ops(registry, "bert:2")


def test_a_classifier_exported_in_dynamic_int8_keeps_its_labels(
    app_client, tenant_keys, settings, tmp_path
):
    import onnx

    registry = _imported(app_client, make_bert_classifier(tmp_path / "bert"), "judge")
    headers = tenant_keys["acme"]
    job = optimized(
        app_client, headers, settings, model="judge", recipe="quantize int8-dynamic -> export onnx"
    )
    child = registry.open_version("judge:2").manifest
    assert child.labels == registry.open_version("judge:1").manifest.labels
    assert "int8 weights in MatMul and Gemm" in child.recipe["notes"][0]
    assert "MatMulInteger" in _ops(registry, "judge:2")
    opened = registry.open_version("judge:2")
    assert job["result"]["artifact_bytes"] == sum(f.size for f in opened.manifest.files)
    graph = onnx.load_model_from_string(opened.read_bytes("model.onnx")).graph
    assert any(i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 2 for i in graph.initializer)
    predictions = [_predictions(app_client, headers, f"judge:{v}") for v in (1, 2)]
    same = [a["label"] == b["label"] for a, b in zip(*predictions, strict=True)]
    assert job["result"]["top1_agreement"] == pytest.approx(sum(same) / len(same))
    for parent, child_answer in zip(*predictions, strict=True):
        assert child_answer["score"] == pytest.approx(parent["score"], abs=0.02)


def test_an_embedder_in_static_int8_is_calibrated_on_the_training_texts(
    app_client, tenant_keys, settings, tmp_path
):
    registry = _imported(app_client, make_bert_embedder(tmp_path / "bert"), "bert")
    headers = tenant_keys["acme"]
    training = tmp_path / "texts.csv"
    training.write_text("text\n" + "\n".join(TEXTS * 10) + "\n")
    job = optimized(
        app_client,
        headers,
        settings,
        model="bert",
        recipe="quantize int8-static -> export onnx",
        training_file=upload(app_client, headers, training),
    )
    notes = registry.open_version("bert:2").manifest.recipe["notes"]
    assert "static int8 (ONNX Runtime, QDQ), calibrated on 40 examples" in notes[0]
    assert {"QuantizeLinear", "DequantizeLinear"} <= _ops(registry, "bert:2")
    assert job["result"]["cosine_to_parent"] > 0.9
    served = _embeddings(app_client, headers, "bert:2")
    assert served.shape == (len(TEXTS), _embeddings(app_client, headers, "bert:1").shape[1])
