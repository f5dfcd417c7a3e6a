"""Chat and text completions over HTTP on the tiny Llama: the OpenAI shapes, streaming,
sampling fields, errors, keys, metering, metrics and deadlines.

Most tests share one app whose engine runs on a thread of the server; one app runs the engine
in a process of its own, as the server does by default.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable

import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from maas.api.app import build_app
from maas.db.tables import UsageRecord
from maas.runtime.llm.tokenizer import load_tokenizer
from tests.conftest import suite_settings
from tests.integration.conftest import World, bearer, key_maker, tenant_maker

MODEL = "acme-chat"
MESSAGES = [{"role": "user", "content": "where is paris?"}]
GREEDY = {"temperature": 0, "ignore_eos": True}


def start_world(home, model_sources, **fields):
    """An app of ``suite_settings`` (decode steps eager: compiling took 30 s of this module's
    first request, to test something else; the e2e servers compile), one inference thread."""
    threads = torch.get_num_threads()
    with TestClient(build_app(suite_settings(home, inference_threads=1, **fields))) as client:
        yield World(client, key_maker(client), tenant_maker(client), model_sources)
    torch.set_num_threads(threads)  # the engine set it to inference_threads


@pytest.fixture(scope="module")
def world(tmp_path_factory, model_sources):
    """One app for the module, its engine on a thread of the server."""
    yield from start_world(
        tmp_path_factory.mktemp("llm") / "maas-home", model_sources, llm_engine_process=False
    )


@pytest.fixture(scope="module")
def chat_tokenizer(world):
    return load_tokenizer(world.client.app.state.registry.open_version(MODEL))


def chat(world, role="user", **fields):
    body = {"model": MODEL, "messages": MESSAGES, **fields}
    return world.client.post("/v1/chat/completions", json=body, headers=world.as_(role))


def complete(world, prompt, role="user", **fields):
    body = {"model": MODEL, "prompt": prompt, **fields}
    return world.client.post("/v1/completions", json=body, headers=world.as_(role))


def ok(response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()


def openai_error(response, status: int, *, code=None, param=None, type_=None) -> dict:
    assert response.status_code == status, response.text
    assert set(response.json()) == {"error"}
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    for name, expected in (("code", code), ("param", param), ("type", type_)):
        if expected is not None:
            assert error[name] == expected, error
    return error


def events(response) -> list[dict]:
    """The JSON of each server-sent event; the stream must end with ``data: [DONE]``."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    lines = [line for line in response.text.split("\n") if line]
    assert all(line.startswith("data: ") for line in lines), lines
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


def stream_chat(world, role="user", **fields) -> list[dict]:
    return events(chat(world, role, stream=True, **fields))


def content_of(chunks: list[dict], index: int = 0) -> str:
    return "".join(
        c["choices"][0]["delta"].get("content", "")
        for c in chunks
        if c["choices"] and c["choices"][0]["index"] == index
    )


def usage_rows(world, key_id: str) -> list:
    world.client.app.state.recorder.flush()
    with world.client.app.state.registry.engine.connect() as connection:
        query = select(UsageRecord).where(UsageRecord.key_id == key_id).order_by(UsageRecord.id)
        return list(connection.execute(query))


def engine_of(world):
    """The loaded deployment's LLMEngine (thread engine)."""
    [deployment] = [
        d for d in world.client.app.state.serving.pool.deployments() if d.record.name == MODEL
    ]
    return deployment.engine.engine


