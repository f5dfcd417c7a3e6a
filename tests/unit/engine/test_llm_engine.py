"""The LLM engine driven step by step: continuous batching, chunked prefill, paged KV blocks,
preemption, aborts, deadlines and prefix caching never change what a request generates."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaForCausalLM

import maas.engine.llm_engine as llm_engine
from maas.engine.kv_cache import BlockPool, extend_names
from maas.engine.scheduler import Plan
from maas.messages import MODEL_UNLOADED, EngineRequest, FailureKind
from tests.fixtures import CORPUS
from tests.unit.engine.conftest import (
    finish_reason,
    generate_alone,
    greedy,
    run_to_end,
    submit,
    token_ids,
)

TEXTS = [
    "the cat sat on the mat",
    "paris is the capital of france and berlin",
    "hello world, how are you today?",
    "numbers like 12345 and words",
]


@pytest.fixture(scope="module")
def prompts(llama_tokenizer) -> list[list[int]]:
    """Four different prompts of different lengths."""
    encoded = [llama_tokenizer.encode(text) for text in TEXTS]
    assert len({len(p) for p in encoded}) == len(encoded)
    return encoded


@pytest.fixture(scope="module")
def long_prompt(llama_tokenizer) -> list[int]:
    ids = llama_tokenizer.encode(" ".join(CORPUS[:4]))
    assert len(ids) >= 50
    return ids[:50]


def alone_ids(make_engine, prompt, params, **options) -> list[int]:
    return token_ids(generate_alone(make_engine, prompt, params, **options))


def spy_on_admissions(engine, monkeypatch) -> list[tuple[str, int, list[int]]]:
    """(request, tokens found in the prefix cache, blocks shared) of each admission."""
    admissions: list[tuple[str, int, list[int]]] = []
    admit = engine.scheduler._admit

    def recording(sequence):
        admitted = admit(sequence)
        if admitted:
            admissions.append((sequence.request_id, sequence.computed, list(sequence.blocks)))
        return admitted

    monkeypatch.setattr(engine.scheduler, "_admit", recording)
    return admissions


def spy_on_plans(engine, monkeypatch) -> list[Plan]:
    plans: list[Plan] = []
    schedule = engine.scheduler.schedule

    def recording(max_rows=None) -> Plan:
        plans.append(schedule(max_rows))
        return plans[-1]

    monkeypatch.setattr(engine.scheduler, "schedule", recording)
    return plans


def test_greedy_tokens_equal_transformers_greedy_decoding(make_engine, llama_version, prompts):
    ours = alone_ids(make_engine, prompts[0], greedy(12))
    model = LlamaForCausalLM.from_pretrained(llama_version.folder, dtype=torch.float32).eval()
    ids = list(prompts[0])
    with torch.no_grad():
        for _ in range(12):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert ours == ids[len(prompts[0]) :]


def test_greedy_tokens_do_not_depend_on_the_rest_of_the_batch(make_engine, prompts):
    alone = [alone_ids(make_engine, p, greedy(24)) for p in prompts]
    engine = make_engine(max_sequences=4)
    outputs = [submit(engine, f"r{i}", p, greedy(24)) for i, p in enumerate(prompts)]
    engine.step()
    assert len(engine.scheduler.running) == 4  # one batch: every prompt prefilled together
    run_to_end(engine)
    assert [token_ids(d) for d in outputs] == alone
    assert all(len(ids) == 24 for ids in alone)
    assert len({tuple(ids) for ids in alone}) == 4  # different prompts, different outputs


def test_requests_join_and_leave_the_batch_without_changing_their_tokens(make_engine, prompts):
    engine = make_engine()
    first = submit(engine, "first", prompts[0], greedy(30))
    for _ in range(5):
        engine.step()
    second = submit(engine, "second", prompts[1], greedy(6))
    for _ in range(2):
        engine.step()
    third = submit(engine, "third", prompts[2], greedy(20))
    engine.step()
    assert len(engine.scheduler.running) == 3
    assert 0 < len(token_ids(first)) < 30 and 0 < len(token_ids(second)) < 6
    while finish_reason(second) is None:
        engine.step()
    # the short one has left; the others are still mid-generation
    assert len(engine.scheduler.running) == 2
    assert finish_reason(first) is None and finish_reason(third) is None
    run_to_end(engine)
    assert token_ids(first) == alone_ids(make_engine, prompts[0], greedy(30))
    assert token_ids(second) == alone_ids(make_engine, prompts[1], greedy(6))
    assert token_ids(third) == alone_ids(make_engine, prompts[2], greedy(20))


def test_a_long_prompt_is_prefilled_in_chunks_while_others_keep_decoding(
    make_engine, prompts, long_prompt, monkeypatch
):
    engine = make_engine(max_batch_tokens=16)
    plans = spy_on_plans(engine, monkeypatch)
    short = submit(engine, "short", prompts[0], greedy(20))
    engine.step()
    assert len(token_ids(short)) == 1  # decoding now
    long = submit(engine, "long", long_prompt, greedy(10))
    [long_sequence] = engine.scheduler.waiting
    prefill_steps = 0
    while not long:
        before = len(token_ids(short))
        engine.step()
        prefill_steps += 1
        assert len(token_ids(short)) == before + 1, "decoding stalled during the long prefill"
    # one token of every step goes to the decoding sequence: 15 + 15 + 15 + 5 prompt tokens
    assert prefill_steps == 4
    run_to_end(engine)
    for plan in plans:
        assert len(plan.decode) + sum(end - start for _, start, end in plan.prefill) <= 16
    chunks = [
        (start, end) for plan in plans for s, start, end in plan.prefill if s is long_sequence
    ]
    assert chunks == [(0, 15), (15, 30), (30, 45), (45, 50)]
    one_pass = alone_ids(make_engine, long_prompt, greedy(10), max_batch_tokens=512)
    assert token_ids(long) == one_pass
    assert token_ids(short) == alone_ids(make_engine, prompts[0], greedy(20))


def test_requests_beyond_the_slots_wait_and_then_run_as_if_alone(make_engine, prompts, long_prompt):
    engine = make_engine(max_sequences=2)
    everyone = [*prompts, long_prompt[:30]]
    lengths = [12, 4, 9, 6, 7]
    outputs = [
        submit(engine, f"r{i}", p, greedy(n))
        for i, (p, n) in enumerate(zip(everyone, lengths, strict=True))
    ]
    engine.step()
    assert (len(engine.scheduler.running), len(engine.scheduler.waiting)) == (2, 3)
    assert [len(d) for d in outputs] == [1, 1, 0, 0, 0]
    while engine.has_work():
        engine.step()
        assert len(engine.scheduler.running) <= 2
    for deltas, prompt, n in zip(outputs, everyone, lengths, strict=True):
        assert all(d.error is None for d in deltas)
        assert finish_reason(deltas) == "length"
        assert token_ids(deltas) == alone_ids(make_engine, prompt, greedy(n))


def test_abort_frees_the_slot_for_the_next_waiting_request(make_engine, prompts):
    engine = make_engine(max_sequences=1)
    running = submit(engine, "running", prompts[0], greedy(100))
    waiting = submit(engine, "waiting", prompts[1], greedy(5))
    for _ in range(3):
        engine.step()
    assert len(token_ids(running)) == 3 and not waiting
    assert len(engine.scheduler.waiting) == 1
    engine.abort("running")
    engine.step()
    assert [s.request_id for s in engine.scheduler.running] == ["waiting"]
    assert len(token_ids(waiting)) == 1
    run_to_end(engine)
    assert len(token_ids(running)) == 3  # nothing more after the abort
    assert token_ids(waiting) == alone_ids(make_engine, prompts[1], greedy(5))


def test_warm_up_runs_the_model_and_leaves_the_engine_as_it_found_it(
    make_engine, prompts, monkeypatch
):
    engine = make_engine(max_sequences=2)
    forwards = []
    forward = engine.runner.forward
    monkeypatch.setattr(engine.runner, "forward", lambda step: forwards.append(1) or forward(step))
    observer = SimpleNamespace(
        on_step=lambda e: pytest.fail("warm-up observed"),
        on_token=lambda s: pytest.fail("warm-up observed"),
        on_finish=lambda s: pytest.fail("warm-up observed"),
    )
    engine.observer = observer
    engine.warm_up()
    assert len(forwards) >= 2  # a prefill and at least one decode step
    assert engine.observer is observer and not engine.has_work()
    pool = engine.scheduler.pool
    assert pool.free_blocks == pool.num_blocks and (pool.queries, pool.hits) == (0, 0)
    engine.observer = None
    deltas = submit(engine, "r", prompts[0], greedy(8))
    run_to_end(engine)
    assert token_ids(deltas) == alone_ids(make_engine, prompts[0], greedy(8))


def test_a_request_that_cannot_start_fails_alone(make_engine, prompts, monkeypatch):
    engine = make_engine()
    running = submit(engine, "running", prompts[0], greedy(6))
    engine.step()
    real = llm_engine.Sequence

    def broken(request_id, *args, **kwargs):
        if request_id == "broken":
            raise ValueError("cannot build this sequence")
        return real(request_id, *args, **kwargs)

    monkeypatch.setattr(llm_engine, "Sequence", broken)
    failed = submit(engine, "broken", prompts[1], greedy(6), n=2)
    assert [(d.index, d.finish_reason) for d in failed] == [(0, "abort"), (1, "abort")]
    assert all(d.error for d in failed)
    run_to_end(engine)
    assert token_ids(running) == alone_ids(make_engine, prompts[0], greedy(6))


def test_abort_with_a_reason_tells_the_caller(make_engine, prompts):
    engine = make_engine()
    deltas = submit(engine, "r", prompts[0], greedy(50), n=2)
    engine.step()
    engine.abort("r", MODEL_UNLOADED)
    assert [(d.index, d.finish_reason, d.error, d.error_kind) for d in deltas[-2:]] == [
        (0, "abort", MODEL_UNLOADED.message, FailureKind.UNAVAILABLE),
        (1, "abort", MODEL_UNLOADED.message, FailureKind.UNAVAILABLE),
    ]
    assert not engine.has_work()


@pytest.fixture
def clock(monkeypatch) -> list[float]:
    """The engine's clock, set by the test."""
    now = [1000.0]
    monkeypatch.setattr(llm_engine, "time", SimpleNamespace(monotonic=lambda: now[0]))
    return now


