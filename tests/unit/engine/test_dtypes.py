"""``dtype="auto"``: every candidate timed and checked against float32, the fastest that keeps
float32's choices kept, quality first when the gain is small."""

from __future__ import annotations

import itertools

import pytest
import torch

import maas.runtime.llm.dtypes as dtypes
from maas.runtime.llm import paged_attention
from maas.runtime.llm.dtypes import QUALITY_ORDER, choose, convert
from maas.runtime.llm.kernels import Int8Embedding, Int8Linear, Int8WeightOnlyLinear, weight_bytes
from maas.runtime.llm.runner import ModelRunner, RunnerOptions
from tests.unit.engine.conftest import greedy, run_to_end, submit, token_ids

QUESTION_IDS = list(range(50, 80))


class FakeTimer:
    """Every reading is ``step_ms`` of the dtype being tried later than the last, so each
    timed step takes exactly that, whatever the machine does. A trial with a bfloat16 KV
    cache is "<dtype> kv bfloat16" (as its dtype's if not given)."""

    def __init__(self, step_ms: dict[str, float]) -> None:
        self.step_ms = step_ms
        self.now = 0.0
        self.current = "float32"
        self.kv: torch.dtype | None = None

    def label(self, kv: torch.dtype | None) -> str:
        return self.current if kv is None else f"{self.current} kv {str(kv)[6:]}"

    def __call__(self) -> float:
        label = self.label(self.kv)
        self.now += self.step_ms.get(label, self.step_ms[self.current]) / 1000
        return self.now


@pytest.fixture
def float32_model(llama_version):
    from maas.runtime.llm.weights import load_model

    return load_model(llama_version, torch.float32)


def fake_timed(
    monkeypatch,
    step_ms: dict[str, float],
    agreement: dict[str, float],
    chunk_sensitive: frozenset[str] = frozenset(),
    near_tie_flippers: frozenset[str] = frozenset(),
):
    """Each dtype's timings and next-token agreement as given (keys as ``FakeTimer``'s
    labels). float32's answer to the probe question is tokens 1 to 4, sure of each but the
    first (which leads token 7 by 0.1); those in ``chunk_sensitive`` pick another third
    token, a sure one, when the question is computed in chunks; those in
    ``near_tie_flippers`` pick 7 first. Every KV cache made is recorded in ``timer.caches``."""
    timer = FakeTimer(step_ms)
    timer.caches = []
    real_convert, real_cache = dtypes.convert, dtypes._cache

    def tracking_cache(model, blocks, kv=None):
        timer.kv = kv
        timer.caches.append(kv)
        return real_cache(model, blocks, kv)

    def tracking_convert(model, dtype, *, pack):
        timer.current = dtype
        return real_convert(model, dtype, pack=pack)

    reference = torch.arange(40)

    def next_tokens(model, ids, kv=None):
        timer.caches.append(kv)
        share = agreement.get(timer.label(kv), 1.0) if model_is_candidate[0] else 1.0
        model_is_candidate[0] = True
        agreeing = int(len(reference) * share)
        return torch.cat((reference[:agreeing], reference[agreeing:] + 1))

    def answer_logits(model, ids, split, forced=None, kv=None):
        logits = torch.zeros(4, 10)
        logits[torch.arange(4), torch.tensor([1, 2, 3, 4])] = 5.0
        logits[0, 7] = 4.9
        if forced is None:  # float32's own answer
            return logits
        assert forced.tolist() == [1, 2, 3, 4]  # every candidate is fed float32's
        if timer.label(kv) in near_tie_flippers:
            logits[0, 7] = 5.1
        if split and timer.label(kv) in chunk_sensitive:
            logits[2, 9] = 6.0
        return logits

    model_is_candidate = [False]
    monkeypatch.setattr(dtypes, "convert", tracking_convert)
    monkeypatch.setattr(dtypes, "_cache", tracking_cache)
    monkeypatch.setattr(dtypes, "_next_tokens", next_tokens)
    monkeypatch.setattr(dtypes, "_answer_logits", answer_logits)
    return timer