def wait_until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def metric(world, name: str) -> float:
    text = world.client.get("/metrics", headers=world.as_("admin")).text
    found = re.search(rf'^{re.escape(name)}{{model_name="{MODEL}:1"}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


# Chat completions


def test_chat_completion_answers_in_the_openai_shape(world, chat_tokenizer):
    body = ok(chat(world, max_tokens=8, **GREEDY))
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == MODEL and isinstance(body["created"], int)
    [choice] = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "length"
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"]
    assert choice["logprobs"] is None
    prompt_tokens = len(chat_tokenizer.encode_chat(MESSAGES))
    assert body["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 8,
        "total_tokens": prompt_tokens + 8,
    }
    again = ok(chat(world, max_tokens=8, **GREEDY))
    assert again["choices"][0]["message"] == choice["message"]  # greedy: the same answer
    assert again["id"] != body["id"]


def test_max_completion_tokens_and_max_tokens_bound_the_answer(world):
    by_old_name = ok(chat(world, max_tokens=5, **GREEDY))
    by_new_name = ok(chat(world, max_completion_tokens=5, **GREEDY))
    both = ok(chat(world, max_tokens=9, max_completion_tokens=5, **GREEDY))
    for body in (by_old_name, by_new_name, both):
        assert body["usage"]["completion_tokens"] == 5
        assert body["choices"][0]["finish_reason"] == "length"
    assert by_new_name["choices"] == by_old_name["choices"] == both["choices"]


def test_a_stop_string_ends_the_answer_with_stop(world):
    full = ok(chat(world, max_tokens=16, **GREEDY))["choices"][0]["message"]["content"]
    start = next(i for i in range(3, len(full) - 1) if "\ufffd" not in full[i : i + 2])
    stop = full[start : start + 2]
    body = ok(chat(world, max_tokens=16, stop=[stop, "never-generated"], **GREEDY))
    [choice] = body["choices"]
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["content"] == full[: full.index(stop)]
    assert body["usage"]["completion_tokens"] < 16


def test_streamed_chat_sends_role_then_content_then_done(world):
    expected = ok(chat(world, max_tokens=8, **GREEDY))["choices"][0]["message"]["content"]
    chunks = stream_chat(world, max_tokens=8, **GREEDY)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:])
    assert len(chunks) > 3  # the answer arrives in pieces
    assert content_of(chunks) == expected
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert all("usage" not in c for c in chunks)


def test_streamed_chat_with_include_usage_ends_with_a_usage_chunk(world):
    expected = ok(chat(world, max_tokens=6, **GREEDY))["usage"]
    chunks = stream_chat(world, max_tokens=6, stream_options={"include_usage": True}, **GREEDY)
    *answer, last = chunks
    assert last["choices"] == [] and last["usage"] == expected
    assert all(c["usage"] is None for c in answer)


def test_n_gives_n_choices_with_their_indexes(world):
    body = ok(chat(world, n=2, max_tokens=6, temperature=1.0, seed=5, ignore_eos=True))
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert all(c["finish_reason"] == "length" for c in body["choices"])
    assert body["usage"]["completion_tokens"] == 12
    first, second = (c["message"]["content"] for c in body["choices"])
    assert first != second
    chunks = stream_chat(world, n=2, max_tokens=6, temperature=1.0, seed=5, ignore_eos=True)
    assert [content_of(chunks, 0), content_of(chunks, 1)] == [first, second]
    finished = [c["choices"][0]["index"] for c in chunks if c["choices"][0]["finish_reason"]]
    assert sorted(finished) == [0, 1]


def test_logprobs_and_top_logprobs(world):
    body = ok(chat(world, max_tokens=5, logprobs=True, top_logprobs=3, **GREEDY))
    entries = body["choices"][0]["logprobs"]["content"]
    assert len(entries) == 5
    for entry in entries:
        assert entry["logprob"] <= 0
        if "\ufffd" not in entry["token"]:  # a whole-character token: its bytes are its text's
            assert entry["bytes"] == list(entry["token"].encode())
        top = entry["top_logprobs"]
        assert len(top) == 3
        assert [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        # greedy: the chosen token is the most likely one
        assert (entry["token"], entry["logprob"]) == (top[0]["token"], top[0]["logprob"])
    all_bytes = b"".join(bytes(entry["bytes"]) for entry in entries)
    content = body["choices"][0]["message"]["content"]
    assert all_bytes.decode("utf-8", errors="replace") == content
    plain = ok(chat(world, max_tokens=5, **GREEDY))
    assert plain["choices"][0]["message"] == body["choices"][0]["message"]
    chunks = stream_chat(world, max_tokens=5, logprobs=True, top_logprobs=3, **GREEDY)
    streamed = [e for c in chunks[1:] for e in c["choices"][0]["logprobs"]["content"]]
    assert streamed == entries


def test_a_seed_reproduces_a_sampled_answer(world):
    def answer(seed):
        body = ok(chat(world, max_tokens=16, temperature=1.0, seed=seed, ignore_eos=True))
        return body["choices"][0]["message"]["content"]

    assert answer(42) == answer(42)
    assert answer(42) != answer(43)


def test_the_extreme_seeds_work_with_several_choices(world):
    for seed in (2**63 - 1, -(2**63)):  # seed + choice index leaves torch's seed range
        body = ok(chat(world, max_tokens=4, temperature=1.0, seed=seed, n=2, ignore_eos=True))
        assert [c["finish_reason"] for c in body["choices"]] == ["length", "length"]


def test_the_request_id_the_caller_sends_comes_back(world):
    headers = {**world.as_("user"), "x-request-id": "trace-1234"}
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2}
    response = world.client.post("/v1/chat/completions", json=body, headers=headers)
    assert response.status_code == 200 and response.headers["x-request-id"] == "trace-1234"
    streamed = world.client.post(
        "/v1/chat/completions", json={**body, "stream": True}, headers=headers
    )
    assert streamed.headers["x-request-id"] == "trace-1234"
    completion = world.client.post(
        "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2}, headers=headers
    )
    assert completion.headers["x-request-id"] == "trace-1234"


