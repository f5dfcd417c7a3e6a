from __future__ import annotations

from pathlib import Path

import pytest

from maas.config import Settings


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Keys, roles, tenants and limits do not depend on how the engine runs a step: the LLMs
    these tests load run the eager step, not a compiled one that takes seconds to build."""
    return Settings(home=tmp_path / "maas-home", allowed_hosts=["testserver"], llm_compile=False)
