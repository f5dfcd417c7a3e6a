"""Default sampling parameters per model: from generation_config.json, set at import or later
(API and CLI), shown on /v1/models, and overridden by every request field."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from tests.integration.serving.test_openai_llm import start_world

MESSAGES = [{"role": "user", "content": "where is paris?"}]


@pytest.fixture(scope="module")
def world(tmp_path_factory, model_sources):
    yield from start_world(
        tmp_path_factory.mktemp("defaults") / "maas-home", model_sources, llm_engine_process=False
    )


@pytest.fixture
def chat_model(world, model_sources, tmp_path):
    """A fresh copy of the tiny Llama whose generation_config.json sets two defaults."""
    folder = tmp_path / "llama"
    shutil.copytree(model_sources / "llama", folder)
    config = json.loads((folder / "generation_config.json").read_text())
    config |= {"temperature": 0.0, "max_new_tokens": 7, "top_p": 5.0}  # top_p out of range
    (folder / "generation_config.json").write_text(json.dumps(config))
    name = f"chat-{tmp_path.name[-12:].lower().replace('_', '-')}".rstrip("-")
    world.client.app.state.registry.import_model(folder, name)
    return name


def chat(world, model, **fields):
    body = {"model": model, "messages": MESSAGES, **fields}
    response = world.client.post("/v1/chat/completions", json=body, headers=world.as_("admin"))
    assert response.status_code == 200, response.text
    return response.json()


def texts(world, model, seeds, **fields) -> set[str]:
    return {
        chat(world, model, seed=seed, **fields)["choices"][0]["message"]["content"]
        for seed in seeds
    }


def card(world, model) -> dict:
    response = world.client.get(f"/v1/models/{model}", headers=world.as_("admin"))
    return response.json()


def served_defaults(world, model) -> dict:
    """What the server shows, once its 2-second record cache has seen a change made by the CLI
    (another process, as far as the server knows)."""
    time.sleep(2.1)
    return card(world, model)["sampling_defaults"]


def test_generation_config_gives_the_defaults_and_requests_override_them(world, chat_model):
    assert card(world, chat_model)["sampling_defaults"] == {"temperature": 0.0, "max_tokens": 7}
    answer = chat(world, chat_model, ignore_eos=True)
    assert answer["usage"]["completion_tokens"] == 7  # the default length
    assert len(texts(world, chat_model, range(4), ignore_eos=True)) == 1  # greedy by default
    varied = texts(world, chat_model, range(4), temperature=1.5, ignore_eos=True)
    assert len(varied) > 1, "a request's temperature must win over the default"
    longer = chat(world, chat_model, max_tokens=12, ignore_eos=True)
    assert longer["usage"]["completion_tokens"] == 12


def test_defaults_set_through_the_api_win_over_generation_config(world, chat_model):
    patch = {"sampling": {"max_tokens": 3, "temperature": 1.5}}
    response = world.client.patch(
        f"/api/v1/models/{chat_model}", json=patch, headers=world.as_("admin")
    )
    assert response.status_code == 200 and response.json()["sampling"] == patch["sampling"]
    assert card(world, chat_model)["sampling_defaults"] == {"temperature": 1.5, "max_tokens": 3}
    assert chat(world, chat_model, ignore_eos=True)["usage"]["completion_tokens"] == 3
    assert len(texts(world, chat_model, range(4), ignore_eos=True)) > 1
    completion = world.client.post(
        "/v1/completions",
        json={"model": chat_model, "prompt": "the cat", "ignore_eos": True},
        headers=world.as_("admin"),
    ).json()
    assert completion["usage"]["completion_tokens"] == 3  # instead of OpenAI's 16
    bad = world.client.patch(
        f"/api/v1/models/{chat_model}",
        json={"sampling": {"temperature": 9}},
        headers=world.as_("admin"),
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "sampling.temperature"
    cleared = world.client.patch(
        f"/api/v1/models/{chat_model}", json={"sampling": {}}, headers=world.as_("admin")
    )
    assert cleared.json()["sampling"] == {}
    assert card(world, chat_model)["sampling_defaults"] == {"temperature": 0.0, "max_tokens": 7}


def test_a_default_max_tokens_is_cut_to_the_context_but_a_requested_one_is_an_error(
    world, chat_model
):
    world.client.patch(
        f"/api/v1/models/{chat_model}",
        json={"sampling": {"max_tokens": 100_000}},
        headers=world.as_("admin"),
    )
    answer = chat(world, chat_model, ignore_eos=True)
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"]["total_tokens"] == 256  # the tiny Llama's whole context
    body = {"model": chat_model, "messages": MESSAGES, "max_tokens": 100_000}
    response = world.client.post("/v1/chat/completions", json=body, headers=world.as_("admin"))
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"


def test_the_cli_shows_sets_and_unsets_defaults(world, chat_model, cli, monkeypatch):
    monkeypatch.setenv("MAAS_HOME", str(world.client.app.state.settings.home))
    code, out, _ = cli("models", "defaults", chat_model)
    assert code == 0 and "generation_config.json" in out and "max_tokens" in out
    code, out, _ = cli("models", "defaults", chat_model, "temperature=0.3", "top_p=0.9")
    assert code == 0, out
    assert served_defaults(world, chat_model) == {"temperature": 0.3, "top_p": 0.9, "max_tokens": 7}
    code, out, _ = cli("models", "defaults", chat_model, "temperature=")
    assert served_defaults(world, chat_model) == {"temperature": 0.0, "top_p": 0.9, "max_tokens": 7}
    code, _, err = cli("models", "defaults", chat_model, "colour=red")
    assert code == 1 and "unknown sampling default 'colour'" in err
    code, _, err = cli("models", "defaults", chat_model, "temperature=hot")
    assert code == 1 and "temperature" in err
    code, _, err = cli("models", "defaults", "acme-embedder")
    assert code == 1 and "only text generation samples" in err


def test_import_takes_defaults(world, model_sources, cli, monkeypatch):
    monkeypatch.setenv("MAAS_HOME", str(world.client.app.state.settings.home))
    code, out, err = cli(
        "models",
        "import",
        str(model_sources / "llama"),
        "--name",
        "chat-imported",
        "--default",
        "temperature=0.2",
        "--default",
        "max_tokens=512",
    )
    assert code == 0, err
    assert served_defaults(world, "chat-imported") == {"temperature": 0.2, "max_tokens": 512}