def test_unknown_fields_are_ignored_and_nulls_mean_default(world):
    messages = [
        {"role": "system", "content": "be brief", "name": None},
        {"role": "assistant", "content": None},
        {"role": "user", "content": [{"type": "text", "text": "where is paris?"}]},
    ]
    body = ok(
        chat(
            world,
            messages=messages,
            max_tokens=None,
            max_completion_tokens=3,
            temperature=None,
            top_p=None,
            n=None,
            stop=None,
            stream=None,
            seed=None,
            logprobs=None,
            stream_options=None,
            presence_penalty=None,
            frequency_penalty=None,
            user=None,
            response_format=None,
            tools=None,
            tool_choice=None,
            parallel_tool_calls=True,
            metadata={"anything": 1},
            store=False,
            some_future_field={"nested": [1, 2]},
        )
    )
    assert body["usage"]["completion_tokens"] <= 3
    assert len(body["choices"]) == 1


def test_text_parts_read_as_the_plain_message_a_null_text_as_nothing(world):
    plain = ok(chat(world, max_tokens=4, **GREEDY))
    parts = [{"type": "text", "text": None}, {"type": "text", "text": MESSAGES[0]["content"]}]
    messages = [{"role": "user", "content": parts}]
    in_parts = ok(chat(world, messages=messages, max_tokens=4, **GREEDY))
    assert in_parts["usage"] == plain["usage"]
    assert in_parts["choices"][0]["message"] == plain["choices"][0]["message"]


def test_a_top_k_beyond_the_vocabulary_is_accepted(world):
    body = ok(chat(world, max_tokens=4, top_k=100_000, seed=1, ignore_eos=True))
    assert body["usage"]["completion_tokens"] == 4


# Text completions


def test_completion_of_a_string_prompt(world, chat_tokenizer):
    body = ok(complete(world, "the cat sat", max_tokens=6, **GREEDY))
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    [choice] = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "length" and choice["text"]
    assert choice["logprobs"] is None
    prompt_tokens = len(chat_tokenizer.encode("the cat sat"))
    assert body["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 6,
        "total_tokens": prompt_tokens + 6,
    }


def test_completion_of_several_prompts_answers_each_as_if_alone(world, chat_tokenizer):
    prompts = ["the cat sat", "paris is the capital"]
    alone = [ok(complete(world, p, max_tokens=6, **GREEDY))["choices"][0]["text"] for p in prompts]
    body = ok(complete(world, prompts, max_tokens=6, **GREEDY))
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert [c["text"] for c in body["choices"]] == alone
    assert body["usage"]["completion_tokens"] == 12
    as_ids = ok(complete(world, chat_tokenizer.encode(prompts[1]), max_tokens=6, **GREEDY))
    assert as_ids["choices"][0]["text"] == alone[1]
    with_n = ok(complete(world, prompts, n=2, max_tokens=3, **GREEDY))
    assert [c["index"] for c in with_n["choices"]] == [0, 1, 2, 3]


def test_echo_puts_the_prompt_before_the_completion(world):
    plain = ok(complete(world, "the cat sat", max_tokens=4, **GREEDY))["choices"][0]["text"]
    echoed = ok(complete(world, "the cat sat", max_tokens=4, echo=True, **GREEDY))
    assert echoed["choices"][0]["text"] == "the cat sat" + plain
    chunks = events(complete(world, "the cat sat", max_tokens=4, echo=True, stream=True, **GREEDY))
    assert "".join(c["choices"][0]["text"] for c in chunks) == "the cat sat" + plain
    both = events(
        complete(world, "the cat sat", max_tokens=4, echo=True, stream=True, n=2, **GREEDY)
    )
    for index in (0, 1):
        text = "".join(c["choices"][0]["text"] for c in both if c["choices"][0]["index"] == index)
        assert text == "the cat sat" + plain