def test_auto_keeps_the_fastest_candidate_that_meets_the_quality_bar(float32_model, monkeypatch):
    timer = fake_timed(
        monkeypatch,
        step_ms={"float32": 30, "bfloat16": 20, "int8-weight": 12, "int8": 8},
        agreement={"bfloat16": 1.0, "int8-weight": 0.95, "int8": 0.5},  # int8 fails the bar
    )
    choice = choose(float32_model, list(range(40)), QUESTION_IDS, batch=4, pack=False, timer=timer)
    assert choice.dtype == "int8-weight"
    assert [t.dtype for t in choice.trials] == list(QUALITY_ORDER)
    by_dtype = {t.dtype: t for t in choice.trials}
    assert by_dtype["bfloat16"].one_ms == pytest.approx(20)
    assert by_dtype["int8"].agreement == pytest.approx(0.5)
    assert choice.to_dict()["trials"][0]["dtype"] == "float32"
    assert next(float32_model.parameters()).dtype == torch.float32  # left as it was


def test_auto_refuses_a_dtype_whose_answer_changes_when_the_prompt_is_chunked(
    float32_model, monkeypatch
):
    timer = fake_timed(
        monkeypatch,
        step_ms={"float32": 30, "bfloat16": 10, "int8-weight": 20, "int8": 40},
        agreement={},
        chunk_sensitive=frozenset({"bfloat16"}),
    )
    choice = choose(float32_model, list(range(40)), QUESTION_IDS, batch=4, pack=False, timer=timer)
    assert choice.dtype == "int8-weight"
    assert [t.same_answer for t in choice.trials] == [True, False, True, True]


def test_auto_keeps_a_dtype_that_flips_only_a_token_float32_is_unsure_of(
    float32_model, monkeypatch
):
    timer = fake_timed(
        monkeypatch,
        step_ms={"float32": 30, "bfloat16": 20, "int8-weight": 15, "int8": 10},
        agreement={},
        near_tie_flippers=frozenset({"int8"}),
        chunk_sensitive=frozenset({"int8-weight"}),
    )
    choice = choose(float32_model, list(range(40)), QUESTION_IDS, batch=4, pack=False, timer=timer)
    assert choice.dtype == "int8"
    assert [t.same_answer for t in choice.trials] == [True, True, False, True]
    assert choice.kv_cache_dtype == torch.float32  # int8's activations': not lowered by auto


def test_auto_prefers_quality_when_a_lower_dtype_is_barely_faster(float32_model, monkeypatch):
    timer = fake_timed(
        monkeypatch,
        step_ms={"float32": 10, "bfloat16": 9.8, "int8-weight": 9.7, "int8": 9.6},
        agreement={},
    )
    assert choose(
        float32_model, list(range(40)), QUESTION_IDS, batch=4, pack=False, timer=timer
    ).dtype == ("float32")


def test_a_set_kv_cache_dtype_serves_every_candidate(float32_model, monkeypatch):
    step_ms = {"float32": 30, "bfloat16": 20, "int8-weight": 15, "int8": 10}
    timer = fake_timed(monkeypatch, step_ms=step_ms, agreement={})
    choice = choose(
        float32_model,
        list(range(40)),
        QUESTION_IDS,
        batch=4,
        pack=False,
        timer=timer,
        kv_cache="bfloat16",
    )
    assert [t.kv_cache for t in choice.trials] == ["bfloat16"] * len(QUALITY_ORDER)
    assert (choice.dtype, choice.kv_cache_dtype) == ("int8", torch.bfloat16)
    candidates = timer.caches[1:]  # after float32's own reference
    assert candidates and all(kv == torch.bfloat16 for kv in candidates)


