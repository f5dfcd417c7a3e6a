"""Pipeline-parallel LLM inference with real stage processes (gloo over loopback): token for
token the single-process engine's greedy output in float32 under concurrent requests, with
streaming and aborts; a stage that dies fails its requests at once as unavailable, and the
server loads the model again."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from maas.config import Settings
from maas.engine.process import EngineProcess
from maas.messages import FailureKind, SamplingParams
from maas.registry import open_registry
from maas.routing.llm_deployment import EngineOptions
from maas.runtime.llm.runner import RunnerOptions
from maas.runtime.llm.tokenizer import load_tokenizer
from tests.fixtures import make_tiny_llama
from tests.integration.serving.test_llm_reliability import Served, wait_until

pytestmark = pytest.mark.timeout(300)

TEXTS = [
    "the cat sat on the mat",
    "paris is the capital of france and berlin",
    "hello world, how are you today?",
    "numbers like 12345 and words",
    "a dog ran",
    "one two three four five six seven eight nine ten",
]


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory):
    """A tiny random Llama of 4 layers, opened, and its tokenizer."""
    root = tmp_path_factory.mktemp("pipeline")
    registry = open_registry(Settings(home=root / "home"))
    registry.import_model(make_tiny_llama(root / "llama", num_layers=4), "tiny")
    opened = registry.open_version("tiny")
    yield opened, load_tokenizer(opened)
    registry.close()


def start(four_layers, stages: int, *, compile: bool = False) -> EngineProcess:
    opened, tokenizer = four_layers
    runner = RunnerOptions(  # compiled steps kept however a tiny model times them
        dtype="float32",
        max_sequences=4,
        max_model_len=96,
        threads=1,
        compile=compile,
        compile_always=compile,
    )
    options = EngineOptions(runner, max_batch_tokens=48, pipeline_stages=stages)
    return EngineProcess(opened, options, tokenizer.for_engine(), name=f"tiny-{stages}")


async def run_all(engine: EngineProcess, prompts, lengths, *, abort_after: int | None = None):
    """Every prompt at once; the last one is left after ``abort_after`` deltas."""

    async def one(index, prompt, n):
        deltas = []
        async for delta in engine.generate(prompt, greedy(n)):
            deltas.append(delta)
            last = index == len(prompts) - 1
            if last and abort_after is not None and len(deltas) == abort_after:
                break
        return deltas

    return await asyncio.gather(
        *(one(i, p, n) for i, (p, n) in enumerate(zip(prompts, lengths, strict=True)))
    )


def tokens(deltas) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


@pytest.fixture(scope="module")
def reference(four_layers):
    """The single-process engine's answers (the same EngineProcess, one stage)."""
    opened, tokenizer = four_layers
    prompts = [tokenizer.encode(t) for t in TEXTS]
    lengths = [20, 14, 9, 24, 6, 11]
    engine = start(four_layers, 1)
    try:
        outputs = asyncio.run(run_all(engine, prompts, lengths))
    finally:
        engine.close()
    return prompts, lengths, [tokens(d) for d in outputs]


@pytest.mark.parametrize(("stages", "compile"), [(2, True), (3, False)])
def test_pipeline_equals_the_single_process_engine_token_for_token(
    four_layers, reference, stages, compile, caplog, capfd
):
    prompts, lengths, expected = reference
    caplog.set_level(logging.INFO, logger="maas")
    engine = start(four_layers, stages, compile=compile)
    try:
        # every process of the pipeline logged its load as the server logs, under its name
        said = capfd.readouterr().err
        names = [f"engine-tiny-{stages}"] + [f"stage-{k}-tiny:1" for k in range(1, stages)]
        for name in names:
            assert re.search(rf"^INFO: +\({name}\) tiny:1 ready in ", said, re.M), said
        rows = engine.description.pipeline_stages
        assert [r["stage"] for r in rows] == list(range(stages))
        assert sum(int(r["layers"].split("-")[1]) - int(r["layers"].split("-")[0]) + 1
                   for r in rows) == 4  # fmt: skip
        assert engine.description.compiled == compile
        outputs = asyncio.run(run_all(engine, prompts, lengths, abort_after=3))
        got = [tokens(d) for d in outputs]
        assert got[:-1] == expected[:-1]
        assert got[-1] == expected[-1][: len(got[-1])] and len(got[-1]) < lengths[-1]
        for deltas, n in zip(outputs[:-1], lengths, strict=False):
            assert len(deltas) > 1, "streamed: more than one delta"
            assert deltas[-1].finish_reason == "length" and len(tokens(deltas)) == n
        # the aborted request's blocks came back: the same load runs again, equal
        again = asyncio.run(run_all(engine, prompts, lengths))
        assert [tokens(d) for d in again] == expected
    finally:
        engine.close()
    for process in engine._stages.processes:
        assert not process.is_alive(), "a stage outlived its engine"


