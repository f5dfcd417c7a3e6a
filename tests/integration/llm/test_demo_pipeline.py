"""The demo SmolLM2-135M-Instruct split into 2 pipeline stages answers the README's question
with Paris, token for token what the single-process engine answers (float32, greedy)."""

from __future__ import annotations

import asyncio

import pytest

from maas.config import Settings
from maas.engine.process import EngineProcess
from maas.messages import SamplingParams
from maas.registry import demo, open_registry
from maas.routing.llm_deployment import EngineOptions
from maas.runtime.llm.runner import RunnerOptions
from maas.runtime.llm.tokenizer import load_tokenizer

pytestmark = pytest.mark.timeout(400)

SMOLLM2 = demo.DEMO_MODELS[0]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def opened(tmp_path_factory):
    try:
        gguf = demo.locate(SMOLLM2)
    except Exception as error:  # make test installs it; a bare checkout may not have it
        pytest.skip(f"demo model not installed ({error}); run `maas demo --install-only`")
    registry = open_registry(Settings(home=tmp_path_factory.mktemp("home")))
    try:
        registry.import_model(gguf, SMOLLM2.name, task="chat")
        yield registry.open_version(SMOLLM2.name)
    finally:
        registry.close()


def answer(opened, stages: int) -> tuple[list[int], str, list[dict]]:
    tokenizer = load_tokenizer(opened)
    runner = RunnerOptions(dtype="float32", max_sequences=2, max_model_len=256, compile=False)
    engine = EngineProcess(
        opened,
        EngineOptions(runner, pipeline_stages=stages),
        tokenizer.for_engine(),
        name=f"smol-{stages}",
    )
    params = SamplingParams(max_tokens=24, temperature=0.0)

    async def run():
        return [d async for d in engine.generate(tokenizer.encode_chat(QUESTION), params)]

    try:
        deltas = asyncio.run(run())
        stage_rows = list(engine.description.pipeline_stages)
    finally:
        engine.close()
    return [t for d in deltas for t in d.token_ids], "".join(d.text for d in deltas), stage_rows


def test_two_stages_answer_paris_as_the_single_process_engine_does(opened):
    whole_ids, whole_text, _ = answer(opened, 1)
    split_ids, split_text, stages = answer(opened, 2)
    assert "Paris" in split_text, split_text
    assert split_ids == whole_ids and split_text == whole_text
    assert [s["layers"] for s in stages] == ["0-14", "15-29"]  # 30 blocks, tied head: even
    assert (
        abs(stages[0]["weights_bytes"] - stages[1]["weights_bytes"])
        < 0.1 * stages[0]["weights_bytes"]
    )
