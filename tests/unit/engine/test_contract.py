"""The ``GenerationEngine`` contract, checked the same way on every back-end: maas's engine on
a thread (``EngineClient``), in its own process (``EngineProcess``) and the ``transformers``
fallback (``TransformersGenerator``), all on one tiny random Llama.

The model takes 4096 positions, so an unbounded request runs for seconds: long enough to
leave it, time it out or close the engine under it, and to tell an abort from a request that
ran to its end."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import pytest

from maas.config import Settings
from maas.engine.client import EngineClient
from maas.engine.hf_generator import TransformersGenerator
from maas.engine.llm_engine import LLMEngine
from maas.engine.process import EngineProcess
from maas.engine.protocol import GenerationEngine
from maas.engine.stats import StatsObserver
from maas.errors import Unavailable
from maas.messages import EngineRequest, EngineStats, FailureKind, GenerationDelta, SamplingParams
from maas.registry import open_registry
from maas.registry.records import OpenedVersion
from maas.routing.llm_deployment import EngineOptions
from maas.runtime.llm.runner import ModelRunner, RunnerOptions
from maas.runtime.llm.tokenizer import ChatTokenizer, load_tokenizer
from maas.runtime.llm.transformers_lm import TransformersLM
from tests.fixtures import make_tiny_llama

# The process back-end imports torch again and loads the model: seconds, not milliseconds.
pytestmark = pytest.mark.timeout(180)

BACKENDS = ("thread", "process", "transformers")
POSITIONS = 4096
OPTIONS = RunnerOptions(max_sequences=4, max_model_len=POSITIONS, threads=1, compile=False)
"""Eager steps: the contract is the engine's, whichever way a step runs (compiled steps give
the eager steps' tokens: test_compiled.py), and compiling took 36 s of this module's 48."""
GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
ENDLESS = replace(GREEDY, max_tokens=POSITIONS - 64)
"""Seconds of work on every back-end (under a millisecond a token)."""


@dataclass
class Running:
    """A back-end under test, and every ``EngineStats`` it reported."""

    engine: GenerationEngine
    reports: list[EngineStats] = field(default_factory=list)

    def generated_since(self, report: int) -> int:
        return sum(stats.generation_tokens for stats in self.reports[report:])


@pytest.fixture(scope="module")
def long_llama(tmp_path_factory) -> tuple[OpenedVersion, ChatTokenizer]:
    """The tiny Llama with room for 4096 positions (rotary embeddings need no new weights)."""
    root = tmp_path_factory.mktemp("contract")
    folder = make_tiny_llama(root / "llama")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 4096}))
    registry = open_registry(Settings(home=root / "maas-home"))
    registry.import_model(folder, "tiny")
    version = registry.open_version("tiny")
    yield version, load_tokenizer(version)
    registry.close()


def start(backend: str, version: OpenedVersion, tokenizer: ChatTokenizer) -> Running:
    running = Running(engine=None)  # type: ignore[arg-type]
    record = running.reports.append
    if backend == "thread":
        runner = ModelRunner(version, OPTIONS, tokenizer=tokenizer)
        engine = LLMEngine(runner, max_batch_tokens=64, observer=StatsObserver())
        running.engine = EngineClient(engine, name="tiny", on_stats=record)
    elif backend == "process":
        options = EngineOptions(OPTIONS, max_batch_tokens=64)
        running.engine = EngineProcess(
            version, options, tokenizer.for_engine(), name="tiny", on_stats=record
        )
    else:
        model = TransformersLM(version, OPTIONS)
        running.engine = TransformersGenerator(model, tokenizer, name="tiny", on_stats=record)
    return running


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request, long_llama) -> Running:
    """One engine of each back-end, shared by the module's tests."""
    running = start(request.param, *long_llama)
    yield running
    running.engine.close()


@pytest.fixture(scope="module")
def prompt(long_llama) -> list[int]:
    return long_llama[1].encode("the cat sat on the mat")


@pytest.fixture(scope="module")
def expected(long_llama, prompt) -> list[int]:
    """The greedy tokens of ``LLMEngine`` driven step by step, with nothing around it."""
    version, tokenizer = long_llama
    engine = LLMEngine(ModelRunner(version, OPTIONS, tokenizer=tokenizer), max_batch_tokens=64)
    deltas: list[GenerationDelta] = []
    engine.add_request(EngineRequest("alone", tuple(prompt), GREEDY), deltas.append)
    while engine.has_work():
        engine.step()
    return [token for delta in deltas for token in delta.token_ids]


