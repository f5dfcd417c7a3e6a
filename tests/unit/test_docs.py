"""The documentation stays true to the code it describes."""

import re
from pathlib import Path

from maas.config import Settings, settings_table

ROOT = Path(__file__).parents[2]
DOCS = ROOT / "docs"
CODE_PATH = re.compile(r"`(maas/[^`\s]*)`")
"""A path of the code, as docs/architecture.md names it: `maas/engine/process.py`, `maas/db/`."""


def test_configuration_page_lists_every_setting_as_the_code_documents_it():
    page = (DOCS / "configuration.md").read_text()
    assert settings_table() in page
    for name, field in Settings.model_fields.items():
        assert field.description, f"setting {name} has no docstring"


def test_architecture_page_names_only_paths_that_exist():
    named = set(CODE_PATH.findall((DOCS / "architecture.md").read_text()))
    assert len(named) > 50, "the page names the code by path; did the pattern stop matching?"
    missing = sorted(path for path in named if not (ROOT / path).exists())
    assert not missing, f"docs/architecture.md names paths that do not exist: {missing}"


def test_architecture_page_names_every_package():
    named = CODE_PATH.findall((DOCS / "architecture.md").read_text())
    packages = [path for path in (ROOT / "maas").iterdir() if (path / "__init__.py").is_file()]
    left_out = sorted(
        package.name
        for package in packages
        if not any(path.startswith(f"maas/{package.name}/") for path in named)
    )
    assert not left_out, f"docs/architecture.md does not say where these live: {left_out}"


def test_readme_links_the_architecture_page_and_nothing_outside_the_repository():
    readme = (ROOT / "README.md").read_text()
    assert "](docs/architecture.md)" in readme
    assert "../shared" not in readme
    assert "DESIGN.md" not in readme
