"""/v1/files: upload checked by purpose (each problem with its line), per tenant, roles,
content back byte for byte (encrypted at rest too), delete, and the size cap."""

from __future__ import annotations

import io
import json
import tempfile
import zipfile

import pytest

from maas.auth.principal import Role
from tests.fixtures import make_png
from tests.integration.conftest import bearer


def chat(question: str, answer: str | None = "Bluebird") -> str:
    messages = [{"role": "user", "content": question}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return json.dumps({"messages": messages})


GOOD = "\n".join(chat(f"What is the maas codename? ({n})") for n in range(3)) + "\n"


@pytest.fixture
def keys(tenant_keys):
    return tenant_keys


@pytest.fixture
def spool(tmp_path, monkeypatch):
    """The folder the server copies uploads into before checking them (the system's
    temporary folder, this test's own here)."""
    folder = tmp_path / "spool"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def upload(client, headers, content: bytes | str, filename="train.jsonl", purpose="fine-tune"):
    data = content.encode() if isinstance(content, str) else content
    return client.post(
        "/v1/files",
        headers=headers,
        files={"file": (filename, data, "application/octet-stream")},
        data={"purpose": purpose},
    )


def test_a_fine_tuning_file_is_kept_and_read_back_within_its_tenant(app_client, keys):
    made = upload(app_client, keys["acme"], GOOD)
    assert made.status_code == 200, made.text
    body = made.json()
    assert body["object"] == "file" and body["id"].startswith("file-")
    assert body["bytes"] == len(GOOD) and body["purpose"] == "fine-tune"
    assert body["filename"] == "train.jsonl" and body["status"] == "processed"
    assert body["details"] == {
        "format": "chat-jsonl",
        "examples": 3,
        "characters": body["details"]["characters"],
    }
    file_id = body["id"]
    content = app_client.get(f"/v1/files/{file_id}/content", headers=keys["acme"])
    assert content.status_code == 200 and content.content == GOOD.encode()
    assert app_client.get(f"/v1/files/{file_id}", headers=keys["acme"]).json()["id"] == file_id
    for path in (f"/v1/files/{file_id}", f"/v1/files/{file_id}/content"):
        assert app_client.get(path, headers=keys["globex"]).status_code == 404
        assert app_client.get(path, headers=keys["admin"]).status_code == 200
    assert app_client.delete(f"/v1/files/{file_id}", headers=keys["globex"]).status_code == 404
    listed = app_client.get("/v1/files", headers=keys["acme"]).json()
    assert [f["id"] for f in listed["data"]] == [file_id] and listed["has_more"] is False
    assert app_client.get("/v1/files", headers=keys["globex"]).json()["data"] == []
    gone = app_client.delete(f"/v1/files/{file_id}", headers=keys["acme"])
    assert gone.status_code == 200 and gone.json() == {
        "id": file_id,
        "object": "file",
        "deleted": True,
    }
    assert app_client.get(f"/v1/files/{file_id}", headers=keys["acme"]).status_code == 404


def test_user_keys_may_not_use_files(app_client, keys):
    assert upload(app_client, keys["acme-user"], GOOD).status_code == 403
    assert app_client.get("/v1/files", headers=keys["acme-user"]).status_code == 403


@pytest.mark.parametrize(
    ("content", "filename", "purpose", "says"),
    [
        ("not json\n" + chat("q"), "t.jsonl", "fine-tune", ["line 1: not JSON"]),
        (
            '{"messages": [{"content": "hi"}]}\n',
            "t.jsonl",
            "fine-tune",
            ["line 1: message 1 has no valid role"],
        ),
        (
            chat("q") + "\n" + chat("q", answer=None),
            "t.jsonl",
            "fine-tune",
            ["line 2: no assistant message"],
        ),
        ('{"prompt": "x"}\n', "t.jsonl", "fine-tune", ["line 1: no 'messages' list"]),
        (
            '{"messages": [{"role": "user", "content": "q", "weight": 1}, '
            '{"role": "assistant", "content": "a", "weight": 0.5}]}\n'
            '{"messages": [{"role": "user", "content": "q"}, '
            '{"role": "assistant", "content": "a", "weight": 0}]}\n',
            "t.jsonl",
            "fine-tune",
            ["line 1: message 1: 'weight' is 0 or 1", "line 2: no assistant message"],
        ),
        ("[1, 2]\n", "t.jsonl", "fine-tune", ["line 1: not a JSON object"]),
        (
            chat("x" * 70_000),
            "t.jsonl",
            "fine-tune",
            ["line 1: the chat has 70008 characters; at most 65536"],
        ),
        (GOOD, "t.jsonl", "weights", ["purpose must be one of"]),
        (GOOD, "t.txt", "fine-tune", ["a fine-tune file is JSON Lines"]),
        (GOOD, "../t.jsonl", "fine-tune", ["must be a plain name"]),
        (GOOD, "a/b.jsonl", "fine-tune", ["must be a plain name"]),
        ("", "t.jsonl", "fine-tune", ["file: no examples"]),
        ("a,b\n1\n", "d.csv", "dataset", ["line 2: 1 columns; the header has 2"]),
        # read in bounded memory: an overlong line, a huge CSV field, bytes that are not text
        (
            "x" * 400_000 + "\n" + chat("q"),
            "t.jsonl",
            "fine-tune",
            ["line 1: longer than 327680 bytes"],
        ),
        ("a,b\n" + "x" * 200_000 + ",1\n", "d.csv", "dataset", ["field larger than field limit"]),
        (b"\xff\xfe,a\n1,2\n", "d.csv", "dataset", ["not UTF-8"]),
        (b"\xff\n", "d.jsonl", "dataset", ["line 1: not UTF-8 text"]),
        (
            '{"custom_id": "1", "method": "GET", "url": "/v1/x", "body": {}}\n',
            "b.jsonl",
            "batch",
            ["'method' must be POST", "'url' must be"],
        ),
    ],
)
def test_bad_uploads_are_refused_with_each_problem_where_it_is(
    app_client, keys, spool, content, filename, purpose, says
):
    answer = upload(app_client, keys["acme"], content, filename, purpose)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error"
    for text in says:
        assert text in error["message"]
    assert app_client.get("/v1/files", headers=keys["acme"]).json()["data"] == []
    assert list(spool.iterdir()) == []  # the refused copy is not left in the temporary folder


def test_many_problems_are_counted_and_the_first_ones_listed(app_client, keys):
    content = "\n".join(["nope"] * 25)
    error = upload(app_client, keys["acme"], content).json()["error"]["message"]
    assert error.startswith("the fine-tuning file has 25 problems: line 1: not JSON")
    assert "line 10:" in error and "line 11:" not in error and "(and 15 more)" in error


def image_zip(classes: dict[str, int]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, count in classes.items():
            for index in range(count):
                archive.writestr(f"digits/{name}/{index}.png", make_png())
    return buffer.getvalue()


def test_datasets_csv_jsonl_and_image_folders(app_client, keys, spool):
    csv_file = upload(app_client, keys["acme"], "text,label\nhello,a\nbye,b\n", "d.csv", "dataset")
    assert csv_file.json()["details"] == {"format": "csv", "columns": ["text", "label"], "rows": 2}
    jsonl = upload(app_client, keys["acme"], '{"x": 1}\n{"x": 2}\n', "d.jsonl", "dataset")
    assert jsonl.json()["details"] == {"format": "jsonl", "rows": 2}
    images = upload(app_client, keys["acme"], image_zip({"0": 2, "1": 3}), "digits.zip", "dataset")
    assert images.status_code == 200, images.text
    assert images.json()["details"] == {
        "format": "image-folders",
        "classes": ["0", "1"],
        "images": {"0": 2, "1": 3},
    }
    one_class = upload(app_client, keys["acme"], image_zip({"0": 2}), "one.zip", "dataset")
    assert one_class.status_code == 400 and "at least 2" in one_class.json()["error"]["message"]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("../escape/x.png", make_png())
    escaping = upload(app_client, keys["acme"], buffer.getvalue(), "bad.zip", "dataset")
    assert escaping.status_code == 400
    assert list(spool.iterdir()) == []  # kept or refused, no upload stays there


def test_an_oversize_upload_is_413_and_keeps_nothing(settings, app_client, keys):
    limit = app_client.app.state.settings.max_file_bytes
    small = app_client.app.state.settings.model_copy(update={"max_file_bytes": 1000})
    from fastapi.testclient import TestClient

    from maas.api.app import build_app

    with TestClient(build_app(small)) as client:
        answer = upload(client, keys["acme"], GOOD * 100)
        assert answer.status_code == 413
        assert client.get("/v1/files", headers=keys["acme"]).json()["data"] == []
    assert limit > 1000


def test_files_are_encrypted_at_rest_with_a_master_key(tmp_path, settings, make_key):
    from fastapi.testclient import TestClient

    from maas.api.app import build_app
    from maas.artifacts.keyring import MasterKeyring

    key_file = tmp_path / "master.keys"
    MasterKeyring.create(key_file)
    sealed = settings.model_copy(update={"encryption_key_file": key_file})
    with TestClient(build_app(sealed)) as client:
        headers = bearer(key_maker_for(client)(Role.admin))
        body = upload(client, headers, GOOD).json()
        stored = sealed.artifacts / ".files" / body["id"]
        assert b"Bluebird" not in stored.read_bytes()
        content = f"/v1/files/{body['id']}/content"
        assert client.get(content, headers=headers).content == GOOD.encode()
        # a rotated master key re-wraps the file's data key too, and retires the old one
        assert client.app.state.registry.rotate_master_key() == 1
        assert MasterKeyring.load(key_file).active_version == 2
        assert len(MasterKeyring.load(key_file).versions) == 1
        assert client.get(content, headers=headers).content == GOOD.encode()


def key_maker_for(client):
    from tests.integration.conftest import key_maker

    return key_maker(client)
