"""The server skeleton over HTTP: v2 metadata, /v1/models, the management API, errors, metrics."""

from __future__ import annotations

import io
import tarfile

import pytest

from tests.fixtures import make_gguf, make_hf_folder, make_onnx, tar_folder


@pytest.fixture
def models(app_registry, tmp_path):
    gguf = make_gguf(tmp_path / "tiny.gguf")
    app_registry.import_model(gguf, "tiny", alias="production")
    app_registry.import_model(gguf, "tiny", alias="staging")
    app_registry.import_model(make_onnx(tmp_path / "linear.onnx"), "linear")
    return app_registry


def openai_error(response, status, code=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if code is not None:
        assert error["code"] == code
    return error


def v2_error(response, status):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"]
    return body["error"]


def test_v2_server_endpoints(client):
    assert client.get("/v2").json() == {"name": "maas", "version": "0.1.0", "extensions": []}
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}


def test_v2_model_metadata(client, models):
    body = client.get("/v2/models/linear").json()
    assert body == {
        "name": "linear",
        "versions": ["1"],
        "platform": "onnx_onnx",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}],
    }
    assert client.get("/v2/models/tiny/versions/2").json()["versions"] == ["1", "2"]
    assert client.get("/v2/models/tiny@staging").json()["name"] == "tiny"


def test_v2_ready_is_false_until_a_runtime_loads_the_model(client, models):
    response = client.get("/v2/models/tiny/ready")
    assert response.status_code == 400
    assert response.json() == {"name": "tiny", "version": "1", "ready": False}
    assert client.get("/v2/models/tiny/versions/2/ready").json()["version"] == "2"


def test_v2_errors_have_the_v2_shape(client, models):
    assert "not found" in v2_error(client.get("/v2/models/nope"), 404)
    assert "no version 9" in v2_error(client.get("/v2/models/tiny/versions/9"), 404)
    assert "invalid" in v2_error(client.get("/v2/models/tiny/versions/x"), 400)
    assert "invalid" in v2_error(client.get("/v2/models/BAD"), 400)
    v2_error(client.get("/v2/nothing-here"), 404)


def test_the_schema_lists_each_routes_error_statuses_and_bodies(client):
    schema = client.get("/openapi.json").json()
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            route, responses = f"{method.upper()} {path}", operation["responses"]
            assert "422" not in responses, route  # validation errors are 400 here
            if not path.startswith("/v2/health"):
                assert {"401", "429", "503"} <= set(responses), route
            if operation.get("parameters") or "requestBody" in operation:
                assert "400" in responses, route
            body = "V2ErrorBody" if path.startswith("/v2") else "OpenAIErrorBody"
            for status in set(responses) - {"200", "201", "204"}:
                assert responses[status]["description"], (route, status)
                if not path.startswith("/v2/health"):
                    assert body in str(responses[status]["content"]), (route, status)


