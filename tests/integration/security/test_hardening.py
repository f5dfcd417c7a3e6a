"""Body limits, the Host check, CORS, error bodies and file permissions."""

from __future__ import annotations

import os
import stat

import pytest
from fastapi.testclient import TestClient

from maas.api.app import build_app
from maas.auth.bootstrap import ensure_admin_key
from tests.fixtures import make_gguf, make_hf_folder
from tests.integration.conftest import bearer


def client_for(settings, **changes):
    return TestClient(build_app(settings.model_copy(update=changes)))


def test_oversize_bodies_get_413_before_they_are_read(settings):
    with client_for(settings, max_request_bytes=1000) as client:
        headers = bearer(ensure_admin_key(client.app.state.settings, client.app.state.keys))
        big = {"name": "x", "path": "p" * 2000}
        response = client.post("/api/v1/models", json=big, headers=headers)
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "payload_too_large"

        def streamed():  # no Content-Length: counted as it arrives
            for _ in range(10):
                yield b"x" * 200

        response = client.post(
            "/api/v1/models",
            content=streamed(),
            headers={**headers, "content-type": "application/json"},
        )
        assert response.status_code == 413
        response = client.post("/v2/models/m/infer", content=b"x" * 2000, headers=headers)
        assert response.status_code == 413 and set(response.json()) == {"error"}  # v2 shape
        # uploads have their own, larger limit
        gguf = make_gguf(settings.home.parent / "t.gguf").read_bytes()
        assert len(gguf) > 0
        upload = client.post(
            "/api/v1/models/t/versions/upload?filename=t.gguf",
            content=gguf + b"\0" * 1000,
            headers=headers,
        )
        assert upload.status_code == 201, upload.text


@pytest.mark.parametrize(
    ("host", "status"),
    [
        ("localhost", 200),
        ("localhost:8000", 200),
        ("127.0.0.1:8000", 200),
        ("[::1]:8000", 200),
        ("evil.example", 400),
        ("evil.example:8000", 400),
        ("localhost.evil.example", 400),
        ("", 400),
    ],
)
def test_host_header_is_checked_on_loopback(settings, host, status):
    with client_for(settings, allowed_hosts=[]) as client:
        response = client.get("/v2/health/live", headers={"host": host})
        assert response.status_code == status
        if status == 400:
            assert response.json()["error"]  # v2 shape on /v2
            assert "MAAS_ALLOWED_HOSTS" in response.json()["error"]


def test_extra_hosts_and_wildcard(settings):
    with client_for(settings, allowed_hosts=["maas.internal"]) as client:
        assert (
            client.get("/v2/health/live", headers={"host": "maas.internal:443"}).status_code == 200
        )
        assert client.get("/v2/health/live", headers={"host": "other"}).status_code == 400
    with client_for(settings, allowed_hosts=["*"]) as client:
        assert client.get("/v2/health/live", headers={"host": "anything"}).status_code == 200
    with client_for(settings, host="0.0.0.0", allowed_hosts=[]) as client:  # behind a proxy
        assert client.get("/v2/health/live", headers={"host": "anything"}).status_code == 200


def test_no_cors_by_default_and_never_with_credentials(settings):
    preflight = {
        "origin": "https://app.example",
        "access-control-request-method": "POST",
        "access-control-request-headers": "authorization",
    }
    with client_for(settings) as client:
        response = client.get("/v2/health/live", headers={"origin": "https://app.example"})
        assert "access-control-allow-origin" not in response.headers
    with client_for(settings, cors_origins=["*"]) as client:
        response = client.options("/v1/models", headers=preflight)
        assert response.headers["access-control-allow-origin"] == "*"
        assert response.headers.get("access-control-allow-credentials") != "true"
    with client_for(settings, cors_origins=["https://app.example"]) as client:
        response = client.options("/v1/models", headers=preflight)
        assert response.headers["access-control-allow-origin"] == "https://app.example"
        assert response.headers.get("access-control-allow-credentials") != "true"
        other = client.options(
            "/v1/models", headers={**preflight, "origin": "https://evil.example"}
        )
        assert "access-control-allow-origin" not in other.headers


def test_error_bodies_hold_no_paths_or_traces(client, tmp_path):
    registry = client.app.state.registry
    record = registry.import_model(make_hf_folder(tmp_path / "hf"), "hf")
    (registry.folder(record) / "manifest.json").chmod(0o600)
    (registry.folder(record) / "manifest.json").write_text("{}")
    response = client.get("/v2/models/hf")
    assert response.status_code == 500
    text = response.text
    assert str(registry.store.root) not in text and "Traceback" not in text
    assert str(tmp_path) not in text


def test_everything_under_maas_home_is_private(client, tmp_path):
    client.post("/api/v1/models", json={"name": "hf", "path": str(make_hf_folder(tmp_path / "hf"))})
    client.post("/api/v1/tenants", json={"name": "acme", "industry": "retail"})
    client.post("/api/v1/keys", json={"name": "k"})
    client.get("/v1/models")
    client.app.state.recorder.flush()
    home = client.app.state.settings.home
    checked = 0
    for path in [home, *home.rglob("*")]:
        mode = stat.S_IMODE(os.lstat(path).st_mode)
        assert mode & 0o077 == 0, f"{path} is {oct(mode)}"
        checked += 1
    assert checked > 10
