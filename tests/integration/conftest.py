from __future__ import annotations

from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

from maas.api.app import build_app
from maas.auth.principal import Limits, Role
from maas.auth.store import KeySpec

MakeKey = Callable[..., str]


@pytest.fixture
def app_client(settings):
    """A client with no key: tests add the Authorization header they need."""
    with TestClient(build_app(settings)) as client:
        yield client


@pytest.fixture
def make_key(app_client) -> MakeKey:
    """Create a key directly in the store: make_key(role, tenant=..., limits=..., ...)."""

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
    def make(name: str, industry: str = "finance") -> str:
        app_client.app.state.tenants.create(name, industry)
        return name

    return make


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
