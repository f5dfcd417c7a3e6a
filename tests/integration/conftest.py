from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from maas.api.app import build_app


@pytest.fixture
def client(settings):
    with TestClient(build_app(settings)) as client:
        yield client


@pytest.fixture
def app_registry(client):
    """The registry the running app uses, to set up state without going through HTTP."""
    return client.app.state.registry