def test_completion_logprobs(world):
    body = ok(complete(world, "the cat sat", max_tokens=5, logprobs=2, **GREEDY))
    logprobs = body["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == 5
    assert all(lp <= 0 for lp in logprobs["token_logprobs"])
    assert len(logprobs["top_logprobs"]) == 5
    for token, chosen, top in zip(
        logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"], strict=True
    ):
        assert 1 <= len(top) <= 2 and top[token] == pytest.approx(chosen)  # greedy: the best
        assert chosen == pytest.approx(max(top.values()))
    offsets = logprobs["text_offset"]
    assert offsets[0] == 0
    assert offsets == [sum(len(t) for t in logprobs["tokens"][:i]) for i in range(5)]
    chunks = events(complete(world, "the cat sat", max_tokens=5, logprobs=2, stream=True, **GREEDY))
    streamed = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["logprobs"]]
    assert [o for lp in streamed for o in lp["text_offset"]] == offsets  # runs on across chunks


# Models


def test_models_show_the_context_length(world):
    cards = ok(world.client.get("/v1/models", headers=world.as_("user")))["data"]
    [card] = [c for c in cards if c["id"] == MODEL]
    assert card["max_model_len"] == 256  # the model's own context, below the server's cap
    assert card["root"] == f"{MODEL}:1" and card["owned_by"] == "acme"
    one = ok(world.client.get(f"/v1/models/{MODEL}", headers=world.as_("user")))
    assert one["max_model_len"] == 256
    [gguf] = [c for c in cards if c["id"] == "acme-model@staging"]
    assert gguf["max_model_len"] == 128  # a chat model too, with a shorter context
    [embedder] = [c for c in cards if c["id"] == "acme-embedder"]
    assert embedder["max_model_len"] is None


# Errors


BAD_REQUESTS = {
    "negative max_tokens": ("chat/completions", {"max_tokens": -1}, "max_tokens", None),
    "zero max_completion_tokens": ("chat/completions", {"max_completion_tokens": 0}, None, None),
    "no messages": ("chat/completions", {"messages": []}, "messages", None),
    "unknown role": (
        "chat/completions",
        {"messages": [{"role": "wizard", "content": "hi"}]},
        None,
        None,
    ),
    "image parts": (
        "chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        "messages",
        None,
    ),
    "n too large": ("chat/completions", {"n": 17}, "n", None),
    "temperature too high": ("chat/completions", {"temperature": 3}, "temperature", None),
    "top_logprobs too many": (
        "chat/completions",
        {"logprobs": True, "top_logprobs": 21},
        None,
        None,
    ),
    "five stop strings": ("chat/completions", {"stop": ["a", "b", "c", "d", "e"]}, "stop", None),
    "json response_format": (
        "chat/completions",
        {"response_format": {"type": "json_object"}},
        "response_format",
        None,
    ),
    "tools": (
        "chat/completions",
        {"tools": [{"type": "function", "function": {"name": "f"}}]},
        "tools",
        None,
    ),
    "prompt longer than the context": (
        "chat/completions",
        {"messages": [{"role": "user", "content": "word " * 400}]},
        "messages",
        "context_length_exceeded",
    ),
    "prompt and max_tokens over the context": (
        "chat/completions",
        {"max_tokens": 250},
        "max_tokens",
        "context_length_exceeded",
    ),
    "completion prompt over the context": (
        "completions",
        {"prompt": list(range(300))},
        "prompt",
        "context_length_exceeded",
    ),
    "echo with logprobs": (
        "completions",
        {"prompt": "hi", "echo": True, "logprobs": 1},
        "echo",
        None,
    ),
    "token id outside the vocabulary": (
        "completions",
        {"prompt": [[1, 2, 100_000]]},
        "prompt",
        None,
    ),
    "empty prompt": ("completions", {"prompt": []}, "prompt", None),
    "prompt of no tokens": ("completions", {"prompt": ["hi", ""]}, "prompt", None),
    "seed beyond 64 bits": ("chat/completions", {"seed": 2**70}, "seed", None),
    "stop token id outside the vocabulary": (
        "chat/completions",
        {"stop_token_ids": [5, 10**9], "min_tokens": 2},
        "stop_token_ids",
        None,
    ),
    "suffix": ("completions", {"prompt": "hi", "suffix": "bye"}, "suffix", None),
    # known fields that would change the output but are not honoured: refused, never ignored
    "best_of": ("completions", {"prompt": "hi", "best_of": 3}, "best_of", None),
    "guided_regex": (
        "completions",
        {"prompt": "hi", "guided_regex": "[a-z]+"},
        "guided_regex",
        None,
    ),
    "guided_json in chat": ("chat/completions", {"guided_json": {}}, "guided_json", None),
    "logit_bias": ("chat/completions", {"logit_bias": {"5": 100}}, "logit_bias", None),
    "beam search": (
        "completions",
        {"prompt": "hi", "use_beam_search": True},
        "use_beam_search",
        None,
    ),
    "custom chat template": (
        "chat/completions",
        {"chat_template": "{{ x }}"},
        "chat_template",
        None,
    ),
    "skip_special_tokens off": (
        "chat/completions",
        {"skip_special_tokens": False},
        "skip_special_tokens",
        None,
    ),
    "audio output": ("chat/completions", {"modalities": ["text", "audio"]}, "modalities", None),
    "too many sequences": (
        "completions",
        {"prompt": ["a", "b", "c", "d", "e"], "n": 16},
        "n",
        None,
    ),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_requests_get_400_in_the_openai_shape(world, case):
    route, fields, param, code = BAD_REQUESTS[case]
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, **fields}
    if route == "completions":
        del body["messages"]
    response = world.client.post(f"/v1/{route}", json=body, headers=world.as_("user"))
    openai_error(response, 400, type_="invalid_request_error", param=param, code=code)


