"""Inference through HTTP: v2 infer, :predict and embeddings, and their errors."""

from __future__ import annotations

import base64

import numpy as np
import onnxruntime
import pytest
import torch
from safetensors.torch import load_file

from maas.runtime.architectures import build
from tests.fixtures import WEIGHT_PATTERN, make_png
from tests.integration.serving.conftest import concurrently


def v2_error(response, status):
    assert response.status_code == status, response.text
    assert set(response.json()) == {"error"}
    return response.json()["error"]


def openai_error(response, status, code=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    if code:
        assert error["code"] == code
    return error


def test_v2_infer_json_matches_the_model_run_directly(served, model_sources):
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    body = {
        "id": "r1",
        "inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": x.ravel().tolist()}],
    }
    response = served.post("/v2/models/linear/infer", json=body)
    assert response.status_code == 200, response.text
    result = response.json()
    assert (result["model_name"], result["model_version"], result["id"]) == ("linear", "1", "r1")
    [output] = result["outputs"]
    session = onnxruntime.InferenceSession(str(model_sources / "linear.onnx"))
    expected = session.run(["y"], {"x": x})[0]
    np.testing.assert_allclose(
        np.array(output["data"]).reshape(output["shape"]), expected, rtol=1e-6
    )
    np.testing.assert_allclose(expected, x @ WEIGHT_PATTERN + 1, rtol=1e-6)


def test_v2_metadata_lists_tensors_of_every_runtime(served):
    assert served.get("/v2/models/cnn").json()["inputs"] == [
        {"name": "input", "datatype": "FP32", "shape": [-1, 3, 16, 16]}
    ]
    embedder = served.get("/v2/models/embedder").json()
    assert [i["name"] for i in embedder["inputs"]] == [
        "input_ids",
        "attention_mask",
        "token_type_ids",
    ]
    assert embedder["outputs"][0]["shape"] == [-1, -1, 16]


def test_predict_images_json_and_multipart(served, model_sources):
    png = make_png((10, 200, 30))
    body = {"instances": [{"b64": base64.b64encode(png).decode()}], "top_k": 2}
    response = served.post("/v1/models/cnn:predict", json=body)
    assert response.status_code == 200, response.text
    [prediction] = response.json()["predictions"]
    assert len(prediction["top_k"]) == 2 and prediction["label"] in ("cat", "dog", "bird")
    # the same numbers as the module run directly on the same preprocessing
    module = build(
        "small-cnn",
        {"num_classes": 3, "in_channels": 3, "image_size": 16, "channels": [4, 8], "hidden": 16},
    )
    module.load_state_dict(load_file(model_sources / "cnn" / "model.safetensors"))
    pixels = np.full((1, 3, 16, 16), 0, np.float32)
    for channel, value in enumerate((10, 200, 30)):
        pixels[0, channel] = (value / 255 - 0.5) / 0.5
    with torch.no_grad():
        probabilities = torch.softmax(module.eval()(torch.from_numpy(pixels)), -1)[0]
    best = int(probabilities.argmax())
    assert prediction["label"] == ["cat", "dog", "bird"][best]
    assert prediction["score"] == pytest.approx(float(probabilities[best]), rel=1e-4)

    files = [("file", ("a.png", png, "image/png")), ("file", ("b.png", make_png(), "image/png"))]
    response = served.post("/v1/models/cnn:predict", files=files)
    assert response.status_code == 200 and len(response.json()["predictions"]) == 2


def test_predict_texts(served):
    response = served.post(
        "/v1/models/sentiment:predict", json={"instances": ["the cat sat", "a big red car"]}
    )
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert len(predictions) == 2
    for prediction in predictions:
        assert prediction["label"] in ("negative", "positive")
        assert sum(item["score"] for item in prediction["top_k"]) == pytest.approx(1.0)


