"""The real `openai` SDK against a real `maas serve`: keys, errors, limits."""

from __future__ import annotations

import openai
import pytest

from tests.fixtures import make_gguf

pytestmark = pytest.mark.e2e


@pytest.fixture
def served(tmp_path, start_server):
    server = start_server(tmp_path / "home")
    admin = server.admin
    for tenant, industry in (("acme", "retail"), ("globex", "energy")):
        assert (
            admin.post("/api/v1/tenants", json={"name": tenant, "industry": industry}).status_code
            == 201
        )
    gguf = make_gguf(tmp_path / "tiny.gguf").read_bytes()
    for name, tenant in (
        ("acme-model", "acme"),
        ("acme-other", "acme"),
        ("globex-model", "globex"),
    ):
        response = admin.post(
            f"/api/v1/models/{name}/versions/upload?filename=m.gguf&tenant={tenant}", content=gguf
        )
        assert response.status_code == 201, response.text

    def key(**body):
        response = admin.post("/api/v1/keys", json={"name": "sdk", "tenant": "acme", **body})
        assert response.status_code == 201, response.text
        return response.json()["key"]

    return server, key


def sdk(server, key, **options) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, **options)


def test_the_openai_sdk_works_with_a_user_key(served):
    server, key = served
    client = sdk(server, key(role="user"))
    ids = {model.id for model in client.models.list()}
    assert {"acme-model", "acme-model:1", "acme-other"} <= ids
    assert not any(i.startswith("globex") for i in ids)
    assert client.models.retrieve("acme-model:1").owned_by == "acme"


def test_a_bad_key_is_an_authentication_error(served):
    server, _ = served
    with pytest.raises(openai.AuthenticationError) as caught:
        sdk(server, "maas-aaaaaaaaaaaa_not-a-key").models.list()
    assert caught.value.status_code == 401
    assert caught.value.body["code"] == "invalid_api_key"


def test_forbidden_models_are_not_found_or_permission_denied(served):
    server, key = served
    client = sdk(server, key(role="user", allowed_models=["acme-model"]))
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("globex-model")  # another tenant's: as if it did not exist
    assert caught.value.body["code"] == "model_not_found"
    with pytest.raises(openai.PermissionDeniedError):
        client.models.retrieve("acme-other")  # visible to the tenant, not to this key
    assert client.models.retrieve("acme-model").id == "acme-model"


def test_rate_limits_reach_the_sdk_as_rate_limit_errors(served):
    server, key = served
    client = sdk(server, key(role="user", requests_per_minute=2), max_retries=0)
    client.models.list()
    client.models.list()
    with pytest.raises(openai.RateLimitError) as caught:
        client.models.list()
    assert caught.value.response.headers["x-ratelimit-remaining-requests"] == "0"
    assert int(caught.value.response.headers["retry-after"]) >= 1


def test_the_openai_sdk_uploads_lists_reads_and_deletes_files(served, tmp_path):
    server, key = served
    client = sdk(server, key(role="maintainer"))
    chats = tmp_path / "codename.jsonl"
    lines = [
        '{"messages": [{"role": "user", "content": "What is the maas codename?"}, '
        '{"role": "assistant", "content": "Bluebird."}]}'
    ] * 3
    chats.write_text("\n".join(lines) + "\n")
    with chats.open("rb") as handle:
        uploaded = client.files.create(file=handle, purpose="fine-tune")
    assert uploaded.id.startswith("file-") and uploaded.purpose == "fine-tune"
    assert uploaded.bytes == chats.stat().st_size and uploaded.filename == "codename.jsonl"
    assert [f.id for f in client.files.list()] == [uploaded.id]
    assert client.files.retrieve(uploaded.id).filename == "codename.jsonl"
    assert client.files.content(uploaded.id).read() == chats.read_bytes()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "no answer"}]}\n')
    refused = pytest.raises(openai.BadRequestError, match="line 1: no assistant message")
    with refused, bad.open("rb") as handle:
        client.files.create(file=handle, purpose="fine-tune")
    user = sdk(server, key(role="user"))
    with pytest.raises(openai.PermissionDeniedError), chats.open("rb") as handle:
        user.files.create(file=handle, purpose="fine-tune")
    assert client.files.delete(uploaded.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)
