"""Hugging Face encoders through the transformers runtime: classifiers, and encrypted weights."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from transformers import BertForSequenceClassification, ViTForImageClassification

from maas.api.app import build_app
from maas.artifacts.keyring import MasterKeyring
from maas.auth.bootstrap import ensure_admin_key
from maas.config import Settings
from maas.tasks.images import ImagePreprocessing, decode_image
from tests.fixtures import make_bert_classifier, make_png, make_vit_classifier
from tests.integration.conftest import bearer


def test_text_classification_matches_the_model_run_directly(served, tmp_path):
    folder = make_bert_classifier(tmp_path / "bert-cls")
    record = served.app.state.registry.import_model(folder, "topic")
    assert (record.task, record.runtime) == ("text-classification", "transformers")
    response = served.post(
        "/v1/models/topic:predict", json={"instances": ["the big dog", "a red car"], "top_k": 3}
    )
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    model = BertForSequenceClassification.from_pretrained(folder).eval()
    ids = {"the": 4, "big": 11, "dog": 6, "a": 10, "red": 12, "car": 13}
    for text, prediction in zip(["the big dog", "a red car"], predictions, strict=True):
        tokens = torch.tensor([[2, *[ids[w] for w in text.split()], 3]])
        with torch.no_grad():
            probabilities = torch.softmax(model(input_ids=tokens).logits, -1)[0]
        best = int(probabilities.argmax())
        assert prediction["label"] == ["negative", "neutral", "positive"][best]
        assert prediction["score"] == pytest.approx(float(probabilities[best]), rel=1e-4)
        assert [item["label"] for item in prediction["top_k"]] != []


def test_image_classification_matches_the_model_run_directly(served, tmp_path):
    folder = make_vit_classifier(tmp_path / "vit")
    served.app.state.registry.import_model(folder, "colours")
    png = make_png((20, 220, 40), size=(30, 30))
    response = served.post(
        "/v1/models/colours:predict", files=[("file", ("g.png", png, "image/png"))]
    )
    assert response.status_code == 200, response.text
    [prediction] = response.json()["predictions"]
    spec = ImagePreprocessing(16, 16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    pixels = torch.from_numpy(decode_image(png, spec)[None])
    model = ViTForImageClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        probabilities = torch.softmax(model(pixel_values=pixels).logits, -1)[0]
    best = int(probabilities.argmax())
    assert prediction["label"] == ["red", "green"][best]
    assert prediction["score"] == pytest.approx(float(probabilities[best]), rel=1e-4)
    meta = served.get("/v2/models/colours").json()
    assert meta["inputs"][0]["name"] == "pixel_values" and meta["outputs"][0]["shape"] == [-1, 2]


def test_an_encrypted_embedder_serves_the_same_vectors(settings, model_sources):
    plain_settings = settings
    vectors = {}
    for name, configured in (("plain", plain_settings), ("sealed", None)):
        if configured is None:
            home = settings.home.parent / "sealed-home"
            home.mkdir()
            MasterKeyring.create(home / "master.keys")
            configured = Settings(
                home=home, allowed_hosts=["testserver"], encryption_key_file=home / "master.keys"
            )
        with TestClient(build_app(configured)) as client:
            key = ensure_admin_key(configured, client.app.state.keys)
            record = client.app.state.registry.import_model(model_sources / "bert", "embedder")
            opened = client.app.state.registry.open_version(record.reference)
            assert bool(opened.data_keys) == (name == "sealed")
            response = client.post(
                "/v1/embeddings",
                json={"model": "embedder", "input": ["the cat", "a dog"]},
                headers=bearer(key),
            )
            assert response.status_code == 200, response.text
            vectors[name] = np.array([item["embedding"] for item in response.json()["data"]])
    np.testing.assert_allclose(vectors["sealed"], vectors["plain"], rtol=1e-6)


def test_serving_metrics(served):
    png = base64.b64encode(make_png()).decode()
    served.post("/v1/models/cnn:predict", json={"instances": [{"b64": png}]})
    served.post("/v1/models/cnn:predict", json={"instances": [{"b64": "bad"}]})
    text = served.get("/metrics").text
    assert 'maas_inference_requests_total{model="cnn",outcome="success",version="1"} 1.0' in text
    assert (
        'maas_inference_requests_total{model="cnn",outcome="client_error",version="1"} 1.0' in text
    )
    assert 'maas_model_load_seconds_count{model="cnn",version="1"} 1.0' in text
    assert 'maas_inference_queue_rows{model="cnn",version="1"} 0.0' in text
    assert 'maas_model_memory_bytes{model="cnn",version="1"}' in text