def test_embeddings_float_base64_tokens_and_usage(served):
    response = served.post(
        "/v1/embeddings", json={"model": "embedder", "input": ["the cat", "a dog"]}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list" and body["model"] == "embedder"
    vectors = np.array([item["embedding"] for item in body["data"]])
    assert vectors.shape == (2, 16)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)  # normalised
    assert body["usage"] == {"prompt_tokens": 8, "total_tokens": 8}  # [CLS] w w [SEP] twice

    encoded = served.post(
        "/v1/embeddings",
        json={"model": "embedder", "input": "the cat", "encoding_format": "base64"},
    ).json()["data"][0]["embedding"]
    np.testing.assert_allclose(
        np.frombuffer(base64.b64decode(encoded), "<f4"), vectors[0], rtol=1e-6
    )

    tokens = served.post("/v1/embeddings", json={"model": "embedder", "input": [2, 4, 5, 3]}).json()
    np.testing.assert_allclose(tokens["data"][0]["embedding"], vectors[0], rtol=1e-5)
    same = served.post(
        "/v1/embeddings", json={"model": "embedder", "input": "the cat", "dimensions": 16}
    )
    assert same.status_code == 200


def test_embeddings_do_not_depend_on_batch_company(served):
    alone = served.post("/v1/embeddings", json={"model": "embedder", "input": "the cat"}).json()
    crowd = ["a big red car runs fast on the mat", "the cat", "dog"]
    batched = concurrently(
        served,
        [
            ("POST", "/v1/embeddings", {"json": {"model": "embedder", "input": text}})
            for text in crowd
        ],
    )
    np.testing.assert_allclose(
        batched[1].json()["data"][0]["embedding"], alone["data"][0]["embedding"], atol=1e-5
    )


def test_batches_form_under_concurrent_requests(served):
    served.patch(
        "/api/v1/models/embedder", json={"serving": {"max_batch_size": 64, "max_delay_ms": 50}}
    )
    responses = concurrently(
        served,
        [
            ("POST", "/v1/embeddings", {"json": {"model": "embedder", "input": f"the cat {i}"}})
            for i in range(24)
        ],
    )
    assert all(r.status_code == 200 for r in responses)
    metrics = served.get("/metrics").text
    single = _bucket(metrics, "embedder", "1.0")
    total = _count(metrics, "embedder")
    assert total < 24, "24 concurrent requests should have shared forward passes"
    assert single < total  # some batches held more than one row


def _bucket(metrics: str, model: str, le: str) -> float:
    for line in metrics.splitlines():
        if (
            line.startswith("maas_inference_batch_rows_bucket")
            and f'model="{model}"' in line
            and f'le="{le}"' in line
        ):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no batch histogram")


def _count(metrics: str, model: str) -> float:
    for line in metrics.splitlines():
        if line.startswith("maas_inference_batch_rows_count") and f'model="{model}"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no batch histogram")


def test_inference_is_metered(served):
    served.post("/v1/embeddings", json={"model": "embedder", "input": ["the cat", "a dog"]})
    served.post(
        "/v1/models/cnn:predict",
        json={"instances": [{"b64": base64.b64encode(make_png()).decode()}] * 3},
    )
    served.app.state.recorder.flush()
    rows = served.get("/api/v1/usage?group_by=model&group_by=endpoint").json()["data"]
    by = {(r["group"]["model"], r["group"]["endpoint"]): r for r in rows}
    assert by[("embedder", "POST /v1/embeddings")]["prompt_tokens"] == 8
    assert by[("embedder", "POST /v1/embeddings")]["items"] == 2
    assert by[("cnn", "POST /v1/models/{model}:predict")]["items"] == 3


V2_ERRORS = [
    ({"inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [1] * 6}]}, "shape"),
    (
        {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "INT32", "data": [1] * 4}]},
        "datatype",
    ),
    ({"inputs": [{"name": "nope", "shape": [1, 4], "datatype": "FP32", "data": [1] * 4}]}, "nope"),
    ({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1] * 3}]}, "x"),
    ({"inputs": []}, "x"),
]


@pytest.mark.parametrize(("body", "mentions"), V2_ERRORS)
def test_v2_bad_tensors_are_400(served, body, mentions):
    assert mentions in v2_error(served.post("/v2/models/linear/infer", json=body), 400)


