"""Real clients against a real `maas serve`: tritonclient.http for tensors, openai for
embeddings."""

from __future__ import annotations

import base64

import numpy as np
import onnxruntime
import openai
import pytest
import torch
import tritonclient.http as triton
from safetensors.torch import load_file

from maas.config import Settings
from maas.registry import demo, open_registry
from maas.runtime.architectures import build
from tests.fixtures import make_cnn_folder, make_onnx

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for the module, with an ONNX model, a torch CNN and the demo embedder."""
    from tests.e2e.conftest import Server

    root = tmp_path_factory.mktemp("clients")
    home = root / "home"
    registry = open_registry(Settings(home=home))
    try:
        registry.import_model(make_onnx(root / "linear.onnx"), "linear")
        registry.import_model(make_cnn_folder(root / "cnn"), "cnn", task="tensor")
        minilm = demo.DEMO_MODELS[1]
        registry.import_model(demo.locate(minilm), minilm.name, task="embeddings")
    finally:
        registry.close()
    running = Server(home)
    running.wait_ready()
    running.sources = root
    yield running
    running.stop()


def triton_client(server):
    return triton.InferenceServerClient(url=f"127.0.0.1:{server.port}")


def auth(server):
    return {"Authorization": f"Bearer {server.admin_key}"}


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_infers_an_onnx_model(server, binary):
    client = triton_client(server)
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    request = triton.InferInput("x", list(x.shape), "FP32")
    request.set_data_from_numpy(x, binary_data=binary)
    wanted = triton.InferRequestedOutput("y", binary_data=binary)
    result = client.infer("linear", [request], outputs=[wanted], headers=auth(server))
    session = onnxruntime.InferenceSession(str(server.sources / "linear.onnx"))
    np.testing.assert_allclose(result.as_numpy("y"), session.run(["y"], {"x": x})[0], rtol=1e-6)
    assert client.is_model_ready("linear", headers=auth(server))
    metadata = client.get_model_metadata("linear", headers=auth(server))
    assert metadata["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_infers_a_torch_cnn(server, binary):
    client = triton_client(server)
    images = np.random.default_rng(1).standard_normal((2, 3, 16, 16)).astype(np.float32)
    request = triton.InferInput("input", list(images.shape), "FP32")
    request.set_data_from_numpy(images, binary_data=binary)
    outputs = None if binary else [triton.InferRequestedOutput("logits", binary_data=False)]
    result = client.infer("cnn", [request], outputs=outputs, headers=auth(server))
    arguments = {
        "num_classes": 3,
        "in_channels": 3,
        "image_size": 16,
        "channels": [4, 8],
        "hidden": 16,
    }
    module = build("small-cnn", arguments)
    module.load_state_dict(load_file(server.sources / "cnn" / "model.safetensors"))
    with torch.no_grad():
        expected = module.eval()(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=1e-5, atol=1e-6)


def test_tritonclient_gets_clear_errors(server):
    client = triton_client(server)
    request = triton.InferInput("x", [1, 3], "FP32")
    request.set_data_from_numpy(np.zeros((1, 3), np.float32))
    with pytest.raises(triton.InferenceServerException) as caught:
        client.infer("linear", [request], headers=auth(server))
    assert "shape" in str(caught.value)
    with pytest.raises(triton.InferenceServerException) as caught:
        client.infer("nope", [request], headers=auth(server))
    assert "not found" in str(caught.value)


def test_openai_embeddings_match_transformers(server):
    from transformers import AutoModel, AutoTokenizer

    sentences = ["The capital of France is Paris.", "A man is playing a guitar.", "Good morning!"]
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.admin_key)
    response = client.embeddings.create(model="all-minilm-l6-v2", input=sentences)
    ours = np.array([item.embedding for item in response.data])
    assert ours.shape == (3, 384)

    folder = str(demo.locate(demo.DEMO_MODELS[1]))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, use_safetensors=True).eval()
    encoded = tokenizer(
        sentences, padding=True, truncation=True, max_length=256, return_tensors="pt"
    )
    with torch.no_grad():
        hidden = model(**encoded).last_hidden_state
    mask = encoded["attention_mask"].unsqueeze(-1).float()
    expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1).numpy()
    cosine = (ours * expected).sum(axis=1) / np.linalg.norm(ours, axis=1)
    assert cosine.min() > 0.999
    assert response.usage.prompt_tokens == int(encoded["attention_mask"].sum())

    # Asked for base64 explicitly, the SDK hands the string over as it came.
    encoded = (
        client.embeddings.create(
            model="all-minilm-l6-v2", input=sentences[0], encoding_format="base64"
        )
        .data[0]
        .embedding
    )
    decoded = np.frombuffer(base64.b64decode(encoded), dtype="<f4")
    np.testing.assert_allclose(decoded, ours[0], rtol=1e-5, atol=1e-6)


def test_openai_sdk_errors_are_openai_shaped(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.admin_key, max_retries=0)
    with pytest.raises(openai.NotFoundError) as caught:
        client.embeddings.create(model="no-such-model", input="hi")
    assert caught.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model="all-minilm-l6-v2", input="hi", dimensions=64)
    assert caught.value.body["param"] == "dimensions"
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="all-minilm-l6-v2", input="")
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model="linear", input="hi")
    assert "not an embedding model" in caught.value.body["message"]


def test_cli_loads_configures_and_unloads_on_the_running_server(server):
    import subprocess
    import sys

    from tests.e2e.conftest import maas_env

    def maas(*args):
        env = {**maas_env(server.home), "MAAS_URL": server.url}
        return subprocess.run(
            [sys.executable, "-m", "maas", "models", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    assert maas("load", "cnn").returncode == 0
    listed = maas("loaded")
    assert listed.returncode == 0 and "cnn" in listed.stdout
    configured = maas("configure", "cnn", "--max-batch-size", "1")
    assert configured.returncode == 0 and "'max_batch_size': 1" in configured.stdout
    assert maas("unload", "cnn").returncode == 0
    assert "cnn" not in maas("loaded").stdout
    missing = maas("load", "nope")
    assert missing.returncode == 1 and "404" in missing.stderr and "not found" in missing.stderr
    env = {**maas_env(server.home), "MAAS_URL": "http://127.0.0.1:9"}
    unreachable = subprocess.run(
        [sys.executable, "-m", "maas", "models", "loaded"], env=env, capture_output=True, text=True
    )
    assert unreachable.returncode == 1 and "cannot reach the server" in unreachable.stderr
