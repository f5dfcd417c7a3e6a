"""A tiny random Llama in a registry of its own, and helpers that drive an ``LLMEngine``."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import torch

from maas.config import Settings
from maas.engine.llm_engine import LLMEngine
from maas.messages import EngineRequest, GenerationDelta, SamplingParams
from maas.registry import open_registry
from maas.registry.records import OpenedVersion
from maas.runtime.llm.config import LlamaConfig
from maas.runtime.llm.model import KVCache
from maas.runtime.llm.runner import ModelRunner, RunnerOptions
from maas.runtime.llm.tokenizer import ChatTokenizer, load_tokenizer
from tests.fixtures import make_tiny_llama

MakeEngine = Callable[..., LLMEngine]


@pytest.fixture(scope="package")
def llama_version(tmp_path_factory) -> OpenedVersion:
    """The tiny Llama imported into a temporary registry, opened and checked, once."""
    threads = torch.get_num_threads()
    root = tmp_path_factory.mktemp("llm")
    registry = open_registry(Settings(home=root / "maas-home"))
    registry.import_model(make_tiny_llama(root / "llama"), "tiny")
    yield registry.open_version("tiny")
    registry.close()
    torch.set_num_threads(threads)  # the runners set it to 1


@pytest.fixture(scope="package")
def llama_tokenizer(llama_version) -> ChatTokenizer:
    return load_tokenizer(llama_version)


@pytest.fixture
def make_engine(llama_version, llama_tokenizer) -> MakeEngine:
    """make_engine(max_batch_tokens=64, max_sequences=4, max_model_len=128, tokenizer=None,
    dtype="float32", kv_cache_blocks=0, compile=False, paged_attention=True,
    kv_cache_dtype="auto", draft="off", speculative_tokens=8, draft_min_confidence=0.0): a fresh
    engine (fresh KV cache of 16-position blocks: ``kv_cache_blocks`` of them, or enough for
    every sequence), one thread, eager unless ``compile``."""

    def make(
        *,
        max_batch_tokens: int = 64,
        max_sequences: int = 4,
        max_model_len: int = 128,
        tokenizer: ChatTokenizer | None = None,
        dtype: str = "float32",
        kv_cache_blocks: int = 0,
        compile: bool = False,
        paged_attention: bool = True,
        kv_cache_dtype: str = "auto",
        draft: str = "off",
        speculative_tokens: int = 8,
        draft_min_confidence: float = 0.0,
    ) -> LLMEngine:
        config = LlamaConfig.from_hf(json.loads((llama_version.folder / "config.json").read_text()))
        kv = torch.bfloat16 if kv_cache_dtype == "bfloat16" else torch.float32  # as float32's
        block_bytes = KVCache.bytes_per_block(config, 16, kv)
        options = RunnerOptions(
            dtype=dtype,
            max_sequences=max_sequences,
            max_model_len=max_model_len,
            kv_cache_bytes=kv_cache_blocks * block_bytes,
            block_size=16,
            compile=compile,
            paged_attention=paged_attention,
            kv_cache_dtype=kv_cache_dtype,
            draft=draft,
            speculative_tokens=speculative_tokens,
            draft_min_confidence=draft_min_confidence,
            threads=1,
        )
        runner = ModelRunner(llama_version, options, tokenizer or llama_tokenizer)
        return LLMEngine(runner, max_batch_tokens=max_batch_tokens)

    return make


def greedy(max_tokens: int = 16, **fields) -> SamplingParams:
    """Greedy and blind to end-of-sequence, so every run has the same length."""
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **fields)


def submit(
    engine: LLMEngine,
    request_id: str,
    prompt: list[int],
    params: SamplingParams,
    *,
    n: int = 1,
    deadline: float | None = None,
) -> list[GenerationDelta]:
    """Add a request; returns the list its deltas are appended to."""
    deltas: list[GenerationDelta] = []
    engine.add_request(EngineRequest(request_id, tuple(prompt), params, n, deadline), deltas.append)
    return deltas


def run_to_end(engine: LLMEngine, max_steps: int = 2000) -> int:
    steps = 0
    while engine.has_work():
        engine.step()
        steps += 1
        assert steps < max_steps, "the engine never ran out of work"
    return steps


def token_ids(deltas: list[GenerationDelta], index: int = 0) -> list[int]:
    return [t for d in deltas if d.index == index for t in d.token_ids]


def text_of(deltas: list[GenerationDelta], index: int = 0) -> str:
    return "".join(d.text for d in deltas if d.index == index)


def finish_reason(deltas: list[GenerationDelta], index: int = 0) -> str | None:
    return [d for d in deltas if d.index == index][-1].finish_reason


def generate_alone(
    make_engine: MakeEngine, prompt: list[int], params: SamplingParams, **options
) -> list[GenerationDelta]:
    """A request's deltas on a fresh engine with nothing else to do."""
    engine = make_engine(**options)
    deltas = submit(engine, "alone", prompt, params)
    run_to_end(engine)
    return deltas
