from __future__ import annotations

from pathlib import Path

import pytest

from maas.config import Settings
from maas.registry import Registry, open_registry


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test reads the developer's MAAS_* settings or writes into the current folder."""
    import os

    for key in list(os.environ):
        if key.startswith("MAAS_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("MAAS_HOME", str(tmp_path / "maas-home"))


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    # Starlette's TestClient sends "Host: testserver".
    return Settings(home=tmp_path / "maas-home", allowed_hosts=["testserver"])


@pytest.fixture
def registry(settings: Settings) -> Registry:
    registry = open_registry(settings)
    yield registry
    registry.close()