def test_a_request_past_its_deadline_ends_with_an_error_before_running(make_engine, prompts, clock):
    engine = make_engine()
    deltas = submit(engine, "late", prompts[0], greedy(10), deadline=clock[0] - 1)
    engine.step()
    [delta] = deltas
    assert (delta.finish_reason, delta.token_ids) == ("abort", ())
    assert "deadline" in delta.error
    assert not engine.has_work() and engine.scheduler.pool.usage == 0


def test_a_deadline_stops_a_running_request_and_spares_the_others(make_engine, prompts, clock):
    engine = make_engine()
    timed = submit(engine, "timed", prompts[0], greedy(50), n=2, deadline=clock[0] + 5)
    other = submit(engine, "other", prompts[1], greedy(12))
    for _ in range(4):
        engine.step()
    clock[0] += 10
    engine.step()
    ends = [d for d in timed if d.finish_reason is not None]
    assert sorted(d.index for d in ends) == [0, 1]
    assert all(d.finish_reason == "abort" and "deadline" in d.error for d in ends)
    assert all(d.completion_tokens == 4 for d in ends)
    assert [s.request_id for s in engine.scheduler.running] == ["other"]
    run_to_end(engine)
    assert token_ids(other) == alone_ids(make_engine, prompts[1], greedy(12))


