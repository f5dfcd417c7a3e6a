"""Speculative decoding through the server: on by default for a float32 model (an int8
draft), shown on /api/v1/deployments, counted under vLLM's metric names, and the same
answers as without a draft, from the engine's own process."""

from __future__ import annotations

import pytest

from tests.integration.serving.test_openai_llm import (
    GREEDY,
    MODEL,
    chat,
    metric,
    ok,
    start_world,
)


@pytest.fixture(scope="module")
def worlds(tmp_path_factory, model_sources):
    """float32 with the default draft (``auto``), and without one; engines in processes."""
    root = tmp_path_factory.mktemp("speculative")
    drafted = start_world(root / "drafted", model_sources, llm_dtype="float32")
    plain = start_world(root / "plain", model_sources, llm_dtype="float32", llm_draft="off")
    yield next(drafted), next(plain)
    for world in (drafted, plain):
        next(world, None)


def engine_of(world) -> dict:
    data = world.client.get("/api/v1/deployments", headers=world.as_("admin")).json()["data"]
    [engine] = [d["engine"] for d in data if d["model"] == MODEL]
    return engine


def test_a_float32_model_drafts_in_int8_and_answers_as_without_a_draft(worlds):
    drafted, plain = worlds
    answers = [ok(chat(w, max_tokens=24, **GREEDY)) for w in worlds]
    assert answers[0]["choices"] == answers[1]["choices"]
    assert answers[0]["usage"] == answers[1]["usage"]
    assert engine_of(drafted)["draft"] == "int8" and engine_of(drafted)["speculative_tokens"] == 8
    assert engine_of(plain)["draft"] == "" and engine_of(plain)["speculative_tokens"] == 0
    assert engine_of(drafted)["draft_min_confidence"] == 0.5  # MAAS_LLM_DRAFT_MIN_CONFIDENCE
    assert engine_of(plain)["draft_min_confidence"] == 0.0
    drafts = metric(drafted, "vllm:spec_decode_num_drafts_total")
    proposed = metric(drafted, "vllm:spec_decode_num_draft_tokens_total")
    accepted = metric(drafted, "vllm:spec_decode_num_accepted_tokens_total")
    assert 0 < drafts <= 23 and drafts <= proposed <= 8 * drafts and 0 <= accepted <= proposed
    assert accepted > 0  # the tiny model in int8 mostly picks as in float32
    assert metric(plain, "vllm:spec_decode_num_drafts_total") == 0
    assert metric(drafted, "vllm:generation_tokens_total") == 24