HARMLESS = {
    "chat/completions": {
        "logit_bias": {},
        "skip_special_tokens": True,
        "tool_choice": "none",
        "response_format": {"type": "text"},
        "modalities": ["text"],
        "guided_regex": None,
        "add_generation_prompt": True,
        "echo": False,
    },
    "completions": {"prompt": "hi", "best_of": 2, "n": 2, "suffix": "", "use_beam_search": False},
}


@pytest.mark.parametrize("route", HARMLESS)
def test_unhonoured_fields_at_values_that_change_nothing_are_accepted(world, route):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2, **HARMLESS[route]}
    if route == "completions":
        del body["messages"]
    response = world.client.post(f"/v1/{route}", json=body, headers=world.as_("user"))
    assert response.status_code == 200, response.text


def test_the_sequences_per_request_cap_is_a_setting(world, monkeypatch):
    monkeypatch.setattr(world.client.app.state.serving, "max_request_sequences", 3)
    body = {"model": MODEL, "prompt": ["a", "b"], "n": 2, "max_tokens": 1}
    response = world.client.post("/v1/completions", json=body, headers=world.as_("user"))
    error = openai_error(response, 400, param="n")
    assert (
        "4 sequences" in error["message"] and "MAAS_LLM_MAX_REQUEST_SEQUENCES" in error["message"]
    )
    body["n"] = 1
    assert (
        world.client.post("/v1/completions", json=body, headers=world.as_("user")).status_code
        == 200
    )
    chat_body = {"model": MODEL, "messages": MESSAGES, "n": 4, "max_tokens": 1}
    response = world.client.post("/v1/chat/completions", json=chat_body, headers=world.as_("user"))
    openai_error(response, 400, param="n")


def test_an_unknown_model_is_404(world):
    error = openai_error(chat(world, model="no-such-model"), 404, code="model_not_found")
    assert error["param"] == "model"
    response = complete(world, "hi", model="no-such-model")
    openai_error(response, 404, code="model_not_found")


def test_a_model_that_does_not_generate_text_is_400(world):
    error = openai_error(chat(world, model="acme-embedder"), 400, param="model")
    assert "does not generate text" in error["message"]


# Keys


def test_no_key_is_401(world):
    response = chat(world, role="none", max_tokens=2)
    openai_error(response, 401, type_="authentication_error", code="invalid_api_key")
    openai_error(chat(world, role="bad", max_tokens=2), 401)


def test_another_tenants_model_is_not_found_and_a_disallowed_one_forbidden(world):
    openai_error(chat(world, role="globex", max_tokens=2), 404, code="model_not_found")
    restricted = key_maker(world.client)("user", tenant="acme", allowed_models=["shared-model"])
    response = world.client.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": MESSAGES, "max_tokens": 2},
        headers=bearer(restricted),
    )
    openai_error(response, 403, type_="permission_error", param="model")
    ok(chat(world, role="maintainer", max_tokens=2))
    ok(chat(world, role="admin", max_tokens=2))


# Metering and metrics


def fresh_key(world) -> tuple[dict[str, str], str]:
    """Headers of a new acme user key, and its id (so usage rows are this test's alone)."""
    key = key_maker(world.client)("user", tenant="acme")
    return bearer(key), key[5:17]