@pytest.mark.parametrize("paged", [True, False])
def test_auto_times_each_candidate_with_the_attention_it_will_run(
    float32_model, monkeypatch, paged
):
    if paged and not paged_attention.available(torch.float32):
        pytest.skip("no C compiler to build the paged attention kernel")
    seen = []

    def step_ms(model, sequences, timer, kv=None):
        seen.append(all(block.paged is paged for block in model.blocks))
        return 10.0

    monkeypatch.setattr(dtypes, "_step_ms", step_ms)
    choose(float32_model, list(range(40)), QUESTION_IDS, batch=4, pack=False, paged=paged)
    assert seen == [True] * 2 * len(QUALITY_ORDER)  # one sequence and a batch, each dtype


def test_auto_times_real_steps_and_the_runner_serves_its_choice(
    llama_version, llama_tokenizer, monkeypatch, tmp_path
):
    monkeypatch.setenv("MAAS_CACHE_DIR", str(tmp_path))  # measured here, not kept from before
    options = RunnerOptions(dtype="auto", max_sequences=4, max_model_len=128, compile=False)
    runner = ModelRunner(llama_version, options, llama_tokenizer)
    choice = runner.dtype_choice
    assert choice is not None and runner.dtype == choice.dtype in QUALITY_ORDER
    assert runner.cache.dtype == choice.kv_cache_dtype
    assert all(t.one_ms > 0 and t.batch_ms > 0 and t.batch == 4 for t in choice.trials)
    assert next(t for t in choice.trials if t.dtype == "float32").agreement == 1.0
    expected_kernel = {"int8": Int8Linear, "int8-weight": Int8WeightOnlyLinear}.get(runner.dtype)
    if expected_kernel:
        assert isinstance(runner.model.blocks[0].qkv, expected_kernel)


def test_a_candidate_is_fed_float32s_answer_and_judged_where_float32_is_sure(float32_model):
    """On a real model: fed its own greedy answer, a model computes what it computed
    answering freely, whole or with the question's start cached; fed another answer, its
    later choices follow that text; only the sure positions count."""
    free = dtypes._answer_logits(float32_model, QUESTION_IDS, 0)
    answer = free.argmax(dim=-1)
    assert len(answer) == dtypes.ANSWER_TOKENS
    assert dtypes.greedy_answer(float32_model, QUESTION_IDS) == answer.tolist()
    fed = dtypes._answer_logits(float32_model, QUESTION_IDS, 0, answer)
    torch.testing.assert_close(fed, free)
    for split in (8, dtypes.SPLIT):  # the question's start from the cache: the same logits
        cached = dtypes._answer_logits(float32_model, QUESTION_IDS, split, answer)
        torch.testing.assert_close(cached, free, atol=1e-4, rtol=1e-4)
    other = (answer + 1) % float32_model.config.vocab_size
    steered = dtypes._answer_logits(float32_model, QUESTION_IDS, 0, other)
    torch.testing.assert_close(steered[0], free[0])  # the first token follows the question
    assert not torch.allclose(steered[1:], free[1:])
    margins = dtypes._margins(free)
    assert torch.allclose(margins, free.topk(2).values[:, 0] - free.topk(2).values[:, 1])
    flipped = free.clone()
    flipped[:, 0] = flipped.max(dim=-1).values + 1  # token 0 now leads everywhere
    none_sure = torch.zeros(len(answer), dtype=torch.bool)
    assert dtypes._keeps_sure_tokens(flipped, answer, none_sure)
    assert not dtypes._keeps_sure_tokens(flipped, answer, answer != 0)


@pytest.mark.parametrize("dtype", ["int8-weight", "bfloat16"])
def test_each_dtype_generates_close_to_float32(make_engine, llama_tokenizer, dtype):
    prompt = llama_tokenizer.encode("the quick brown fox")

    def tokens(dtype):
        engine = make_engine(dtype=dtype)
        deltas = submit(engine, "r", prompt, greedy(12))
        run_to_end(engine)
        return token_ids(deltas)

    reference, got = tokens("float32"), tokens(dtype)
    assert len(got) == len(reference) == 12
    pairs = zip(reference, got, strict=True)
    assert sum(1 for _ in itertools.takewhile(lambda pair: pair[0] == pair[1], pairs)) >= 4


