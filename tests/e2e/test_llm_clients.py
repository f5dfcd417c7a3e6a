"""Real LLM clients against a real `maas serve` with the demo model (SmolLM2-135M-Instruct,
Q4_1 GGUF): the `openai` SDK, LangChain and LlamaIndex, unchanged, with a tenant's user key.
Greedy answers to one question: the model knows the capital of France."""

from __future__ import annotations

import os
from pathlib import Path

import openai
import pytest
from langchain_openai import ChatOpenAI
from llama_index.core.llms import ChatMessage
from llama_index.llms.openai_like import OpenAILike

from maas.config import Settings
from maas.registry import demo, open_registry
from tests.e2e.conftest import Server

# Loading the GGUF model takes 15 to 30 s on a busy 2-core machine; it is part of the first
# test's time, so the module gets more than the default two minutes.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

SMOLLM2 = demo.DEMO_MODELS[0]
MODEL = SMOLLM2.name
QUESTION = "What is the capital of France?"
MAX_TOKENS = 32


def start(root, env: dict[str, str] | None = None) -> Server:
    """A server whose registry holds the demo LLM, loaded, with a user key of tenant acme."""
    registry = open_registry(Settings(home=root / "home"))
    try:
        registry.import_model(demo.locate(SMOLLM2), MODEL, task="chat")
    finally:
        registry.close()
    server = Server(root / "home", env=env)
    try:
        server.wait_ready()
        admin = server.admin
        tenant = {"name": "acme", "industry": "retail"}
        assert admin.post("/api/v1/tenants", json=tenant).status_code == 201
        key = admin.post("/api/v1/keys", json={"name": "apps", "tenant": "acme", "role": "user"})
        server.user_key = key.json()["key"]
        loaded = admin.post(f"/v2/repository/models/{MODEL}/load", timeout=240)
        assert loaded.status_code == 200, loaded.text
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = start(tmp_path_factory.mktemp("llm-clients"))
    yield running
    running.stop()


def sdk(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.user_key, max_retries=0)


def ask_greedily(client: openai.OpenAI, **options):
    return client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": QUESTION}],
        temperature=0,
        max_tokens=MAX_TOKENS,
        **options,
    )


def test_openai_chat_answers_greedily(server):
    completion = ask_greedily(sdk(server))
    choice = completion.choices[0]
    assert "Paris" in choice.message.content
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert completion.model == MODEL
    assert 0 < completion.usage.completion_tokens <= MAX_TOKENS


def test_openai_chat_streams_the_same_answer(server):
    client = sdk(server)
    whole = ask_greedily(client).choices[0].message.content
    chunks = list(ask_greedily(client, stream=True, stream_options={"include_usage": True}))
    with_choices = [chunk for chunk in chunks if chunk.choices]
    text = "".join(chunk.choices[0].delta.content or "" for chunk in with_choices)
    assert text == whole and "Paris" in text
    assert with_choices[-1].choices[0].finish_reason in ("stop", "length")
    assert all(chunk.choices[0].finish_reason is None for chunk in with_choices[:-1])
    usage = chunks[-1].usage
    assert not chunks[-1].choices and usage is not None
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert 0 < usage.completion_tokens <= MAX_TOKENS


def test_openai_completions(server):
    completion = sdk(server).completions.create(
        model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=8
    )
    assert "Paris" in completion.choices[0].text
    assert completion.usage.completion_tokens <= 8


def test_langchain_invokes_and_streams(server):
    llm = ChatOpenAI(
        base_url=f"{server.url}/v1",
        api_key=server.user_key,
        model=MODEL,
        temperature=0,
        max_tokens=MAX_TOKENS,
        max_retries=0,
    )
    answer = llm.invoke(QUESTION)
    assert "Paris" in answer.content
    streamed = "".join(chunk.content for chunk in llm.stream(QUESTION))
    assert streamed == answer.content


def test_llamaindex_chats_and_completes(server):
    llm = OpenAILike(
        model=MODEL,
        api_base=f"{server.url}/v1",
        api_key=server.user_key,
        is_chat_model=True,
        context_window=2048,
        temperature=0,
        max_tokens=MAX_TOKENS,
        max_retries=0,
    )
    reply = llm.chat([ChatMessage(role="user", content=QUESTION)])
    assert "Paris" in reply.message.content
    assert "Paris" in llm.complete(QUESTION).text


def test_the_deployment_shows_how_the_default_engine_runs_the_model(server):
    """MAAS_LLM_DTYPE=auto and MAAS_LLM_COMPILE=true, the defaults: each dtype measured, the
    decode step compiled and used up to the batch where it was measured faster
    (test_compiled.py checks both cases on their own)."""
    (deployment,) = server.admin.get("/api/v1/deployments").json()["data"]
    engine = deployment["engine"]
    trials = [t["dtype"] for t in engine["dtype_trials"]]
    assert trials == ["float32", "bfloat16", "int8-weight", "int8"]
    assert engine["dtype"] in trials
    assert engine["compiled"] is (engine["compiled_rows"] > 0)
    assert engine["compiled_rows"] <= 32  # MAAS_LLM_MAX_SEQUENCES, the default
    # what inductor compiled is kept in maas's local cache, not in /tmp (emptied at boot)
    kept = Path(os.environ["MAAS_CACHE_DIR"]) / "inductor"
    assert list(kept.rglob("*.so")), f"no compiled code in {kept}"


def memory_bytes(server) -> int:
    (deployment,) = server.admin.get("/api/v1/deployments").json()["data"]
    return deployment["memory_bytes"]


def test_bfloat16_weights_answer_the_same_question_in_about_half_the_memory(tmp_path):
    servers = {}
    # float32 is the memory's yardstick and runs eagerly: compiling it took 25 to 40 s here,
    # and the module's server and bfloat16's compile their steps as users' servers do; it
    # has no draft model either (MAAS_LLM_DRAFT=auto would add an int8 copy), so that the
    # two hold the same weights in two dtypes
    env = {"bfloat16": {}, "float32": {"MAAS_LLM_COMPILE": "false", "MAAS_LLM_DRAFT": "off"}}
    try:
        for dtype in ("bfloat16", "float32"):
            servers[dtype] = start(tmp_path / dtype, env={"MAAS_LLM_DTYPE": dtype, **env[dtype]})
            assert "Paris" in ask_greedily(sdk(servers[dtype])).choices[0].message.content
        assert memory_bytes(servers["bfloat16"]) < 0.55 * memory_bytes(servers["float32"])
    finally:
        for running in servers.values():
            running.stop()
