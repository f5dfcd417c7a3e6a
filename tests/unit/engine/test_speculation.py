"""Speculative decoding: a draft model's proposals, checked by the served model in one step,
change how many steps a greedy sequence takes and never which tokens it gets."""

from __future__ import annotations

import pytest
import torch

from maas.engine import speculation
from maas.messages import SamplingParams
from maas.runtime.llm import compiled
from maas.runtime.llm import runner as runner_module
from maas.runtime.llm.draft import DraftModel
from maas.runtime.llm.kernels import Int8Linear
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
]


@pytest.fixture(scope="module")
def prompts(llama_tokenizer) -> list[list[int]]:
    return [llama_tokenizer.encode(text) for text in TEXTS]


def without_draft(make_engine, prompt, params) -> list[int]:
    return token_ids(generate_alone(make_engine, prompt, params))


@pytest.mark.parametrize("draft", ["int8", "int8-weight", "bfloat16"])
def test_a_drafted_sequence_gets_the_tokens_it_gets_without_a_draft(make_engine, prompts, draft):
    for prompt in prompts:
        expected = without_draft(make_engine, prompt, greedy(37))
        engine = make_engine(draft=draft)
        deltas = submit(engine, "r", prompt, greedy(37))
        steps = run_to_end(engine)
        assert token_ids(deltas) == expected
        assert finish_reason(deltas) == "length"
        counts = engine.speculation
        assert counts.drafts > 0 and counts.accepted_tokens > 0
        assert (
            counts.draft_tokens
            <= engine.runner.speculative_tokens * counts.drafts
            == 8 * counts.drafts
        )
        # one step for the prompt, then a round per 1 to 9 tokens
        assert steps < 37 - counts.accepted_tokens + 2


def test_each_pick_is_the_served_models_whatever_the_draft_proposes(
    make_engine, prompts, monkeypatch
):
    """A draft that is always right (proposing four) takes five tokens a round; one that is
    always wrong still yields one token a round, and the same tokens."""
    prompt = prompts[1]
    expected = without_draft(make_engine, prompt, greedy(21))
    full = list(prompt) + expected

    def oracle(self, tokens, count):
        return full[len(tokens) : len(tokens) + count]

    def wrong(self, tokens, count):
        return [(t + 1) % 50 for t in full[len(tokens) : len(tokens) + count]]

    for propose, rounds, accepted in ((oracle, 4, 16), (wrong, 19, 0)):
        monkeypatch.setattr(DraftModel, "propose", propose)
        engine = make_engine(draft="int8", speculative_tokens=4)
        deltas = submit(engine, "r", prompt, greedy(21))
        run_to_end(engine)
        assert token_ids(deltas) == expected
        # 21 tokens: the prefill's first, then rounds of 5 (oracle) or 1 (wrong); a round
        # proposes no more than max_tokens leaves room for, so the wrong draft's 21st token
        # comes from a normal step
        assert (engine.speculation.drafts, engine.speculation.accepted_tokens) == (
            rounds,
            accepted,
        )


def test_a_stop_inside_a_round_ends_the_sequence_there(make_engine, prompts, llama_tokenizer):
    prompt = prompts[0]
    reference = without_draft(make_engine, prompt, greedy(30))
    stop = reference[9]
    cut = reference.index(stop) + 1
    params = greedy(30, stop_token_ids=(stop,))
    engine = make_engine(draft="int8")
    deltas = submit(engine, "r", prompt, params)
    run_to_end(engine)
    assert token_ids(deltas) == reference[:cut]
    assert finish_reason(deltas) == "stop"
    assert deltas[-1].completion_tokens == cut
    assert not engine.scheduler.running and engine.scheduler.pool.usage == 0


def test_rounds_run_only_while_one_greedy_sequence_runs(make_engine, prompts, monkeypatch):
    running_at_rounds = []
    speculate = speculation.speculate

    def spying(engine, sequence, count):
        running_at_rounds.append(len(engine.scheduler.running))
        return speculate(engine, sequence, count)

    monkeypatch.setattr("maas.engine.llm_engine.speculate", spying)
    expected = [
        without_draft(make_engine, p, greedy(n)) for p, n in zip(prompts, (40, 8, 12), strict=True)
    ]
    engine = make_engine(draft="int8")
    first = submit(engine, "first", prompts[0], greedy(40))
    for _ in range(3):
        engine.step()
    rounds_alone = len(running_at_rounds)
    assert rounds_alone > 0
    second = submit(engine, "second", prompts[1], greedy(8))
    third = submit(engine, "third", prompts[2], greedy(12))
    run_to_end(engine)
    assert [token_ids(d) for d in (first, second, third)] == expected
    assert set(running_at_rounds) == {1}
    assert len(running_at_rounds) > rounds_alone  # alone again once the others finished