def test_usage_is_metered_for_answers_and_streams(world):
    headers, key_id = fresh_key(world)
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 7, **GREEDY}
    answer = ok(world.client.post("/v1/chat/completions", json=body, headers=headers))
    streamed = world.client.post(
        "/v1/chat/completions",
        json={**body, "max_tokens": 5, "stream": True, "stream_options": {"include_usage": True}},
        headers=headers,
    )
    stream_usage = events(streamed)[-1]["usage"]
    completion = {"model": MODEL, "prompt": ["a", "b c"], "max_tokens": 3, **GREEDY}
    completed = ok(world.client.post("/v1/completions", json=completion, headers=headers))
    rows = usage_rows(world, key_id)
    assert [(r.endpoint, r.status, r.model, r.version) for r in rows] == [
        ("POST /v1/chat/completions", 200, MODEL, 1),
        ("POST /v1/chat/completions", 200, MODEL, 1),
        ("POST /v1/completions", 200, MODEL, 1),
    ]
    for row, usage in zip(rows, (answer["usage"], stream_usage, completed["usage"]), strict=True):
        assert (row.prompt_tokens, row.completion_tokens) == (
            usage["prompt_tokens"],
            usage["completion_tokens"],
        )
    assert (rows[1].completion_tokens, rows[2].completion_tokens) == (5, 6)


def test_an_abandoned_stream_is_metered_for_what_was_generated_and_stopped(world):
    headers, key_id = fresh_key(world)
    generated_before = metric(world, "vllm:generation_tokens_total")
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 200, "stream": True, **GREEDY}
    with world.client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        received = [line for line, _ in zip(lines, range(6), strict=False) if line]
    assert received and all(line.startswith("data: {") for line in received)
    engine = engine_of(world)
    assert wait_until(lambda: not engine.has_work())
    time.sleep(0.1)  # the engine thread reports a step's figures just after it
    generated = metric(world, "vllm:generation_tokens_total") - generated_before
    assert generated < 100, "the abandoned generation kept running"
    assert wait_until(lambda: len(usage_rows(world, key_id)) == 1)
    [row] = usage_rows(world, key_id)
    assert row.endpoint == "POST /v1/chat/completions" and row.model == MODEL
    assert row.prompt_tokens > 0 and 0 < row.completion_tokens < 200


def hang_up(
    world,
    headers,
    body: dict,
    *,
    after: float,
    stall_after: int | None = None,
    until: Callable[[], bool] | None = None,
):
    """``body`` to /v1/completions over raw ASGI, its client gone ``after`` seconds after
    sending it, and not before ``until()`` holds, if given (30 s at most more); with
    ``stall_after``, the connection stops taking data after that many body messages (a slow
    socket: the server is left waiting in ``send`` when the client goes)."""
    raw, messages, hang_up_at = json.dumps(body).encode(), [], []

    def staying() -> bool:
        now = time.monotonic()
        if now < hang_up_at[0]:
            return True
        return until is not None and now < hang_up_at[0] + 30 and not until()

    async def receive() -> dict:
        if not hang_up_at:
            hang_up_at.append(time.monotonic() + after)
            return {"type": "http.request", "body": raw, "more_body": False}
        # starlette probes for a disconnect with a receive it cancels at once
        while staying():
            await asyncio.sleep(0.01)
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        messages.append(message)
        bodies = sum(m["type"] == "http.response.body" for m in messages)
        if stall_after is not None and bodies >= stall_after:
            await asyncio.sleep(30)  # cancelled when the server sees the client go

    header_list = [(b"host", b"testserver"), (b"content-type", b"application/json")]
    header_list += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/completions",
        "raw_path": b"/v1/completions",
        "query_string": b"",
        "root_path": "",
        "headers": header_list,
        "client": ("127.0.0.1", 1),
        "server": ("testserver", 80),
    }

    async def call() -> None:
        try:
            await world.client.app(scope, receive, send)
        except BaseException as err:  # recorded: uvicorn would log it with a traceback
            messages.append({"type": "app.raised", "error": err})

    world.client.portal.call(call)
    return messages


@pytest.fixture
def slowed_engine(world, monkeypatch):
    """The loaded engine, 50 ms slower a step: hang-ups land mid-generation (a lone greedy
    sequence of a float32 model gets up to 9 tokens a step from speculative decoding, so
    200 tokens take at least 23 steps)."""
    ok(complete(world, "load the model", max_tokens=1))
    engine = engine_of(world)
    step = engine.step
    monkeypatch.setattr(engine, "step", lambda: time.sleep(0.05) or step())
    return engine


def generating(engine) -> Callable[[], bool]:
    """Whether a running sequence of ``engine`` has output a token."""
    return lambda: any(sequence.output_ids for sequence in engine.scheduler.running)


