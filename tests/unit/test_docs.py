"""The documentation stays true to the code it describes."""

from pathlib import Path

from maas.config import Settings, settings_table

DOCS = Path(__file__).parents[2] / "docs"


def test_configuration_page_lists_every_setting_as_the_code_documents_it():
    page = (DOCS / "configuration.md").read_text()
    assert settings_table() in page
    for name, field in Settings.model_fields.items():
        assert field.description, f"setting {name} has no docstring"