def test_a_sampled_sequence_is_not_drafted(make_engine, prompts):
    engine = make_engine(draft="int8")
    params = SamplingParams(max_tokens=12, temperature=0.8, seed=3, ignore_eos=True)
    deltas = submit(engine, "r", prompts[0], params)
    run_to_end(engine)
    assert len(token_ids(deltas)) == 12
    assert engine.speculation.drafts == 0


def test_a_round_takes_only_free_blocks_and_never_preempts(make_engine, prompts):
    """Blocks for exactly the prompt and its output: near the end a round proposes only what
    the sequence's last block holds."""
    prompt = prompts[0]
    assert len(prompt) + 40 <= 4 * 16
    expected = without_draft(make_engine, prompt, greedy(40))
    engine = make_engine(draft="int8", kv_cache_blocks=4, max_model_len=64)
    deltas = submit(engine, "r", prompt, greedy(40))
    run_to_end(engine)
    assert token_ids(deltas) == expected
    assert engine.scheduler.preemptions == 0
    assert engine.speculation.drafts > 0


def test_the_draft_keeps_what_it_computed_of_a_shared_prefix(make_engine, prompts):
    """Proposals after a prompt that shares a prefix with the last one match a fresh draft's,
    and only the rest is computed."""
    engine = make_engine(draft="int8")
    draft = engine.runner.draft
    first = prompts[1]
    draft.propose(first, 3)
    second = first[:5] + prompts[2]
    calls = []
    feed = draft._feed
    draft._feed = lambda tokens: calls.append(len(tokens)) or feed(tokens)
    proposed = draft.propose(second, 3)
    assert calls[0] == len(second) - 5  # the shared five stayed cached
    fresh = make_engine(draft="int8").runner.draft
    assert proposed == fresh.propose(second, 3)
    assert draft.fed == second + proposed[:2]


def test_a_draft_ends_its_proposal_after_a_token_it_is_unsure_of(make_engine, prompts):
    """With ``min_confidence``, a proposal is the one without it, cut after the first token
    the draft gave less probability than that (llama.cpp's --draft-p-min)."""
    draft = make_engine(draft="int8").runner.draft
    rows = []
    feed = draft._feed
    draft._feed = lambda tokens: rows.append(logits := feed(tokens)[-1].float()) or logits[None]
    full = draft.propose(prompts[0], 6)
    assert len(full) == 6
    sure = [float(torch.softmax(row, 0).max()) for row in rows]  # each pick's probability
    doubted = min(range(5), key=sure.__getitem__)
    fresh = make_engine(draft="int8", draft_min_confidence=sure[doubted] + 1e-6).runner.draft
    assert fresh.propose(prompts[0], 6) == full[: doubted + 1]
    assert (
        make_engine(draft="int8", draft_min_confidence=0.0).runner.draft.propose(prompts[0], 6)
        == full
    )


def test_an_always_unsure_draft_proposes_one_token_a_round_and_changes_nothing(
    make_engine, prompts
):
    expected = without_draft(make_engine, prompts[1], greedy(21))
    engine = make_engine(draft="int8", draft_min_confidence=1.0)
    deltas = submit(engine, "r", prompts[1], greedy(21))
    run_to_end(engine)
    assert token_ids(deltas) == expected
    counts = engine.speculation
    assert counts.drafts > 0 and counts.draft_tokens == counts.drafts  # proposals made, counted


def test_warm_up_runs_a_round_and_leaves_the_counts_at_zero(make_engine, monkeypatch):
    rounds = []
    speculate = speculation.speculate
    monkeypatch.setattr(
        "maas.engine.llm_engine.speculate",
        lambda engine, sequence, count: rounds.append(count) or speculate(engine, sequence, count),
    )
    engine = make_engine(draft="int8")
    engine.warm_up()
    assert rounds  # the draft's step ran before the first request
    assert engine.speculation == speculation.SpeculationCounts()