def test_generation_routes_document_504_and_bodies_413(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert "504" in paths["/v1/chat/completions"]["post"]["responses"]
    assert "504" not in paths["/v1/embeddings"]["post"]["responses"]
    assert "413" in paths["/api/v1/models/{name}/versions/upload"]["post"]["responses"]
    assert "413" not in paths["/api/v1/models/{name}"]["get"]["responses"]


def test_openai_models_list(client, models):
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    ids = [card["id"] for card in body["data"]]
    assert ids == [
        "linear",
        "linear:1",
        "tiny",
        "tiny@production",
        "tiny@staging",
        "tiny:1",
        "tiny:2",
    ]
    cards = {card["id"]: card for card in body["data"]}
    assert cards["tiny"]["root"] == "tiny:1"  # production wins over latest
    assert cards["tiny@staging"]["root"] == "tiny:2"
    assert cards["linear"]["root"] == "linear:1"
    for card in body["data"]:
        assert card["object"] == "model" and card["owned_by"] == "maas"
        assert isinstance(card["created"], int)


def test_openai_models_retrieve_and_errors(client, models):
    assert client.get("/v1/models/tiny:2").json()["root"] == "tiny:2"
    assert client.get("/v1/models/tiny").json()["parent"] is None
    openai_error(client.get("/v1/models/nope"), 404, "model_not_found")
    openai_error(client.get("/v1/models/tiny@canary"), 404, "model_not_found")
    error = openai_error(client.get("/v1/models/Tiny"), 400, "invalid_model_reference")
    assert error["param"] == "model"


def test_openai_models_works_with_the_openai_sdk_shape(client, models):
    """The openai SDK's Model type needs id, object, created, owned_by."""
    for card in client.get("/v1/models").json()["data"]:
        assert {"id", "object", "created", "owned_by"} <= set(card)


def test_management_import_by_path_and_show(client, tmp_path):
    source = make_hf_folder(tmp_path / "hf")
    response = client.post(
        "/api/v1/models", json={"name": "hf", "path": str(source), "alias": "production"}
    )
    assert response.status_code == 201, response.text
    version = response.json()
    assert (version["name"], version["version"], version["task"]) == ("hf", 1, "chat")
    assert version["aliases"] == ["production"]
    assert "path" not in version and "manifest_sha256" not in version

    model = client.get("/api/v1/models/hf").json()
    assert model["latest_version"] == 1 and model["aliases"] == {"production": 1}
    listing = client.get("/api/v1/models").json()
    assert listing["count"] == 1 and listing["data"][0]["name"] == "hf"
    detail = client.get("/api/v1/models/hf/versions/1").json()
    assert detail["manifest"]["architecture"] == "LlamaForCausalLM"
    assert "source" not in detail["manifest"]
    assert client.get("/api/v1/models/hf/versions").json()["count"] == 1


def test_management_aliases_and_deletes(client, models):
    response = client.put("/api/v1/models/tiny/aliases/production", json={"version": 2})
    assert response.status_code == 200 and response.json()["aliases"] == ["production", "staging"]
    assert client.get("/v1/models/tiny").json()["root"] == "tiny:2"
    openai_error(client.put("/api/v1/models/tiny/aliases/production", json={"version": 7}), 404)
    openai_error(client.put("/api/v1/models/tiny/aliases/latest", json={"version": 1}), 400)
    openai_error(client.put("/api/v1/models/tiny/aliases/prod", json={"version": 0}), 400)
    openai_error(client.put("/api/v1/models/tiny/aliases/prod", json={}), 400)

    assert client.delete("/api/v1/models/tiny/aliases/staging").status_code == 204
    openai_error(client.delete("/api/v1/models/tiny/aliases/staging"), 404)
    error = openai_error(client.delete("/api/v1/models/tiny/versions/2"), 409, "conflict")
    assert "production" in error["message"]
    assert client.delete("/api/v1/models/tiny/versions/1").status_code == 204
    assert client.delete("/api/v1/models/tiny/versions/2?force=true").status_code == 204
    assert client.delete("/api/v1/models/tiny").status_code == 204
    openai_error(client.get("/api/v1/models/tiny"), 404, "model_not_found")


def test_management_import_errors(client, tmp_path):
    openai_error(client.post("/api/v1/models", json={"name": "x"}), 400)
    openai_error(client.post("/api/v1/models", json={"name": "x", "path": "/nope"}), 400)
    openai_error(
        client.post("/api/v1/models", json={"name": "Bad", "path": "/nope"}), 400, "invalid_name"
    )
    openai_error(
        client.post("/api/v1/models", json={"name": "x", "path": "/", "task": "dance"}), 400
    )
    pickle = tmp_path / "model.pt"
    pickle.write_bytes(b"\x80\x04K\x01.")
    error = openai_error(
        client.post("/api/v1/models", json={"name": "x", "path": str(pickle)}),
        400,
        "refused_artifact",
    )
    assert "safetensors" in error["message"]
    openai_error(
        client.post(
            "/api/v1/models", content=b"{not json", headers={"content-type": "application/json"}
        ),
        400,
    )


def test_upload_a_gguf_and_an_archive(client, tmp_path):
    gguf = make_gguf(tmp_path / "tiny.gguf").read_bytes()
    response = client.post(
        "/api/v1/models/tiny/versions/upload?filename=tiny.gguf&alias=production", content=gguf
    )
    assert response.status_code == 201, response.text
    assert response.json()["format"] == "gguf"
    archive = tar_folder(tmp_path / "hf.tar.gz", make_hf_folder(tmp_path / "hf"), "hf")
    response = client.post(
        "/api/v1/models/hf/versions/upload?filename=hf.tar.gz&description=tiny",
        content=archive.read_bytes(),
    )
    assert response.status_code == 201, response.text
    assert response.json()["format"] == "huggingface"
    staging = client.app.state.registry.store.staging_root
    assert list(staging.iterdir()) == []


def test_upload_errors(client, tmp_path):
    url = "/api/v1/models/m/versions/upload"
    openai_error(
        client.post(f"{url}?filename=model.pt", content=b"\x80\x04K\x01."), 400, "refused_artifact"
    )
    openai_error(client.post(f"{url}?filename=../x.gguf", content=b"x"), 400)
    # names the file system would choke on are refused at the edge, not with a 500
    for odd in ("m%00.gguf", "x" * 251 + ".gguf", "m%0A.gguf"):
        body = client.post(f"{url}?filename={odd}", content=b"GGUF").json()["error"]
        assert body["code"] == "refused_artifact" and body["param"] == "filename", body
    openai_error(client.post(f"{url}?filename=model.txt", content=b"x"), 400, "unsupported_format")
    openai_error(client.post(f"{url}?filename=model.gguf", content=b""), 400)
    openai_error(
        client.post(f"{url}?filename=model.gguf", content=b"garbage"), 400, "unsupported_format"
    )
    openai_error(
        client.post("/api/v1/models/BAD/versions/upload?filename=m.gguf", content=b"x"), 400
    )
    evil = io.BytesIO()
    with tarfile.open(fileobj=evil, mode="w:gz") as tar:
        info = tarfile.TarInfo("../../evil.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    openai_error(
        client.post(f"{url}?filename=evil.tar.gz", content=evil.getvalue()), 400, "unsafe_archive"
    )
    assert client.get("/api/v1/models").json()["count"] == 0


def test_upload_of_onnx_with_a_nul_in_its_external_data_location_is_400(client, tmp_path):
    model = make_onnx(tmp_path / "m.onnx", external_location="weights\x00.data")
    response = client.post(
        "/api/v1/models/m/versions/upload?filename=m.onnx", content=model.read_bytes()
    )
    assert "NUL" in openai_error(response, 400, "refused_artifact")["message"]
    assert client.get("/api/v1/models").json()["count"] == 0


def test_upload_over_the_limit_is_413(tmp_path, settings):
    from fastapi.testclient import TestClient

    from maas.api.app import build_app
    from maas.auth.bootstrap import ensure_admin_key

    settings = settings.model_copy(update={"max_upload_bytes": 1000})
    with TestClient(build_app(settings)) as client:
        client.headers["Authorization"] = (
            f"Bearer {ensure_admin_key(settings, client.app.state.keys)}"
        )
        gguf = make_gguf(tmp_path / "tiny.gguf").read_bytes() + b"\0" * 1000
        response = client.post("/api/v1/models/m/versions/upload?filename=m.gguf", content=gguf)
        openai_error(response, 413, "payload_too_large")

        def chunks():  # no Content-Length: the limit is enforced while streaming
            yield gguf[:600]
            yield gguf[600:]

        response = client.post("/api/v1/models/m/versions/upload?filename=m.gguf", content=chunks())
        openai_error(response, 413, "payload_too_large")
        assert list(client.app.state.registry.store.staging_root.iterdir()) == []


def test_unknown_routes_and_methods_are_protocol_errors(client):
    openai_error(client.get("/v1/nothing"), 404)
    openai_error(client.patch("/v1/models"), 405)
    openai_error(client.get("/api/v1/nothing"), 404)


def test_unexpected_errors_are_500_without_details(settings, monkeypatch):
    from fastapi.testclient import TestClient

    from maas.api.app import build_app

    def explode():
        raise RuntimeError("secret /etc/path detail")

    from maas.auth.bootstrap import ensure_admin_key

    with TestClient(build_app(settings), raise_server_exceptions=False) as client:
        client.headers["Authorization"] = (
            f"Bearer {ensure_admin_key(settings, client.app.state.keys)}"
        )
        monkeypatch.setattr(client.app.state.registry, "list_models", explode)
        response = client.get("/v1/models")
    error = openai_error(response, 500)
    assert "secret" not in response.text and "/etc" not in response.text
    assert error["type"] == "server_error"


def test_metrics(client, models):
    client.get("/v1/models")
    client.get("/v2/models/nope")
    text = client.get("/metrics").text
    assert 'maas_http_requests_total{method="GET",route="/v1/models",status="200"} 1.0' in text
    assert (
        'maas_http_requests_total{method="GET",route="/v2/models/{model}",status="404"} 1.0' in text
    )
    assert "maas_http_request_duration_seconds_bucket" in text
    assert "maas_models 2.0" in text and "maas_model_versions 3.0" in text
