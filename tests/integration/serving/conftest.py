from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.fixtures import make_lstm_folder


@pytest.fixture(scope="session")
def lstm_source(tmp_path_factory):
    return make_lstm_folder(tmp_path_factory.mktemp("lstm") / "lstm")


@pytest.fixture
def served(client, model_sources, lstm_source):
    """The admin client with one model of each kind imported (shared, so any key sees them)."""
    registry = client.app.state.registry
    registry.import_model(model_sources / "linear.onnx", "linear", alias="production")
    registry.import_model(model_sources / "cnn", "cnn")
    registry.import_model(model_sources / "bert", "embedder")
    registry.import_model(lstm_source, "sentiment")
    return client


def concurrently(client, requests: list[tuple[str, str, dict]]) -> list[httpx.Response]:
    """Send (method, path, kwargs) requests all at once, from threads, through the test
    client: they all run on the app's own event loop, as they would under uvicorn."""
    barrier = threading.Barrier(len(requests))

    def send(request):
        method, path, kwargs = request
        barrier.wait(timeout=30)
        return client.request(method, path, **kwargs)

    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        return list(pool.map(send, requests))