def test_compiled_rounds_give_the_tokens_of_compiled_steps_without_a_draft(
    make_engine, prompts, monkeypatch
):
    """Rounds run through the compiled step (its multi-row graph), the draft's steps through
    its own, and the tokens are those of the compiled model without a draft; a round is
    never wider than the compiled step's batches."""
    timed = compiled._timings
    monkeypatch.setattr(  # about tokens, not speed: keep the compiled steps however they time
        compiled, "_timings", lambda *a: tuple((n, e, min(c, e / 2)) for n, e, c in timed(*a))
    )
    expected = without_draft(make_engine, prompts[1], greedy(30))
    plain = make_engine(compile=True, max_sequences=4)
    deltas = submit(plain, "r", prompts[1], greedy(30))
    run_to_end(plain)
    assert token_ids(deltas) == expected
    engine = make_engine(compile=True, max_sequences=4, draft="int8")
    assert engine.runner.compiled.rows == 4 and engine.runner.draft.compiled is not None
    widths = []
    forward = engine.runner.forward
    engine.runner.forward = lambda step: widths.append(len(step.input_ids)) or forward(step)
    with torch.compiler.set_stance("fail_on_recompile"):
        deltas = submit(engine, "r", prompts[1], greedy(30))
        run_to_end(engine)
    assert token_ids(deltas) == expected
    assert engine.speculation.drafts > 0 and max(widths[1:]) == 4  # 3 proposals + 1


def test_a_round_proposes_no_more_than_the_context_and_the_step_budget_allow(
    make_engine, prompts, monkeypatch
):
    prompt = prompts[0]
    engine = make_engine(draft="int8", max_model_len=len(prompt) + 6, max_batch_tokens=64)
    deltas = submit(engine, "r", prompt, greedy(50))
    run_to_end(engine)
    # the context holds 6 tokens: the prefill's first, then one round of 4 proposals and
    # the served model's token, none proposed past the end
    assert len(token_ids(deltas)) == 6 and finish_reason(deltas) == "length"
    assert engine.speculation.draft_tokens == 4
    assert token_ids(deltas) == without_draft(make_engine, prompt, greedy(6))
    counts = []
    speculate = speculation.speculate
    monkeypatch.setattr(
        "maas.engine.llm_engine.speculate",
        lambda engine, sequence, count: counts.append(count) or speculate(engine, sequence, count),
    )
    tight = make_engine(draft="int8", max_batch_tokens=16, speculative_tokens=16)
    submit(tight, "r", prompt, greedy(40))
    run_to_end(tight)
    assert max(counts) == 15  # 16 rows at most, the step's token budget


def test_a_failing_draft_is_dropped_and_the_sequence_goes_on(make_engine, prompts, monkeypatch):
    def broken(self, tokens, count):
        raise RuntimeError("the draft's kernel broke")

    expected = without_draft(make_engine, prompts[0], greedy(20))
    monkeypatch.setattr(DraftModel, "propose", broken)
    engine = make_engine(draft="int8")
    deltas = submit(engine, "r", prompts[0], greedy(20))
    run_to_end(engine)
    assert token_ids(deltas) == expected and finish_reason(deltas) == "length"
    assert engine.runner.draft is None and engine.speculation.drafts == 0


def test_a_right_guess_that_ends_the_sequence_counts_as_accepted(make_engine, prompts, monkeypatch):
    prompt = prompts[1]
    expected = without_draft(make_engine, prompt, greedy(6))
    full = list(prompt) + expected
    monkeypatch.setattr(
        DraftModel, "propose", lambda self, tokens, count: full[len(tokens) : len(tokens) + count]
    )
    stop = expected[3]
    assert stop not in expected[:3]
    engine = make_engine(draft="int8")
    deltas = submit(engine, "r", prompt, greedy(6, stop_token_ids=(stop,)))
    run_to_end(engine)
    assert token_ids(deltas) == expected[:4] and finish_reason(deltas) == "stop"
    # the prefill's token, then a round of 4 proposals: the first two and the stop token
    # accepted, the sequence ending with the third
    assert (engine.speculation.drafts, engine.speculation.accepted_tokens) == (1, 3)


def test_the_draft_is_made_from_the_weights_in_memory(make_engine, monkeypatch):
    """The weights are read once; an int8 draft shares the float tensors it keeps (norms)
    with the served float32 model, and a bfloat16 one has copies of its own."""
    reads = []
    load = runner_module.load_model
    monkeypatch.setattr(
        runner_module, "load_model", lambda *a, **k: reads.append(1) or load(*a, **k)
    )
    engine = make_engine(draft="int8")
    assert len(reads) == 1
    served, draft = engine.runner.model, engine.runner.draft.model
    assert draft.blocks[0].input_norm.weight is served.blocks[0].input_norm.weight
    assert isinstance(draft.blocks[0].qkv, Int8Linear)
    assert served.blocks[0].qkv.weight.dtype == torch.float32
    assert served.embed.weight.dtype == torch.float32  # its own, the draft's is the int8 head
    halved = make_engine(draft="bfloat16").runner
    assert halved.draft.model.blocks[0].input_norm.weight.dtype == torch.bfloat16
    assert halved.model.blocks[0].input_norm.weight.dtype == torch.float32
