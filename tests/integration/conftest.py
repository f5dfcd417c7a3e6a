from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from maas.api.app import build_app
from maas.auth.principal import Limits, Role
from maas.auth.store import KeySpec
from maas.training.demo_data import write_digits_archive
from tests.fixtures import (
    make_bert_embedder,
    make_cnn_folder,
    make_gguf,
    make_onnx,
    make_tiny_llama,
)

MakeKey = Callable[..., str]


@pytest.fixture
def app_client(settings):
    """A client with no key: tests add the Authorization header they need."""
    with TestClient(build_app(settings)) as client:
        yield client


@pytest.fixture
def make_key(app_client) -> MakeKey:
    """Create a key directly in the store: make_key(role, tenant=..., limits=..., ...)."""
    return key_maker(app_client)


def key_maker(app_client) -> MakeKey:
    def make(
        role: Role | str = Role.user,
        *,
        tenant: str | None = None,
        allowed_models: list[str] | None = None,
        limits: Limits | None = None,
        expires_at=None,
    ) -> str:
        spec = KeySpec(
            name=f"test {role}",
            role=Role(role),
            tenant=tenant,
            allowed_models=allowed_models,
            expires_at=expires_at,
            limits=limits or Limits(),
        )
        _, plaintext = app_client.app.state.keys.create(spec, None)
        return plaintext

    return make


@pytest.fixture
def make_tenant(app_client):
    return tenant_maker(app_client)


def tenant_maker(app_client):
    def make(name: str, industry: str = "finance") -> str:
        app_client.app.state.tenants.create(name, industry)
        return name

    return make


@pytest.fixture
def tenant_keys(app_client, make_key, make_tenant) -> dict[str, dict[str, str]]:
    """Tenants acme and globex, and headers of keys: acme's maintainer and user, globex's
    maintainer, and the platform admin."""
    make_tenant("acme")
    make_tenant("globex")
    return {
        "admin": bearer(make_key(Role.admin)),
        "acme": bearer(make_key(Role.maintainer, tenant="acme")),
        "acme-user": bearer(make_key(Role.user, tenant="acme")),
        "globex": bearer(make_key(Role.maintainer, tenant="globex")),
    }


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def client(app_client, make_key):
    """A client that sends an admin key with every request."""
    app_client.headers.update(bearer(make_key(Role.admin)))
    return app_client


@pytest.fixture
def app_registry(client):
    """The registry the running app uses, to set up state without going through HTTP."""
    return client.app.state.registry


class World:
    """Two tenants with keys of every role and models of each kind of ownership.

    acme:     user, maintainer keys; model acme-model (versions 1, 2; staging -> 1); a job, a
              fine-tuning job, a file
    globex:   maintainer key; model globex-model
    platform: admin key; model shared-model (no tenant: everyone sees it)
    """

    def __init__(self, client, make_key, make_tenant, sources):
        make_tenant("acme", "retail")
        make_tenant("globex", "energy")
        state = client.app.state
        tenants = {t.name: state.tenants.get_id(t.name) for t in state.tenants.list(None)}
        gguf = sources / "tiny.gguf"
        registry = state.registry
        registry.import_model(gguf, "shared-model")
        registry.import_model(gguf, "acme-model", alias="staging", owner=tenants["acme"])
        registry.import_model(gguf, "acme-model", owner=tenants["acme"])
        registry.import_model(gguf, "globex-model", owner=tenants["globex"])
        registry.import_model(sources / "linear.onnx", "acme-linear", owner=tenants["acme"])
        registry.import_model(sources / "cnn", "acme-cnn", owner=tenants["acme"])
        registry.import_model(sources / "bert", "acme-embedder", owner=tenants["acme"])
        registry.import_model(sources / "llama", "acme-chat", owner=tenants["acme"])
        self.gguf = gguf
        self.keys = {
            "user": make_key(Role.user, tenant="acme"),
            "maintainer": make_key(Role.maintainer, tenant="acme"),
            "admin": make_key(Role.admin),
            "globex": make_key(Role.maintainer, tenant="globex"),
        }
        self.key_ids = {role: key[5:17] for role, key in self.keys.items()}
        self.job_id = state.jobs.create(
            "train", tenants["acme"], {}, created_by=None, max_attempts=1
        )[0].id
        turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
        self.chats = (json.dumps({"messages": turns}) + "\n").encode()
        upload = sources / f"chats-{id(self)}.jsonl"
        upload.write_bytes(self.chats)
        self.file_id = state.files.create(
            tenants["acme"], "fine-tune", "chats.jsonl", upload, created_by=None
        ).id
        self.fine_tuning_job_id = state.jobs.create(
            "fine-tune",
            tenants["acme"],
            {"model": "acme-chat:1", "training_file": self.file_id, "seed": 0},
            created_by=None,
            max_attempts=1,
        )[0].id
        self.client = client

    def as_(self, role: str) -> dict[str, str]:
        if role == "none":
            return {}
        if role == "bad":
            return bearer("maas-aaaaaaaaaaaa_not-a-real-secret-at-all-000000000000000")
        return bearer(self.keys[role])


@pytest.fixture(scope="session")
def model_sources(tmp_path_factory):
    """Tiny model files of each kind, made once per test run (imports copy them)."""
    folder = tmp_path_factory.mktemp("model-sources")
    make_gguf(folder / "tiny.gguf")
    make_onnx(folder / "linear.onnx")
    make_cnn_folder(folder / "cnn")
    make_bert_embedder(folder / "bert")
    make_tiny_llama(folder / "llama")
    return folder


@pytest.fixture
def world(app_client, make_key, make_tenant, model_sources) -> World:
    return World(app_client, make_key, make_tenant, model_sources)


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("digits") / "digits.zip"
    write_digits_archive(path)
    return path


@pytest.fixture(scope="session")
def few_digits(digits, tmp_path_factory) -> Path:
    """Three digits, 40 images each: enough to train a few epochs in a second."""
    path = tmp_path_factory.mktemp("few") / "few.zip"
    with zipfile.ZipFile(digits) as source, zipfile.ZipFile(path, "w") as target:
        for digit in "012":
            names = sorted(n for n in source.namelist() if n.startswith(f"digits/{digit}/"))
            for name in names[:40]:
                target.writestr(name, source.read(name))
    return path
