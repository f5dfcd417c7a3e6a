"""Steps in flight, as a pipeline runs them: the engine keeps ``depth`` micro-batches of
disjoint sequences going and gives every request the tokens it gets alone, through waiting,
aborts and preemption. The runner here delays each step's result the way a pipeline's does
(maas.distributed.pipeline, whose processes tests/integration/distributed drive), and the
wire format of a step is checked on its own."""

from __future__ import annotations

import pytest
import torch

from maas.distributed.pipeline import decode_step, encode_step
from maas.runtime.llm.model import DecodeRows, PrefillRows, StepInput
from tests.unit.engine.conftest import finish_reason, generate_alone, greedy, submit, token_ids
from tests.unit.engine.test_llm_engine import TEXTS

pytestmark = pytest.mark.timeout(120)


class Delayed:
    """A runner whose results come ``depth`` submissions late at most, computed at submit
    (what a pipeline returns is the same logits, later)."""

    def __init__(self, runner, depth: int) -> None:
        self._runner = runner
        self.depth = depth
        self.in_flight = 0
        self.most_in_flight = 0
        self.batches: list[set[int]] = []
        """The sequences (by id) of each submitted step."""
        self.overlaps = 0
        """Submissions that shared a sequence with a step still in flight."""
        self._flying: list[set[int]] = []

    def __getattr__(self, name):
        return getattr(self._runner, name)

    def submit(self, step: StepInput):
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        return self._runner.forward(step)

    def result(self, pending):
        self.in_flight -= 1
        return pending


def pipelined(make_engine, depth=2, **options):
    engine = make_engine(**options)
    engine.runner = Delayed(engine.runner, depth)
    engine.__init__(engine.runner, max_batch_tokens=engine.scheduler.max_batch_tokens)
    return engine


@pytest.fixture(scope="module")
def prompts(llama_tokenizer) -> list[list[int]]:
    return [llama_tokenizer.encode(text) for text in TEXTS]


def test_micro_batches_are_in_flight_together_and_tokens_are_as_alone(make_engine, prompts):
    engine = pipelined(make_engine, max_sequences=4)
    seen_busy_twice = []
    original = engine._submit

    def submit_checked(plan):
        for sequence in plan.sequences:
            seen_busy_twice.append(sequence.busy)  # never scheduled while in flight
        original(plan)

    engine._submit = submit_checked
    everyone = prompts + prompts[:2]  # six requests for four slots: two wait
    outputs = [submit(engine, f"r{i}", p, greedy(12)) for i, p in enumerate(everyone)]
    steps = 0
    while engine.has_work():
        engine.step()
        steps += 1
        assert steps < 2000
    assert engine.runner.most_in_flight == 2
    assert not any(seen_busy_twice)
    for deltas, prompt in zip(outputs, everyone, strict=True):
        assert finish_reason(deltas) == "length"
        assert token_ids(deltas) == token_ids(generate_alone(make_engine, prompt, greedy(12)))


def test_a_request_aborted_in_flight_is_dropped_and_the_others_carry_on(make_engine, prompts):
    engine = pipelined(make_engine, max_sequences=4)
    kept = submit(engine, "kept", prompts[0], greedy(10))
    dropped = submit(engine, "dropped", prompts[1], greedy(30))
    for _ in range(6):
        engine.step()
    assert engine.runner.in_flight >= 1
    engine.abort("dropped")
    produced = len(token_ids(dropped))
    while engine.has_work():
        engine.step()
    assert len(token_ids(dropped)) == produced  # nothing after the abort
    assert engine.scheduler.pool.free_blocks == engine.scheduler.pool.num_blocks
    assert token_ids(kept) == token_ids(generate_alone(make_engine, prompts[0], greedy(10)))


def test_preemption_never_takes_a_sequence_in_flight(make_engine, prompts, llama_tokenizer):
    engine = pipelined(make_engine, max_sequences=4, kv_cache_blocks=6)
    lengths = [40, 30, 24, 20]
    outputs = [
        submit(engine, f"r{i}", p, greedy(n))
        for i, (p, n) in enumerate(zip(prompts, lengths, strict=True))
    ]
    preempt = engine.scheduler._preempt

    def checked(sequence):
        assert not sequence.busy, "a sequence in flight was preempted"
        preempt(sequence)

    engine.scheduler._preempt = checked
    while engine.has_work():
        engine.step()
    assert engine.scheduler.preemptions > 0
    for deltas, prompt, n in zip(outputs, prompts, lengths, strict=True):
        assert token_ids(deltas) == token_ids(generate_alone(make_engine, prompt, greedy(n)))


def test_a_step_crosses_the_wire_whole():
    step = StepInput(
        input_ids=torch.arange(7),
        positions=torch.tensor([5, 9, 0, 1, 2, 16, 17]),
        cache_index=torch.tensor([21, 41, 48, 49, 50, 80, 81]),
        decode=DecodeRows(2, torch.tensor([[1, 2], [2, 3]]), torch.tensor([6, 10])),
        prefills=[
            PrefillRows(2, 5, torch.tensor([3]), 0),
            PrefillRows(5, 7, torch.tensor([4, 5]), 16),
        ],
        logits_rows=torch.tensor([0, 1, 6]),
    )
    back = decode_step(encode_step(step))
    for name in ("positions", "cache_index", "logits_rows"):
        assert torch.equal(getattr(back, name), getattr(step, name)), name
    assert back.decode.count == 2
    assert torch.equal(back.decode.block_tables, step.decode.block_tables)
    assert torch.equal(back.decode.lengths, step.decode.lengths)
    assert [(c.start, c.end, c.past, c.blocks.tolist()) for c in back.prefills] == [
        (2, 5, 0, [3]),
        (5, 7, 16, [4, 5]),
    ]
    chunk = [PrefillRows(0, 3, torch.tensor([1]), 0)]
    prefill_only = StepInput(
        step.input_ids[:3], step.positions[:3], step.cache_index[:3], None, chunk, torch.tensor([2])
    )
    assert decode_step(encode_step(prefill_only)).decode is None