def test_an_unknown_dtype_is_refused(float32_model):
    with pytest.raises(ValueError, match="unknown dtype 'int4'"):
        convert(float32_model, "int4", pack=False)


@pytest.mark.parametrize("dtype", ["int8", "int8-weight"])
def test_int8_keeps_one_int8_matrix_for_a_tied_embedding_and_head(float32_model, dtype):
    """The embedding reads the int8 head's codes: no float copy of the matrix is kept, and
    each token's row is the head's codes times its scale, the float row to within rounding."""
    float32_model.lm_head.weight = float32_model.embed.weight  # tied, as SmolLM2 is
    original = float32_model.embed.weight.detach().clone()
    before = weight_bytes(float32_model)
    model = convert(float32_model, dtype, pack=False)
    assert isinstance(model.embed, Int8Embedding)
    assert model.embed.weight.data_ptr() == model.lm_head.weight.data_ptr()
    assert not [p for p in model.parameters() if p.shape == original.shape]
    ids = torch.tensor([0, 7, 7, original.shape[0] - 1])
    rows = model.embed(ids)
    assert rows.dtype == dtypes.ACTIVATIONS[dtype] and rows.shape == (4, original.shape[1])
    head = model.lm_head  # its codes times its scales, as the head multiplies with them
    expected = (head.weight.float() * head.scale.float()[:, None])[ids]
    assert torch.allclose(rows.float(), expected, rtol=1e-2, atol=1e-6)
    # and the float rows to within int8's rounding (half a step), and bfloat16's of the
    # weights, scale and result for int8-weight (each at most half a step more)
    step = original.abs().amax(dim=1)[ids, None] / 127
    assert bool(((rows.float() - original[ids]).abs() <= 2 * step).all())
    # about a quarter of float32's bytes (with the scales): a float embedding kept beside the
    # int8 head would add 4 bytes a weight of it
    assert weight_bytes(model) < before / 4 + original.numel()


def test_an_untied_embedding_stays_as_it_is(float32_model):
    model = convert(float32_model, "int8", pack=False)
    assert isinstance(model.embed, torch.nn.Embedding)


def test_a_runner_gives_back_what_its_load_freed(make_engine, monkeypatch):
    """After the model is converted (and, with auto, every candidate measured), the memory
    that freed goes back to the system (see maas/runtime/memory.py)."""
    import maas.runtime.llm.runner as runner

    calls = []
    monkeypatch.setattr(runner, "release_freed_memory", lambda: calls.append(1) or True)
    engine = make_engine(dtype="int8")
    assert calls == [1] and engine.runner.model is not None


def test_a_set_kv_cache_dtype_holds_the_cache_and_an_unknown_one_is_refused(
    llama_version, llama_tokenizer
):
    made = {}
    for kv in ("auto", "bfloat16"):
        options = RunnerOptions(
            dtype="int8",
            max_sequences=2,
            max_model_len=64,
            kv_cache_bytes=1 << 20,
            compile=False,
            kv_cache_dtype=kv,
        )
        made[kv] = ModelRunner(llama_version, options, llama_tokenizer)
    assert made["auto"].cache.dtype == torch.float32  # int8's activations'
    assert made["bfloat16"].cache.dtype == torch.bfloat16
    assert made["bfloat16"].cache.num_blocks == 2 * made["auto"].cache.num_blocks  # one budget
    bad = RunnerOptions(dtype="int8", kv_cache_dtype="fp8")
    with pytest.raises(ValueError, match="unknown KV cache dtype 'fp8'"):
        ModelRunner(llama_version, bad, llama_tokenizer)