def test_an_answer_the_client_hung_up_on_is_metered_for_what_was_generated(
    world, slowed_engine, caplog
):
    headers, key_id = fresh_key(world)
    body = {"model": MODEL, "prompt": ["hello world"] * 4, "n": 4, "max_tokens": 200, **GREEDY}
    with caplog.at_level(logging.INFO):
        # some tokens, far from all: on a busy machine the prompts' step alone took over 0.5 s
        messages = hang_up(world, headers, body, after=0.5, until=generating(slowed_engine))
    # normal traffic: no exception out of the app (uvicorn would log its traceback), no ERROR
    assert [m for m in messages if m["type"] == "app.raised"] == []
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert any("the client hung up" in r.getMessage() for r in caplog.records)
    assert wait_until(lambda: not slowed_engine.has_work())
    assert wait_until(lambda: len(usage_rows(world, key_id)) == 1)
    [row] = usage_rows(world, key_id)
    assert row.prompt_tokens > 0 and 0 < row.completion_tokens < 4 * 4 * 200, row.status
    assert row.status == 499  # nginx's "client closed request"


def test_a_stream_whose_client_went_while_a_chunk_was_sent_is_metered(world, slowed_engine):
    headers, key_id = fresh_key(world)
    body = {"model": MODEL, "prompt": "hello world", "max_tokens": 200, "stream": True, **GREEDY}
    messages = hang_up(world, headers, body, after=0.5, stall_after=3)
    assert [m["status"] for m in messages if m["type"] == "http.response.start"] == [200]
    assert wait_until(lambda: not slowed_engine.has_work())
    assert wait_until(lambda: len(usage_rows(world, key_id)) == 1)
    [row] = usage_rows(world, key_id)
    assert row.prompt_tokens > 0 and 0 < row.completion_tokens < 200


def test_generation_metrics_carry_the_model_name(world):
    before = metric(world, "vllm:generation_tokens_total")
    prompt_before = metric(world, "vllm:prompt_tokens_total")
    body = ok(chat(world, max_tokens=7, **GREEDY))
    assert wait_until(lambda: metric(world, "vllm:generation_tokens_total") - before == 7)
    assert (
        metric(world, "vllm:prompt_tokens_total") - prompt_before
        == (body["usage"]["prompt_tokens"])
    )
    text = world.client.get("/metrics", headers=world.as_("admin")).text
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:time_to_first_token_seconds_count",
        "vllm:inter_token_latency_seconds_count",
        "vllm:e2e_request_latency_seconds_count",
    ):
        assert f'{name}{{model_name="{MODEL}:1"}}' in text, name
    assert metric(world, "vllm:e2e_request_latency_seconds_count") >= 1


def inference_counts(world) -> dict[str, float]:
    """The model's ``maas_inference_requests_total`` by outcome, and its timed requests."""
    text = world.client.get("/metrics", headers=world.as_("admin")).text
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("model") != MODEL or sample.labels.get("version") != "1":
                continue
            if sample.name == "maas_inference_requests_total":
                counts[sample.labels["outcome"]] = sample.value
            elif sample.name == "maas_inference_request_duration_seconds_count":
                counts["timed"] = sample.value
    return counts


def test_generation_is_counted_in_the_inference_metrics_like_any_inference(world):
    before = inference_counts(world)
    ok(chat(world, max_tokens=2, **GREEDY))
    events(chat(world, max_tokens=2, stream=True, **GREEDY))
    ok(complete(world, ["the cat", "a dog"], max_tokens=2, **GREEDY))
    openai_error(complete(world, "the cat", max_tokens=10**6), 400)  # past the context
    openai_error(chat(world, max_tokens=200, timeout=0.01, **GREEDY), 504)
    after = inference_counts(world)
    added = {name: after.get(name, 0) - before.get(name, 0) for name in after}
    assert added == {"success": 3, "client_error": 1, "server_error": 1, "timed": 5}


# Deadlines


@pytest.fixture(scope="module")
def hurried(tmp_path_factory, model_sources):
    """An app whose generations may take 50 ms at most."""
    yield from start_world(
        tmp_path_factory.mktemp("hurried") / "maas-home",
        model_sources,
        llm_engine_process=False,
        request_timeout_s=0.05,
    )


def test_a_generation_past_the_servers_deadline_is_a_504_in_the_openai_shape(hurried):
    long = {"max_tokens": 200, **GREEDY}
    openai_error(chat(hurried, **long), 504, type_="server_error", code="timeout")
    openai_error(complete(hurried, "the cat", **long), 504, code="timeout")
    chunks = stream_chat(hurried, **long)  # the stream has begun: the error is its last event
    assert chunks[-1]["error"]["code"] == "timeout"
    assert wait_until(lambda: not engine_of(hurried).has_work())


