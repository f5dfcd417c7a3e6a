"""The transformers fallback: a tiny random GPT-2 generates as ``transformers`` does, with the
main engine's sampling, stopping and deltas, and serves /v1/completions through the app."""

from __future__ import annotations

import asyncio
import shutil
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

import maas.engine.hf_generator as hf_generator
from maas.api.app import build_app
from maas.artifacts.keyring import MasterKeyring
from maas.auth.bootstrap import ensure_admin_key
from maas.config import Settings
from maas.engine.client import EngineClient
from maas.engine.hf_generator import TransformersGenerator
from maas.engine.llm_engine import LLMEngine
from maas.errors import InvalidRequest, UnsupportedFormat
from maas.messages import MODEL_UNLOADED, FailureKind, SamplingParams
from maas.registry import open_registry
from maas.routing.llm_deployment import runs_on_engine
from maas.runtime.llm.runner import ModelRunner, RunnerOptions
from maas.runtime.llm.tokenizer import load_tokenizer
from maas.runtime.llm.transformers_lm import TransformersLM
from tests.fixtures import make_gguf, make_tiny_llama

PROMPT = "paris is the capital of"
GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


def make_tiny_gpt2(folder: Path, llama: Path, *, chat_template: bool = False) -> Path:
    """A random GPT-2 (2 layers, hidden 32, 128 positions) with the tiny Llama's byte-level
    BPE tokenizer; its chat template only if asked."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    folder.mkdir(parents=True)
    names = ["tokenizer.json", "tokenizer_config.json"]
    for name in names + (["chat_template.jinja"] if chat_template else []):
        shutil.copy(llama / name, folder / name)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=len(tokenizer),
        n_positions=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():  # sharper logits than the default init, so argmax ties are rare
        model.transformer.ln_f.weight.mul_(8.0)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fallback-sources")
    llama = make_tiny_llama(folder / "llama")
    make_tiny_gpt2(folder / "gpt2", llama)
    make_tiny_gpt2(folder / "gpt2-chat", llama, chat_template=True)
    return folder


@pytest.fixture
def gpt2(registry, sources):
    record = registry.import_model(sources / "gpt2", "gpt")
    return registry.open_version(record.reference)


def start(version, on_stats=None, **options) -> TransformersGenerator:
    model = TransformersLM(version, RunnerOptions(**options))
    return TransformersGenerator(model, load_tokenizer(version), on_stats=on_stats)


@pytest.fixture
def generator(gpt2):
    generator = start(gpt2)
    yield generator
    generator.close()


def run(engine, prompt: str | list[int], params: SamplingParams, n: int = 1, **options):
    """All deltas of one request, in order."""
    ids = engine.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt

    async def collect():
        return [delta async for delta in engine.generate(ids, params, n=n, **options)]

    return asyncio.run(collect())


def tokens_of(deltas, index: int = 0) -> list[int]:
    return [token for d in deltas if d.index == index for token in d.token_ids]


def text_of(deltas, index: int = 0) -> str:
    return "".join(d.text for d in deltas if d.index == index)


def greedy_ids(folder: Path, prompt: list[int], max_new_tokens: int) -> list[int]:
    """What transformers' own ``generate`` picks, greedily."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    output = model.generate(
        torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=0
    )
    return output[0, len(prompt) :].tolist()


def greedy_text(folder: Path, prompt: str, max_new_tokens: int) -> str:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = greedy_ids(folder, tokenizer.encode(prompt), max_new_tokens)
    return tokenizer.decode(ids, skip_special_tokens=True).rstrip("\ufffd")


def test_greedy_output_is_what_transformers_generate_gives(gpt2, sources):
    reports = []
    generator = start(gpt2, on_stats=reports.append)
    try:
        deltas = run(generator, PROMPT, SamplingParams(max_tokens=24, temperature=0))
    finally:
        generator.close()
    prompt = generator.tokenizer.encode(PROMPT)
    expected = greedy_ids(sources / "gpt2", prompt, 24)
    assert tokens_of(deltas) == expected
    assert all(len(d.token_ids) == 1 for d in deltas)
    last = deltas[-1]
    assert last.finish_reason == ("stop" if expected[-1] == 0 else "length")
    assert (last.prompt_tokens, last.completion_tokens) == (len(prompt), len(expected))
    assert text_of(deltas) == generator.tokenizer.decode(expected).rstrip("\ufffd")
    assert sum(r.generation_tokens for r in reports) == len(expected)
    assert [len(r.ttft) for r in reports].count(1) == 1 and sum(len(r.e2e) for r in reports) == 1
    assert reports[0].running == 1 and reports[-1].running == 0


def test_stop_strings_end_the_text_and_are_never_shown(generator):
    full = text_of(run(generator, PROMPT, GREEDY))
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    deltas = run(generator, PROMPT, replace(GREEDY, stop=(stop,)))
    assert text_of(deltas) == full[: full.index(stop)]
    assert deltas[-1].finish_reason == "stop"


