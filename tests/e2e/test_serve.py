"""What `make serve` does, for real: prepare the demo models, start `maas serve`, list models."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from tests.e2e.conftest import maas_env

pytestmark = pytest.mark.e2e

DEMO_IDS = {"smollm2-135m-instruct", "all-minilm-l6-v2"}


def run_demo(home):
    return subprocess.run(
        [sys.executable, "-m", "maas", "demo"],
        env=maas_env(home),
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_demo_models_are_served(tmp_path, start_server):
    home = tmp_path / "home"
    demo = run_demo(home)
    assert demo.returncode == 0, demo.stderr
    assert "smollm2-135m-instruct: imported as smollm2-135m-instruct:1 (chat)" in demo.stdout
    assert "all-minilm-l6-v2: imported as all-minilm-l6-v2:1 (embeddings)" in demo.stdout

    again = run_demo(home)
    assert again.returncode == 0 and again.stdout.count("already there") == 2

    server = start_server(home)
    log = server.log.read_text()
    assert "first start: created an admin API key" in log and str(home / "admin.key") in log
    assert server.admin_key in log  # shown once, at the first start
    assert (home / "admin.key").stat().st_mode & 0o777 == 0o600
    models = server.admin.get("/v1/models").json()
    ids = {card["id"] for card in models["data"]}
    assert (
        DEMO_IDS | {f"{name}@production" for name in DEMO_IDS} | {f"{name}:1" for name in DEMO_IDS}
        == ids
    )
    tasks = {card["id"]: card["task"] for card in models["data"]}
    assert tasks["smollm2-135m-instruct"] == "chat" and tasks["all-minilm-l6-v2"] == "embeddings"

    gguf = server.admin.get("/api/v1/models/smollm2-135m-instruct/versions/1").json()
    manifest = gguf["manifest"]
    assert (manifest["format"], manifest["runtime"], manifest["architecture"]) == (
        "gguf",
        "llm",
        "llama",
    )
    assert manifest["context_length"] == 8192
    assert "<|im_start|>" in manifest["chat_template"]
    assert manifest["config"]["file_type_name"] == "MOSTLY_Q4_1"

    minilm = server.admin.get("/api/v1/models/all-minilm-l6-v2/versions/1").json()
    assert minilm["manifest"]["task_options"] == {
        "pooling": "mean",
        "normalize": True,
        "max_seq_length": 256,
    }
    assert minilm["manifest"]["architecture"] == "BertModel"

    assert server.admin.get("/v2/models/all-minilm-l6-v2").status_code == 200
    assert "maas_models 2.0" in server.admin.get("/metrics").text


def test_server_refuses_bad_requests_with_protocol_errors(tmp_path, start_server):
    server = start_server(tmp_path / "home")
    response = server.admin.get("/v1/models/nope")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"
    response = server.admin.get("/v2/models/nope")
    assert response.status_code == 404 and "error" in response.json()


def test_every_route_but_health_needs_a_key(tmp_path, start_server):
    server = start_server(tmp_path / "home")
    assert httpx.get(f"{server.url}/v2/health/live").status_code == 200
    for path in ("/v1/models", "/v2", "/api/v1/models", "/metrics", "/openapi.json"):
        response = httpx.get(f"{server.url}{path}")
        assert response.status_code == 401, path
        assert response.headers["www-authenticate"] == "Bearer"


def test_the_admin_key_is_shown_only_at_the_first_start(tmp_path, start_server):
    home = tmp_path / "home"
    first = start_server(home)
    first.stop()
    second = start_server(home)
    log = second.log.read_text()
    assert second.admin_key == first.admin_key
    assert second.admin_key not in log and "admin API key:" in log


def test_keys_sent_in_a_url_are_refused_and_kept_out_of_the_log(tmp_path, start_server):
    server = start_server(tmp_path / "home")
    response = httpx.get(f"{server.url}/v1/models?api_key={server.admin_key}")
    assert response.status_code == 401
    server.stop()
    access_log = server.log.read_text().split("Started server process")[1]
    assert f"GET /v1/models?api_key={server.admin_key[:18]}*** " in access_log
    assert server.admin_key[18:] not in access_log