def test_a_stage_that_dies_fails_its_requests_as_unavailable_at_once(four_layers):
    opened, tokenizer = four_layers
    engine = start(four_layers, 2)
    dead = []
    engine.on_dead = lambda: dead.append(time.monotonic())
    stage = engine._stages.processes[0]

    async def long_request():
        deltas = []
        async for delta in engine.generate(tokenizer.encode("the cat"), greedy(80)):
            deltas.append(delta)
            if len(deltas) == 3:
                os.kill(stage.pid, signal.SIGKILL)
                killed.append(time.monotonic())
        return deltas

    killed: list[float] = []
    try:
        deltas = asyncio.run(long_request())
        assert deltas[-1].error_kind is FailureKind.UNAVAILABLE, deltas[-1]
        assert time.monotonic() - killed[0] < 10, "the failure was not prompt"
        assert wait_until(lambda: bool(dead), 10) and engine.dead
        assert wait_until(lambda: not engine._process.is_alive(), 10)
    finally:
        engine.close()


def test_a_served_model_in_two_stages_recovers_from_a_killed_stage(tmp_path, model_sources):
    app = Served(tmp_path / "home", model_sources, pinned=True, llm_pipeline_stages=2)
    try:
        assert wait_until(lambda: app.ready() == 200), "the pinned model never loaded"
        first = app.complete(max_tokens=6)
        assert first.status_code == 200, first.text
        deployment = app.deployment()
        [stage] = deployment.engine._stages.processes
        os.kill(stage.pid, signal.SIGSTOP)  # the requests below wait on it
        with ThreadPoolExecutor(2) as pool:
            plain = pool.submit(app.complete, max_tokens=50)
            body = {"model": "chat", "prompt": "the cat", "max_tokens": 50, "stream": True,
                    "temperature": 0, "ignore_eos": True}  # fmt: skip
            streamed = pool.submit(app.client.post, "/v1/completions", json=body)
            assert wait_until(lambda: app.deployment().sequences == 2, 10)
            os.kill(stage.pid, signal.SIGKILL)
            plain, streamed = plain.result(), streamed.result()
        assert plain.status_code == 503, plain.text
        assert plain.json()["error"]["code"] == "service_unavailable"
        [event] = [
            json.loads(line.removeprefix("data: "))
            for line in streamed.text.splitlines()
            if line.startswith("data: {")
        ]
        assert event["error"]["code"] == "service_unavailable", event
        assert wait_until(lambda: app.ready() == 200), "the pipeline was not reloaded"
        assert app.deployment().engine._stages.processes[0].pid != stage.pid
        again = app.complete(max_tokens=6)
        assert again.status_code == 200 and again.json()["choices"] == first.json()["choices"]
        deployments = app.client.get("/api/v1/deployments").json()
        assert "pipeline_stages" in json.dumps(deployments)
    finally:
        app.close()


def test_pipeline_stages_per_model_apply_at_its_next_load(tmp_path, model_sources):
    app = Served(tmp_path / "home", model_sources, pinned=False)
    try:
        whole = app.complete(max_tokens=6)
        assert whole.status_code == 200 and app.deployment().engine._stages is None
        patched = app.client.patch("/api/v1/models/chat", json={"serving": {"pipeline_stages": 2}})
        assert patched.status_code == 200, patched.text
        assert patched.json()["serving"]["pipeline_stages"] == 2
        bad = app.client.patch("/api/v1/models/chat", json={"serving": {"pipeline_stages": 0}})
        assert bad.status_code == 400
        assert app.client.post("/v2/repository/models/chat/unload").status_code == 200
        split = app.complete(max_tokens=6)
        assert split.status_code == 200 and split.json()["choices"] == whole.json()["choices"]
        assert len(app.deployment().engine._stages.processes) == 1
    finally:
        app.close()
