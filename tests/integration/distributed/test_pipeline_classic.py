"""A classic model (the small CNN) split into pipeline stages behind the same v2 and
``:predict`` routes: outputs equal to the unsplit model's, a stage's error fails only its
batch, a dead stage gives 503 and the model loads again; models that cannot be split are
refused when the setting is made."""

from __future__ import annotations

import base64
import os
import signal
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tests.fixtures import make_png
from tests.integration.serving.test_llm_reliability import wait_until

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def served(client, model_sources):
    registry = client.app.state.registry
    registry.import_model(model_sources / "cnn", "cnn")
    registry.import_model(model_sources / "linear.onnx", "linear")
    registry.import_model(model_sources / "bert", "embedder")
    return client


def infer(client, pixels: np.ndarray):
    body = {
        "inputs": [
            {
                "name": "input",
                "datatype": "FP32",
                "shape": list(pixels.shape),
                "data": pixels.ravel().tolist(),
            }
        ]
    }
    return client.post("/v2/models/cnn/infer", json=body)


def logits(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    [output] = response.json()["outputs"]
    return np.array(output["data"], dtype=np.float32).reshape(output["shape"])


def pool_deployment(client, name):
    pool = client.app.state.serving.pool
    return next((d for d in pool.deployments() if d.record.name == name), None)


def split(client, name: str, stages: int):
    return client.patch(f"/api/v1/models/{name}", json={"serving": {"pipeline_stages": stages}})


def test_the_cnn_in_two_stages_answers_as_the_whole_model(served, capfd):
    pixels = np.random.default_rng(0).standard_normal((5, 3, 16, 16)).astype(np.float32)
    png = base64.b64encode(make_png((10, 200, 30))).decode()
    predict = {"instances": [{"b64": png}, {"b64": png}], "top_k": 3}
    whole = logits(infer(served, pixels))
    whole_predictions = served.post("/v1/models/cnn:predict", json=predict).json()
    assert pool_deployment(served, "cnn").runtime.__class__.__name__ == "TorchModuleRuntime"

    assert split(served, "cnn", 2).status_code == 200
    assert served.post("/v2/repository/models/cnn/unload").status_code == 200
    staged = logits(infer(served, pixels))
    runtime = pool_deployment(served, "cnn").runtime
    assert len(runtime.processes) == 2 and [len(s.units) for s in runtime.plan.stages] != [0, 0]
    np.testing.assert_allclose(staged, whole, rtol=1e-5, atol=1e-6)
    predictions = served.post("/v1/models/cnn:predict", json=predict).json()
    assert [p["label"] for p in predictions["predictions"]] == [
        p["label"] for p in whole_predictions["predictions"]
    ]
    one = logits(infer(served, pixels[:1]))  # one row: one micro-batch
    np.testing.assert_allclose(one, whole[:1], rtol=1e-5, atol=1e-6)

    # a batch that breaks a later stage fails alone; the pipeline goes on
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        runtime.predict({"input": np.zeros((2, 3, 8, 8), np.float32)})
    # the stage logged it (before passing it on) as the server logs, under its own name
    said = capfd.readouterr().err.splitlines()
    prefix = "WARNING:  (stage-1-cnn:1) pipeline stage 1 failed a micro-batch: mat1 and mat2"
    assert any(line.startswith(prefix) for line in said), said
    np.testing.assert_allclose(logits(infer(served, pixels)), whole, rtol=1e-5, atol=1e-6)

    # a stage that dies under a request: 503 at once, then the model loads again on its own
    stage = runtime.processes[1]
    os.kill(stage.pid, signal.SIGSTOP)  # the request below waits on it
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(infer, served, pixels)
        assert wait_until(runtime._lock.locked), "the batch never reached the stages"
        os.kill(stage.pid, signal.SIGKILL)
        response = waiting.result(timeout=30)
    assert response.status_code == 503, response.text  # the stage's error, or the unload's
    assert wait_until(lambda: runtime.dead)
    assert wait_until(lambda: (d := pool_deployment(served, "cnn")) is not None
                      and d.runtime is not runtime, 60)  # fmt: skip
    np.testing.assert_allclose(logits(infer(served, pixels)), whole, rtol=1e-5, atol=1e-6)
    assert not any(p.is_alive() for p in runtime.processes)


def test_models_that_cannot_be_split_are_refused_when_set(served):
    response = split(served, "linear", 2)
    assert response.status_code == 400
    assert "onnx runtime cannot be split" in response.json()["error"]["message"]
    response = split(served, "embedder", 3)
    assert response.status_code == 400
    assert split(served, "linear", 1).status_code == 200  # 1: whole, always fine
