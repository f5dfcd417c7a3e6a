"""Moving an alias under a steady stream of requests: no request fails, new requests move to
the new version once it is loaded, and a version that cannot load changes nothing."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from tests.fixtures import WEIGHT_PATTERN, make_broken_onnx, make_onnx

BODY = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 1, 1, 1]}]}
V1 = (np.ones((1, 4), np.float32) @ WEIGHT_PATTERN + 1).ravel()
V2 = (np.ones((1, 4), np.float32) @ (WEIGHT_PATTERN * 2) + 1).ravel()


def stream(client, stop: threading.Event, path: str) -> list[tuple[float, int, list[float]]]:
    """Requests one after another until told to stop: (time, status, output)."""
    seen = []
    while not stop.is_set():
        response = client.post(path, json=BODY)
        output = response.json()["outputs"][0]["data"] if response.status_code == 200 else []
        seen.append((time.monotonic(), response.status_code, output))
    return seen


def run_while(client, action, path="/v2/models/linear/infer", clients=4):
    stop = threading.Event()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        futures = [pool.submit(stream, client, stop, path) for _ in range(clients)]
        time.sleep(0.3)
        result = action()
        moved_at = time.monotonic()
        time.sleep(0.5)
        stop.set()
        seen = [item for future in futures for item in future.result()]
    return result, moved_at, seen


def test_alias_switch_under_load_fails_no_request(served, tmp_path):
    registry = served.app.state.registry
    registry.import_model(make_onnx(tmp_path / "v2.onnx", scale=2.0), "linear")  # version 2
    served.post("/v2/models/linear/infer", json=BODY)  # version 1 is being served

    response, moved_at, seen = run_while(
        served, lambda: served.put("/api/v1/models/linear/aliases/production", json={"version": 2})
    )
    assert response.status_code == 200, response.text
    assert len(seen) > 20
    assert all(status == 200 for _, status, _ in seen), {status for _, status, _ in seen}
    outputs = [np.array(output) for _, _, output in seen]
    assert all(np.allclose(o, V1) or np.allclose(o, V2) for o in outputs)
    after = [np.array(output) for when, _, output in seen if when > moved_at + 0.05]
    assert after and all(np.allclose(o, V2) for o in after)
    before = [np.array(output) for when, _, output in seen if when < moved_at - 0.25]
    assert before and all(np.allclose(o, V1) for o in before)


def test_a_version_that_cannot_load_leaves_the_old_one_serving(served, tmp_path):
    registry = served.app.state.registry
    registry.import_model(make_broken_onnx(tmp_path / "broken.onnx"), "linear")  # version 2
    served.post("/v2/models/linear/infer", json=BODY)

    response, _, seen = run_while(
        served, lambda: served.put("/api/v1/models/linear/aliases/production", json={"version": 2})
    )
    assert response.status_code == 409
    message = response.json()["error"]["message"]
    assert "linear:2 failed to load" in message and "was not moved" in message
    assert registry.resolve("linear@production").version == 1
    assert seen and all(status == 200 for _, status, _ in seen)
    assert all(np.allclose(output, V1) for _, _, output in seen)


def test_an_alias_moved_elsewhere_to_a_broken_version_keeps_the_old_one_serving(served, tmp_path):
    registry = served.app.state.registry
    registry.import_model(make_broken_onnx(tmp_path / "broken.onnx"), "linear")
    assert served.post("/v2/models/linear/infer", json=BODY).status_code == 200
    registry.set_alias("linear", "production", 2)  # as the CLI would, from another process
    response = served.post("/v2/models/linear/infer", json=BODY)
    assert response.status_code == 200
    np.testing.assert_allclose(response.json()["outputs"][0]["data"], V1)
    assert response.json()["model_version"] == "1"
    direct = served.post("/v2/models/linear/versions/2/infer", json=BODY)
    assert direct.status_code == 503 and "failed to load" in direct.json()["error"]