def test_a_prompt_sharing_a_prefix_with_a_finished_one_reuses_its_blocks(
    make_engine, long_prompt, prompts, monkeypatch
):
    shared = long_prompt[:40]  # two full blocks of 16, and 8 tokens more
    first_prompt, second_prompt = shared + prompts[0], shared + prompts[1]
    engine = make_engine()
    admissions = spy_on_admissions(engine, monkeypatch)
    first = submit(engine, "first", first_prompt, greedy(8))
    run_to_end(engine)
    second = submit(engine, "second", second_prompt, greedy(8))
    run_to_end(engine)
    again = submit(engine, "again", second_prompt, greedy(8))
    run_to_end(engine)
    whole = (len(second_prompt) - 1) // 16 * 16  # all full blocks but the last token's
    assert [cached for _, cached, _ in admissions] == [0, 32, whole]
    assert admissions[1][2] == [1, 2]  # first's blocks (the pool's lowest), not copies
    assert admissions[2][2][:2] == [1, 2]
    pool = engine.scheduler.pool
    queried = len(first_prompt) + 2 * len(second_prompt)
    assert (pool.queries, pool.hits) == (queried, 32 + whole)
    assert token_ids(first) == alone_ids(make_engine, first_prompt, greedy(8))
    expected = alone_ids(make_engine, second_prompt, greedy(8))
    assert token_ids(second) == expected and token_ids(again) == expected


def test_a_prefix_is_shared_with_a_running_sequence(make_engine, long_prompt, prompts, monkeypatch):
    shared = long_prompt[:40]
    first_prompt, second_prompt = shared + prompts[0], shared + prompts[1]
    engine = make_engine()
    admissions = spy_on_admissions(engine, monkeypatch)
    first = submit(engine, "first", first_prompt, greedy(20))
    for _ in range(3):
        engine.step()
    second = submit(engine, "second", second_prompt, greedy(8))
    engine.step()
    running = {s.request_id: s for s in engine.scheduler.running}
    assert admissions[1][1] == 32
    assert running["second"].blocks[:2] == running["first"].blocks[:2]
    run_to_end(engine)
    assert token_ids(first) == alone_ids(make_engine, first_prompt, greedy(20))
    assert token_ids(second) == alone_ids(make_engine, second_prompt, greedy(8))