def test_a_request_timeout_shorter_than_the_servers_applies(world):
    openai_error(chat(world, max_tokens=200, timeout=0.05, **GREEDY), 504, code="timeout")
    assert ok(chat(world, max_tokens=2, timeout=30, **GREEDY))["usage"]["completion_tokens"] == 2


# The engine in a process of its own (the server's default)


@pytest.fixture(scope="module")
def separate(tmp_path_factory, model_sources):
    yield from start_world(
        tmp_path_factory.mktemp("separate") / "maas-home", model_sources, llm_engine_process=True
    )


def test_the_engine_in_its_own_process_answers_as_the_one_on_a_thread(world, separate):
    on_thread = ok(chat(world, max_tokens=12, **GREEDY))
    in_process = ok(chat(separate, max_tokens=12, **GREEDY))
    assert in_process["choices"] == on_thread["choices"]
    assert in_process["usage"] == on_thread["usage"]
    chunks = stream_chat(separate, max_tokens=12, stream_options={"include_usage": True}, **GREEDY)
    assert content_of(chunks) == on_thread["choices"][0]["message"]["content"]
    assert chunks[-1]["usage"] == on_thread["usage"]
    # the deadline crosses the process boundary too
    openai_error(chat(separate, max_tokens=200, timeout=0.05, **GREEDY), 504, code="timeout")
    assert wait_until(lambda: metric(separate, "vllm:generation_tokens_total") >= 24)


# The engine: how it runs, and its prefix cache


def test_deployments_show_how_the_engine_runs_the_model(world):
    ok(chat(world, max_tokens=1, **GREEDY))
    data = world.client.get("/api/v1/deployments", headers=world.as_("admin")).json()["data"]
    [engine] = [d["engine"] for d in data if d["model"] == MODEL]
    candidates = ["float32", "bfloat16", "int8-weight", "int8"]
    assert engine["runtime"] == "maas" and engine["dtype"] in candidates
    trials = engine["dtype_trials"]  # MAAS_LLM_DTYPE=auto, the default, measured each
    assert [t["dtype"] for t in trials] == candidates
    assert all(t["one_ms"] > 0 and t["batch_ms"] > 0 and 0 <= t["agreement"] <= 1 for t in trials)
    # MAAS_LLM_KV_CACHE_DTYPE=auto, the default: the activations' dtype
    activations = "float32" if engine["dtype"] in ("float32", "int8") else "bfloat16"
    assert engine["kv_cache_dtype"] == activations
    # MAAS_LLM_COMPILE=false (suite_settings): eager; the default, compiled, is shown by the
    # e2e servers' (tests/e2e/test_llm_clients.py)
    assert engine["compiled"] is False and engine["compiled_rows"] == 0
    assert engine["kv_blocks"] > 0 and engine["kv_block_size"] == 16


LONG_SYSTEM = "You answer in one short sentence, politely. " * 2


SHARED = "shared-chat"
"""Seen by every tenant."""


@pytest.fixture(scope="module")
def shared_chat(world, model_sources) -> str:
    """The tiny chat Llama as a model of no tenant."""
    world.client.app.state.registry.import_model(model_sources / "llama", SHARED)
    return SHARED


def prefix_cache(world) -> tuple[float, float]:
    text = world.client.get("/metrics", headers=world.as_("admin")).text

    def counter(name: str) -> float:
        found = re.search(rf'^{name}{{model_name="{SHARED}:1"}} (\S+)$', text, re.M)
        return float(found.group(1)) if found else 0.0

    return counter("vllm:prefix_cache_queries_total"), counter("vllm:prefix_cache_hits_total")


def test_a_repeated_system_prompt_comes_from_the_prefix_cache_of_its_own_tenant_only(
    world, shared_chat
):
    messages = [{"role": "system", "content": LONG_SYSTEM}, {"role": "user", "content": "hi"}]

    def ask(role: str) -> tuple[float, float]:
        before = prefix_cache(world)
        body = {"model": SHARED, "messages": messages, "max_tokens": 2, **GREEDY}
        ok(world.client.post("/v1/chat/completions", json=body, headers=world.as_(role)))
        assert wait_until(lambda: prefix_cache(world)[0] > before[0])
        after = prefix_cache(world)
        return after[0] - before[0], after[1] - before[1]

    queried, _ = ask("user")
    assert queried > 48  # the prompt is several blocks long
    assert ask("globex") == (queried, 0)  # another tenant: nothing shared
    queried_again, hits = ask("maintainer")  # acme again
    assert queried_again == queried and hits >= 48
