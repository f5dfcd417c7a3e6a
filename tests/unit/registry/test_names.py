import pytest

from maas.errors import InvalidName, InvalidReference
from maas.registry.names import (
    Reference,
    fine_tuned_name,
    parse_reference,
    validate_alias_name,
    validate_model_name,
)


@pytest.mark.parametrize(
    "name", ["a", "llama-3.1-8b", "all-minilm-l6-v2", "m_1", "0day", "x" * 128]
)
def test_valid_model_names(name):
    assert validate_model_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "Llama",
        "a/b",
        "../x",
        "..",
        ".",
        ".hidden",
        "-x",
        "_x",
        "a b",
        "a:1",
        "a@b",
        "a\\b",
        "x" * 129,
        "é",
        "a\n",
        "/abs",
    ],
)
def test_invalid_model_names(name):
    with pytest.raises(InvalidName, match="invalid model name"):
        validate_model_name(name)


@pytest.mark.parametrize("alias", ["production", "staging", "canary-2", "v1.2", "a_b"])
def test_valid_alias_names(alias):
    assert validate_alias_name(alias) == alias


@pytest.mark.parametrize("alias", ["", "3", "1abc", "Prod", "a/b", "-x", "a@b", "x" * 65])
def test_invalid_alias_names(alias):
    with pytest.raises(InvalidName, match="invalid alias"):
        validate_alias_name(alias)


def test_latest_alias_is_reserved():
    with pytest.raises(InvalidName, match="built in"):
        validate_alias_name("latest")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("llama", Reference("llama")),
        ("llama:3", Reference("llama", version=3)),
        ("llama:12", Reference("llama", version=12)),
        ("llama@staging", Reference("llama", alias="staging")),
        ("llama@latest", Reference("llama", alias="latest")),
        ("a.b-c_d:1", Reference("a.b-c_d", version=1)),
        ("ft:smollm2:bluebird:abc123", Reference("ft:smollm2:bluebird:abc123")),
        ("ft:smollm2::abc123", Reference("ft:smollm2::abc123")),
        ("ft:smollm2:bluebird:abc123:2", Reference("ft:smollm2:bluebird:abc123", version=2)),
        ("ft:smollm2:b:abc123@prod", Reference("ft:smollm2:b:abc123", alias="prod")),
    ],
)
def test_reference_forms(text, expected):
    ref = parse_reference(text)
    assert ref == expected
    assert str(ref) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "llama:",
        "llama:0",
        "llama:01",
        "llama:-1",
        "llama:x",
        "llama:1.5",
        "llama@",
        "llama@3",
        "llama@Prod",
        "llama@a:1",
        "llama:1@a",
        "Llama",
        "a/b:1",
        "llama:١",
        "ft:smollm2:bluebird",
        "ft:smollm2:bluebird:abc123:0",
        "ft:smollm2:bluebird:abc123:x",
        "ft:smollm2:bluebird:abc123:1:2",
        "ft:smollm2:bluebird:abc123:1@prod",
        "ft:Smollm2:bluebird:abc123",
        "ft::bluebird:abc123",
        "ft:smollm2:blue bird:abc123",
    ],
)
def test_malformed_references(text):
    with pytest.raises(InvalidReference):
        parse_reference(text)


def test_fine_tuned_names():
    assert fine_tuned_name("smollm2", "bluebird", "ab12") == "ft:smollm2:bluebird:ab12"
    assert fine_tuned_name("smollm2", "", "ab12") == "ft:smollm2::ab12"
    assert validate_model_name("ft:smollm2::jobab12") == "ft:smollm2::jobab12"
    with pytest.raises(InvalidName, match="suffix"):
        fine_tuned_name("smollm2", "Blue bird", "ab12")
    with pytest.raises(InvalidName, match="shorter suffix"):
        fine_tuned_name("m" * 100, "s" * 40, "ab12")
    with pytest.raises(InvalidName):  # tenants never take the ft: form
        validate_model_name("ft:smollm2::jobab12", kind="tenant")