def test_the_prefix_cache_is_not_shared_across_salts(make_engine, long_prompt, monkeypatch):
    engine = make_engine()
    admissions = spy_on_admissions(engine, monkeypatch)
    for request_id, salt in (("a", "tenant-a"), ("b", "tenant-b"), ("a2", "tenant-a")):
        request = EngineRequest(request_id, tuple(long_prompt), greedy(2), cache_salt=salt)
        engine.add_request(request, lambda _: None)
        run_to_end(engine)
    assert [cached for _, cached, _ in admissions] == [0, 0, 48]


def test_when_blocks_run_out_the_newest_sequence_is_preempted_and_recomputed(
    make_engine, prompts, long_prompt
):
    # 10 blocks of 16 positions: the four sequences below need 16 blocks at their longest
    engine = make_engine(max_sequences=4, kv_cache_blocks=10)
    everyone = [long_prompt[:30], prompts[1], prompts[2], prompts[3]]
    lengths = [40, 30, 24, 20]
    outputs = [
        submit(engine, f"r{i}", p, greedy(n))
        for i, (p, n) in enumerate(zip(everyone, lengths, strict=True))
    ]
    preempted = []
    while engine.has_work():
        before = engine.scheduler.preemptions
        engine.step()
        if engine.scheduler.preemptions > before:
            preempted.append([s.request_id for s in engine.scheduler.waiting])
        assert engine.scheduler.pool.free_blocks >= 0
    assert engine.scheduler.preemptions > 0
    assert all(ids[0] != "r0" for ids in preempted)  # the oldest is never the one to go
    for deltas, prompt, n in zip(outputs, everyone, lengths, strict=True):
        assert all(d.error is None for d in deltas)
        assert finish_reason(deltas) == "length"
        assert token_ids(deltas) == alone_ids(make_engine, prompt, greedy(n))


def test_a_sequence_alone_can_use_the_whole_cache(make_engine, long_prompt):
    engine = make_engine(max_sequences=2, kv_cache_blocks=4, max_model_len=128)
    assert engine.runner.max_len == 64  # capped by the cache, not the 128 asked for
    deltas = submit(engine, "r", long_prompt[:20], greedy(100))
    run_to_end(engine)
    assert finish_reason(deltas) == "length" and len(token_ids(deltas)) == 64 - 20


def test_block_pool_hands_out_low_blocks_and_never_the_null_block():
    pool = BlockPool(num_blocks=3, block_size=4)
    taken = [pool.allocate() for _ in range(3)]
    assert taken == [1, 2, 3] and pool.allocate() is None and pool.usage == 1
    pool.release([2])
    assert pool.allocate() == 2
    pool.release(taken)
    assert pool.free_blocks == 3 and pool.usage == 0


def test_block_pool_keeps_named_blocks_until_their_memory_is_needed():
    pool = BlockPool(num_blocks=3, block_size=2)
    tokens = [5, 6, 7, 8, 9]
    names: list[bytes] = []
    extend_names(names, tokens, 2, salt="")
    assert len(names) == 2  # full blocks only
    first, second = pool.allocate(), pool.allocate()
    pool.name(first, names[0])
    pool.name(second, names[1])
    pool.release([first, second])
    assert pool.free_blocks == 3
    assert pool.cached_prefix(names) == [first, second]
    pool.count_lookup(len(tokens), 2)
    assert (pool.queries, pool.hits) == (5, 4)
    pool.release([first, second])
    # the unnamed block goes first, then the tail of the released table before its head
    assert [pool.allocate() for _ in range(3)] == [3, second, first]
    assert pool.cached_prefix(names) == []


def test_block_names_chain_the_whole_prefix_and_the_salt():
    def names(tokens, salt=""):
        out: list[bytes] = []
        extend_names(out, tokens, 2, salt)
        return out

    assert names([1, 2, 3, 4])[0] == names([1, 2, 9, 9])[0]
    assert names([1, 2, 3, 4])[1] != names([0, 2, 3, 4])[1]  # same block, other prefix
    assert names([1, 2], "a") != names([1, 2], "b")
    grown = names([1, 2])
    extend_names(grown, [1, 2, 3, 4], 2, "")
    assert grown == names([1, 2, 3, 4])
