"""MAAS_PIN_MODELS: loaded at start, ready at once, never unloaded to make room."""

from __future__ import annotations

import time

from fastapi.testclient import TestClient

from maas.api.app import build_app
from maas.auth.bootstrap import ensure_admin_key
from maas.registry import open_registry
from tests.integration.conftest import bearer


def test_pinned_models_are_loaded_at_start(settings, model_sources):
    registry = open_registry(settings)
    registry.import_model(model_sources / "linear.onnx", "linear")
    registry.close()
    pinned = settings.model_copy(update={"pin_models": ["linear"]})
    with TestClient(build_app(pinned)) as client:
        key = ensure_admin_key(pinned, client.app.state.keys)
        # pinned models load in the background; the server is ready once they are up
        deadline = time.monotonic() + 30
        while client.get("/v2/health/ready").status_code != 200:
            assert time.monotonic() < deadline, client.get("/v2/health/ready").text
            time.sleep(0.05)
        assert client.get("/v2/models/linear/ready", headers=bearer(key)).status_code == 200
        [deployment] = client.get("/api/v1/deployments", headers=bearer(key)).json()["data"]
        assert deployment["model"] == "linear" and deployment["pinned"] is True


def test_a_typo_in_pinned_models_stops_the_cli_with_one_line(settings, capsys, monkeypatch):
    import sys

    from maas.cli import main

    monkeypatch.setenv("MAAS_HOME", str(settings.home))
    monkeypatch.setenv("MAAS_PIN_MODELS", "no-such-model")
    monkeypatch.setattr(sys, "argv", ["maas", "serve"])
    try:
        main()
    except SystemExit as done:
        assert done.code == 1
    assert "model 'no-such-model' not found" in capsys.readouterr().err