def test_v2_bad_bodies_and_unknown_models(served):
    assert "JSON" in v2_error(served.post("/v2/models/linear/infer", content=b"{nope"), 400)
    v2_error(
        served.post(
            "/v2/models/linear/infer",
            content=b"abc",
            headers={"Inference-Header-Content-Length": "99"},
        ),
        400,
    )
    v2_error(served.post("/v2/models/nope/infer", json={"inputs": []}), 404)
    v2_error(served.post("/v2/models/linear/versions/7/infer", json={"inputs": []}), 404)


def test_predict_errors(served):
    bad = {"instances": [{"b64": base64.b64encode(b"not an image").decode()}]}
    assert (
        "could not be decoded"
        in openai_error(served.post("/v1/models/cnn:predict", json=bad), 400)["message"]
    )
    openai_error(served.post("/v1/models/cnn:predict", json={"instances": [{"b64": "%%%"}]}), 400)
    openai_error(served.post("/v1/models/cnn:predict", json={"instances": ["a text"]}), 400)
    openai_error(served.post("/v1/models/cnn:predict", json={"instances": []}), 400)
    too_many = {"instances": ["x"] * 2049}
    openai_error(served.post("/v1/models/sentiment:predict", json=too_many), 400)
    openai_error(
        served.post("/v1/models/linear:predict", json={"instances": ["x"]}),
        400,
        "unsupported_format",
    )
    openai_error(
        served.post("/v1/models/nope:predict", json={"instances": ["x"]}), 404, "model_not_found"
    )
    openai_error(served.post("/v1/models/cnn:predict", files=[("other", ("a", b"x"))]), 400)
    huge = _huge_png()
    response = served.post(
        "/v1/models/cnn:predict", json={"instances": [{"b64": base64.b64encode(huge).decode()}]}
    )
    openai_error(response, 413)


def _huge_png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("1", (8000, 8000)).save(buffer, format="PNG")  # 64 megapixels, a few KB
    return buffer.getvalue()


EMBEDDING_ERRORS = [
    ({"model": "embedder", "input": ""}, "input"),
    ({"model": "embedder", "input": []}, "input"),
    ({"model": "embedder", "input": ["ok", ""]}, "input"),
    ({"model": "embedder", "input": [[999999]]}, "input"),
    ({"model": "embedder", "input": ["x"] * 2049}, "input"),
    ({"model": "embedder", "input": "x", "dimensions": 8}, "dimensions"),
    ({"model": "embedder", "input": "x", "encoding_format": "hex"}, "encoding_format"),
    ({"model": "cnn", "input": "x"}, "model"),
    ({"input": "x"}, "model"),
]


@pytest.mark.parametrize(("body", "param"), EMBEDDING_ERRORS)
def test_embedding_errors_are_openai_shaped_400s(served, body, param):
    error = openai_error(served.post("/v1/embeddings", json=body), 400)
    assert error["type"] == "invalid_request_error"
    assert param in (error["param"] or "") or param in error["message"]


def test_unknown_embedding_model_is_404(served):
    openai_error(
        served.post("/v1/embeddings", json={"model": "nope", "input": "x"}), 404, "model_not_found"
    )


def test_a_full_queue_answers_503_with_retry_after(served, monkeypatch):
    import time as clock

    from maas.runtime.classic.onnx import OnnxRuntime

    served.patch(
        "/api/v1/models/linear", json={"serving": {"max_batch_size": 1, "max_queue_rows": 1}}
    )
    real_predict = OnnxRuntime.predict

    def slow_predict(self, inputs):
        clock.sleep(0.2)
        return real_predict(self, inputs)

    monkeypatch.setattr(OnnxRuntime, "predict", slow_predict)
    body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    responses = concurrently(served, [("POST", "/v2/models/linear/infer", {"json": body})] * 6)
    statuses = sorted(r.status_code for r in responses)
    assert 200 in statuses and 503 in statuses and set(statuses) <= {200, 503}
    refused = next(r for r in responses if r.status_code == 503)
    assert int(refused.headers["retry-after"]) >= 1
    assert "queue is full" in refused.json()["error"]