def generate(engine: GenerationEngine, prompt: list[int], params: SamplingParams, **options):
    async def collect() -> list[GenerationDelta]:
        return [delta async for delta in engine.generate(prompt, params, **options)]

    return asyncio.run(collect())


def of(deltas: list[GenerationDelta], index: int) -> list[GenerationDelta]:
    return [delta for delta in deltas if delta.index == index]


def tokens(deltas: list[GenerationDelta]) -> list[int]:
    return [token for delta in deltas for token in delta.token_ids]


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_each_back_end_is_a_generation_engine(backend):
    engine = backend.engine
    assert isinstance(engine, GenerationEngine)
    assert engine.max_len == POSITIONS and engine.memory_bytes > 0
    assert engine.num_slots == (1 if isinstance(engine, TransformersGenerator) else 4)
    assert isinstance(engine.stats, EngineStats)
    assert engine.dead is False and engine.on_dead is None


def test_greedy_output_streams_as_deltas_and_is_complete(backend, prompt, expected):
    before = len(backend.reports)
    deltas = generate(backend.engine, prompt, GREEDY)
    assert tokens(deltas) == expected
    assert len(deltas) > 1, "the output came in one piece, not streamed"
    assert [d.completion_tokens for d in deltas] == sorted({d.completion_tokens for d in deltas})
    last = deltas[-1]
    assert (last.finish_reason, last.completion_tokens, last.prompt_tokens) == (
        "length",
        GREEDY.max_tokens,
        len(prompt),
    )
    assert all(d.finish_reason is None and d.error is None for d in deltas[:-1])
    assert wait_until(lambda: backend.generated_since(before) == GREEDY.max_tokens)
    assert backend.engine.stats.running == 0 and not backend.engine.dead


def test_n_sequences_each_stream_to_their_end(backend, prompt, expected):
    deltas = generate(backend.engine, prompt, GREEDY, n=3)
    assert {d.index for d in deltas} == {0, 1, 2}
    for index in range(3):
        mine = of(deltas, index)
        assert tokens(mine) == expected  # greedy: every sequence is the same
        assert [d.finish_reason for d in mine if d.finish_reason] == ["length"]


def test_leaving_early_aborts_the_request_and_frees_the_engine(backend, prompt, expected):
    engine = backend.engine

    async def leave_after_three() -> list[GenerationDelta]:
        stream = engine.generate(prompt, ENDLESS)
        taken = [await anext(stream) for _ in range(3)]
        await stream.aclose()
        return taken

    before = len(backend.reports)
    assert len(asyncio.run(leave_after_three())) == 3
    assert wait_until(lambda: engine.stats.running == 0 and engine.stats.waiting == 0)
    assert backend.generated_since(before) < ENDLESS.max_tokens // 2, "it ran on"
    assert tokens(generate(engine, prompt, GREEDY)) == expected  # and serves the next one


def test_a_timeout_ends_every_sequence_with_a_timeout_delta(backend, prompt):
    started = time.monotonic()
    deltas = generate(backend.engine, prompt, ENDLESS, n=2, timeout=0.2)
    assert time.monotonic() - started < 10
    for index in range(2):
        last = of(deltas, index)[-1]
        assert last.finish_reason == "abort" and last.error_kind is FailureKind.TIMEOUT
        assert last.completion_tokens < ENDLESS.max_tokens
    assert wait_until(lambda: backend.engine.stats.running == 0)


@pytest.mark.parametrize("kind", BACKENDS)
def test_close_fails_what_is_pending_as_unavailable(kind, long_llama, prompt):
    running = start(kind, *long_llama)
    engine = running.engine

    async def close_midway() -> list[GenerationDelta]:
        stream = engine.generate(prompt, ENDLESS, n=2)
        first = await anext(stream)
        await asyncio.get_running_loop().run_in_executor(None, engine.close)
        return [first, *[delta async for delta in stream]]

    deltas = asyncio.run(close_midway())
    for index in range(2):
        last = of(deltas, index)[-1]
        assert last.finish_reason == "abort" and last.error_kind is FailureKind.UNAVAILABLE
    assert engine.dead is False  # closed, not dead: nothing restarts it
    with pytest.raises(Unavailable, match="unloaded"):
        generate(engine, prompt, GREEDY)