def test_stop_token_ids_end_the_sequence(generator):
    tokens = tokens_of(run(generator, PROMPT, GREEDY))
    params = replace(GREEDY, stop_token_ids=(tokens[3],))
    deltas = run(generator, PROMPT, params)
    assert tokens_of(deltas) == tokens[: tokens.index(tokens[3]) + 1]
    assert deltas[-1].finish_reason == "stop"


def test_max_tokens_and_the_context_end_with_length(gpt2, generator):
    deltas = run(generator, PROMPT, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    assert len(tokens_of(deltas)) == 5 and deltas[-1].finish_reason == "length"
    assert generator.model.max_len == 128  # n_positions, below the default max_model_len
    short = start(gpt2, max_model_len=16)
    try:
        prompt = short.tokenizer.encode(PROMPT)
        deltas = run(short, prompt, SamplingParams(max_tokens=100, ignore_eos=True))
    finally:
        short.close()
    assert len(prompt) + len(tokens_of(deltas)) == 16
    assert deltas[-1].finish_reason == "length"


def test_n_sequences_sample_as_separate_requests_with_their_seeds(generator):
    params = SamplingParams(max_tokens=20, temperature=1.5, seed=7, stop=(" ",))
    together = run(generator, PROMPT, params, n=3)
    alone = [tokens_of(run(generator, PROMPT, replace(params, seed=7 + i))) for i in range(3)]
    assert [tokens_of(together, i) for i in range(3)] == alone
    assert len({len(tokens) for tokens in alone}) > 1  # rows left the batch at different steps
    assert sum(d.finish_reason is not None for d in together) == 3


def test_a_seed_reproduces_its_sample(generator):
    params = SamplingParams(max_tokens=16, temperature=1.5, seed=123, ignore_eos=True)
    first, again = (tokens_of(run(generator, PROMPT, params)) for _ in range(2))
    other = tokens_of(run(generator, PROMPT, replace(params, seed=5)))
    assert first == again != other


def test_logprobs_and_penalties_apply(generator):
    deltas = run(generator, PROMPT, replace(GREEDY, logprobs=2))
    for delta in deltas:
        [logprob] = delta.logprobs
        assert len(logprob.top) == 2 and logprob.top[0][0] == logprob.token
        assert logprob.logprob == pytest.approx(logprob.top[0][1]) and logprob.logprob <= 0
    plain = tokens_of(deltas)
    assert len(set(plain)) < len(plain)  # a random model repeats itself...
    penalised = tokens_of(run(generator, PROMPT, replace(GREEDY, frequency_penalty=2.0)))
    assert penalised != plain  # ...less so when told not to


def slowed(generator: TransformersGenerator, seconds: float) -> list[float]:
    """Make each decode step take ``seconds``; returns the times steps started."""
    steps: list[float] = []
    decode = generator.model.decode

    def slow(tokens, cache):
        steps.append(time.monotonic())
        time.sleep(seconds)
        return decode(tokens, cache)

    generator.model.decode = slow
    return steps


def test_leaving_the_stream_early_stops_the_request(generator):
    steps = slowed(generator, 0.02)
    prompt = generator.tokenizer.encode(PROMPT)

    async def abandon_then_ask_again():
        stream = generator.generate(prompt, SamplingParams(max_tokens=100, ignore_eos=True))
        for _ in range(3):
            await anext(stream)
        await stream.aclose()
        left_at = time.monotonic()
        follow_up = [d async for d in generator.generate(prompt, replace(GREEDY, max_tokens=2))]
        return left_at, follow_up

    left_at, follow_up = asyncio.run(abandon_then_ask_again())
    assert len(tokens_of(follow_up)) == 2
    assert len([t for t in steps if t > left_at]) <= 2  # one step in flight, one follow-up step
    assert len(steps) < 10


def test_a_request_that_cannot_start_fails_alone(generator, monkeypatch):
    real = hf_generator.Sequence

    def broken(request_id, index, prompt_ids, params, *args, **kwargs):
        if params.seed == 666:
            raise ValueError("cannot build this sequence")
        return real(request_id, index, prompt_ids, params, *args, **kwargs)

    monkeypatch.setattr(hf_generator, "Sequence", broken)
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    failed = run(generator, PROMPT, replace(params, seed=666), n=2)
    assert [(d.index, d.finish_reason) for d in failed] == [(0, "abort"), (1, "abort")]
    assert all(d.error for d in failed)
    assert len(tokens_of(run(generator, PROMPT, params))) == 4  # the generator carries on


def test_a_deadline_fails_the_request_with_a_timeout_message(generator):
    slowed(generator, 0.05)
    deltas = run(generator, PROMPT, SamplingParams(max_tokens=100, ignore_eos=True), timeout=0.2)
    assert deltas[-1].finish_reason == "abort" and "deadline" in deltas[-1].error
    assert 0 < deltas[-1].completion_tokens < 100


def test_close_fails_what_is_running(gpt2):
    generator = start(gpt2)
    slowed(generator, 0.05)

    async def close_midway():
        stream = generator.generate([1, 2, 3], SamplingParams(max_tokens=100, ignore_eos=True))
        await anext(stream)
        await asyncio.get_running_loop().run_in_executor(None, generator.close)
        return [d async for d in stream]

    rest = asyncio.run(close_midway())
    assert rest[-1].error == MODEL_UNLOADED.message and not generator.dead
    assert rest[-1].error_kind is FailureKind.UNAVAILABLE


def test_the_fallback_agrees_with_maas_engine_on_a_llama(registry, sources):
    record = registry.import_model(sources / "llama", "llama")
    llama = registry.open_version(record.reference)
    options = RunnerOptions(max_sequences=4, max_model_len=128, kv_cache_bytes=2**22)
    tokenizer = load_tokenizer(llama)
    runner = ModelRunner(llama, options, tokenizer=tokenizer)
    engine = EngineClient(LLMEngine(runner, max_batch_tokens=64))
    fallback = TransformersGenerator(TransformersLM(llama, options), tokenizer)
    sampled = SamplingParams(max_tokens=12, temperature=1.0, seed=3, stop=(" the",))
    prompt = tokenizer.encode(PROMPT)
    try:
        for params, n in ((GREEDY, 1), (sampled, 2)):
            ours, theirs = run(engine, prompt, params, n), run(fallback, prompt, params, n)
            for i in range(n):
                assert tokens_of(ours, i) == tokens_of(theirs, i)
                assert text_of(ours, i) == text_of(theirs, i)
            assert [d.finish_reason for d in ours if d.finish_reason] == [
                d.finish_reason for d in theirs if d.finish_reason
            ]
    finally:
        engine.close()
        fallback.close()


def test_weights_encrypted_at_rest_load_in_memory(settings, sources, generator):
    MasterKeyring.create(settings.home.parent / "master.keys")
    sealed_settings = Settings(
        home=settings.home.parent / "sealed",
        encryption_key_file=settings.home.parent / "master.keys",
    )
    sealed = open_registry(sealed_settings)
    try:
        record = sealed.import_model(sources / "gpt2", "gpt")
        version = sealed.open_version(record.reference)
        assert version.data_keys
        from_sealed = start(version)
        try:
            assert tokens_of(run(from_sealed, PROMPT, GREEDY)) == tokens_of(
                run(generator, PROMPT, GREEDY)
            )
        finally:
            from_sealed.close()
    finally:
        sealed.close()


def test_which_models_run_on_maas_engine(registry, sources, tmp_path):
    for name, on_engine in (("llama", True), ("gpt2", False)):
        record = registry.import_model(sources / name, name)
        assert runs_on_engine(registry.read_manifest(record)) is on_engine
    llama_gguf = registry.import_model(make_gguf(tmp_path / "llama.gguf"), "llama-gguf")
    assert runs_on_engine(registry.read_manifest(llama_gguf))
    other = registry.import_model(make_gguf(tmp_path / "phi.gguf", arch="phi2"), "phi-gguf")
    with pytest.raises(UnsupportedFormat, match="Hugging Face folder"):
        runs_on_engine(registry.read_manifest(other))


def test_a_gpt2_folder_imports_and_serves_completions(settings, sources):
    with TestClient(build_app(settings)) as client:
        client.headers["Authorization"] = (
            f"Bearer {ensure_admin_key(settings, client.app.state.keys)}"
        )
        registry = client.app.state.registry
        record = registry.import_model(sources / "gpt2", "gpt")
        assert (record.task, record.runtime) == ("text-generation", "transformers")
        with pytest.raises(InvalidRequest, match="no chat template"):
            registry.import_model(sources / "gpt2", "gpt-chat", task="chat")
        chat_record = registry.import_model(sources / "gpt2-chat", "gpt-chat")
        assert chat_record.task == "chat"

        body = {"model": "gpt", "prompt": PROMPT, "max_tokens": 6, "temperature": 0}
        response = client.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        [choice] = response.json()["choices"]
        assert choice["text"] == greedy_text(sources / "gpt2", PROMPT, 6)

        messages = [{"role": "user", "content": "hello"}]
        refused = client.post("/v1/chat/completions", json={"model": "gpt", "messages": messages})
        assert refused.status_code == 400 and "chat template" in refused.text
        chat = client.post(
            "/v1/chat/completions",
            json={"model": "gpt-chat", "messages": messages, "max_tokens": 4},
        )
        assert chat.status_code == 200, chat.text
        too_long = client.post("/v1/completions", json={**body, "prompt": "the cat " * 100})
        assert too_long.status_code == 400 and "128 tokens" in too_long.text


def test_bfloat16_weights_generate(gpt2):
    generator = start(gpt2, dtype="bfloat16")
    try:
        deltas = run(generator, PROMPT, replace(GREEDY, max_tokens=5))
    finally:
        generator.close()
    assert generator.model.model.dtype == torch.bfloat16
    assert len(tokens_of(deltas)) == 5 and deltas[-1].finish_reason == "length"
