"""The generation engine: ``add_request``, ``step``, ``abort`` and nothing clever around them.

``step`` is schedule -> run -> postprocess: the scheduler picks the tokens of this step, the
runner computes their logits in one forward pass, the sampler picks a next token for every
sequence that needs one, and each sequence's new text goes to its sink.

A pipeline's runner (maas.distributed.pipeline) takes ``depth`` steps at once: then ``step``
submits micro-batches of disjoint sequences until that many are in flight, and postprocesses
the oldest when no more can start, so that every stage has work.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from maas.engine.detokenizer import Detokenizer
from maas.engine.kv_cache import NULL_BLOCK, BlockPool
from maas.engine.scheduler import Plan, Scheduler
from maas.engine.sequence import Sequence, Status, fail_unstarted
from maas.engine.speculation import SpeculationCounts, round_tokens, speculate
from maas.messages import (
    DEADLINE_PASSED,
    EngineRequest,
    Failure,
    GenerationDelta,
    SamplingParams,
)
from maas.runtime.llm.compiled import MIN_BLOCKS
from maas.runtime.llm.model import DecodeRows, PrefillRows, StepInput
from maas.runtime.llm.runner import ModelRunner
from maas.runtime.llm.sampler import sample

log = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, runner: ModelRunner, *, max_batch_tokens: int, observer=None) -> None:
        self.runner = runner
        self.tokenizer = runner.tokenizer
        cache = runner.cache
        self.block_size = cache.block_size
        self.scheduler = Scheduler(
            BlockPool(cache.num_blocks, cache.block_size), runner.max_sequences, max_batch_tokens
        )
        self.observer = observer
        """Gets on_step(engine), on_token(sequence), on_finish(sequence) for metrics."""
        self._sequences: dict[str, list[Sequence]] = {}
        self._in_flight: deque[Flight] = deque()
        self.speculation = SpeculationCounts()

    def add_request(self, request: EngineRequest, sink: Callable[[GenerationDelta], None]) -> None:
        """Queue a request; ``sink`` gets its deltas (called from the engine's thread). One
        that cannot even start ends at once with an error delta per sequence, and the engine
        carries on."""
        try:
            self._add(request, sink)
        except Exception:
            log.exception("request %s could not start", request.request_id)
            fail_unstarted(sink, request.n, len(request.prompt_ids))

    def _add(self, request: EngineRequest, sink: Callable[[GenerationDelta], None]) -> None:
        sequences = [
            Sequence(
                request.request_id,
                index,
                list(request.prompt_ids),
                request.params,
                sink,
                Detokenizer(self.tokenizer, request.params.stop),
                deadline=request.deadline,
                salt=request.cache_salt,
            )
            for index in range(request.n)
        ]
        self._sequences[request.request_id] = sequences
        for sequence in sequences:
            self.scheduler.add(sequence)

    def abort(self, request_id: str, failure: Failure | None = None) -> None:
        """Stop a request's sequences and free their slots at once; with a ``failure``, each
        sequence ends with an error delta."""
        for sequence in self._sequences.pop(request_id, []):
            if sequence.status is not Status.FINISHED:
                self.scheduler.finish(sequence)
                if failure:
                    sequence.fail(failure)
                sequence.status = Status.FINISHED

    def has_work(self) -> bool:
        return bool(self.scheduler.running or self.scheduler.waiting or self._in_flight)

    def step(self) -> None:
        self._expire()
        if len(self._in_flight) < self.runner.depth:
            plan = self.scheduler.schedule(self._micro_batch_rows())
            if self.observer:
                self.observer.on_step(self)
            if self._speculated(plan):
                return
            if not plan.empty:
                self._submit(plan)
                if len(self._in_flight) < self.runner.depth:
                    return  # room for another micro-batch before waiting on this one
        if self._in_flight:
            self._postprocess(self._in_flight.popleft())
            if self.observer:
                self.observer.on_step(self)

    def _speculated(self, plan: Plan) -> bool:
        """Run ``plan`` as a round of speculative decoding (speculation.py) if the runner has
        a draft model and the plan is one greedy sequence's decode step; False if it is not,
        or no round can run (then the plan runs as a normal step)."""
        if self.runner.draft is None or plan.prefill or len(plan.decode) != 1:
            return False
        sequence = plan.decode[0]
        if self._in_flight or not sequence.params.greedy:
            return False
        count = round_tokens(self, sequence)
        if count == 0:
            return False
        if not speculate(self, sequence, count):
            return False
        if self.observer:
            self.observer.on_step(self)
        return True

    def _micro_batch_rows(self) -> int | None:
        """A pipeline's micro-batch: its share of the sequences that can run (all of them
        without a pipeline), so that each of the ``depth`` steps in flight has some."""
        depth = self.runner.depth
        if depth == 1:
            return None
        scheduler = self.scheduler
        live = min(len(scheduler.running) + len(scheduler.waiting), scheduler.max_sequences)
        return max(1, -(-live // depth))

    def _submit(self, plan: Plan) -> None:
        step_input, sampling = self._inputs(plan)
        pending = self.runner.submit(step_input)
        for sequence in plan.sequences:
            sequence.busy = True
        self._in_flight.append(Flight(plan, sampling, pending))

    def _postprocess(self, flight: Flight) -> None:
        logits = self.runner.result(flight.pending)
        plan = flight.plan
        for sequence in plan.sequences:
            sequence.busy = False
        for sequence, _, end in plan.prefill:
            if sequence.status is not Status.FINISHED:  # else aborted while in flight
                sequence.computed = end
                self.scheduler.computed(sequence)
        for sequence in plan.decode:
            if sequence.status is not Status.FINISHED:
                sequence.computed += 1
                self.scheduler.computed(sequence)
        live = [i for i, s in enumerate(flight.sampling) if s.status is not Status.FINISHED]
        if len(live) < len(flight.sampling):
            logits = logits[live]
        sampling = [flight.sampling[i] for i in live]
        rows = [s.sample_row(self.tokenizer.eos_token_ids) for s in sampling]
        for sequence, picked in zip(sampling, sample(logits, rows), strict=True):
            self.advance(sequence, picked)

    def _inputs(self, plan: Plan) -> tuple[StepInput, list[Sequence]]:
        size = self.block_size
        ids, positions, index, sampling, logits_rows = [], [], [], [], []
        for sequence in plan.decode:
            position = sequence.computed
            ids.append(sequence.output_ids[-1])
            positions.append(position)
            index.append(sequence.blocks[position // size] * size + position % size)
            logits_rows.append(len(ids) - 1)
            sampling.append(sequence)
        decode = None
        if plan.decode:
            # padded to MIN_BLOCKS wide: a one-block table would make inductor compile anew
            width = max(MIN_BLOCKS, max(len(s.blocks) for s in plan.decode))
            tables = [s.blocks + [NULL_BLOCK] * (width - len(s.blocks)) for s in plan.decode]
            lengths = [s.computed + 1 for s in plan.decode]
            decode = DecodeRows(len(plan.decode), torch.tensor(tables), torch.tensor(lengths))
        prefills = []
        for sequence, start, end in plan.prefill:
            first = len(ids)
            tokens = sequence.tokens
            ids.extend(tokens[start:end])
            positions.extend(range(start, end))
            blocks = sequence.blocks
            index.extend(blocks[p // size] * size + p % size for p in range(start, end))
            prefills.append(PrefillRows(first, len(ids), torch.tensor(blocks), start))
            if end == len(tokens):  # all it holds is computed: pick its next token
                logits_rows.append(len(ids) - 1)
                sampling.append(sequence)
        step_input = StepInput(
            torch.tensor(ids),
            torch.tensor(positions),
            torch.tensor(index),
            decode,
            prefills,
            torch.tensor(logits_rows, dtype=torch.long),
        )
        return step_input, sampling

    def advance(self, sequence: Sequence, picked) -> None:
        """Give ``sequence`` its next token, and finish it if that ends it."""
        sequence.status = Status.DECODE
        sequence.append(picked, self.tokenizer.eos_token_ids, self.runner.max_len)
        if self.observer:
            self.observer.on_token(sequence)
        if sequence.finish_reason is not None:
            self._finish(sequence)

    def _finish(self, sequence: Sequence) -> None:
        sequence.status = Status.FINISHED
        self.scheduler.finish(sequence)
        if self.observer:
            self.observer.on_finish(sequence)
        siblings = self._sequences.get(sequence.request_id, [])
        if all(s.status is Status.FINISHED for s in siblings):
            self._sequences.pop(sequence.request_id, None)

    def _expire(self) -> None:
        now = time.monotonic()
        for request_id, sequences in list(self._sequences.items()):
            deadline = sequences[0].deadline
            if deadline is not None and now > deadline:
                self.abort(request_id, DEADLINE_PASSED)

    def warm_up(self, prompt_len: int = 16, max_tokens: int = 4) -> None:
        """Run one short generation, unobserved, before serving: the first pass through the
        CPU kernels (oneDNN and MKL set up their primitives) is slower, and would fall on the
        first user's time to first token (on the demo model in int8, 100 ms instead of 54).
        Its blocks are named under a salt of its own and the cache and speculation counters
        are restored."""
        observer, self.observer = self.observer, None
        pool = self.scheduler.pool
        counters = pool.queries, pool.hits
        speculation, self.speculation = self.speculation, SpeculationCounts()
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        prompt = tuple(range(min(prompt_len, self.runner.max_len - max_tokens)))
        request = EngineRequest("warm-up", prompt, params, cache_salt="maas:warm-up")
        try:
            self.add_request(request, lambda _: None)
            for _ in range((prompt_len + max_tokens + 1) * self.runner.depth):
                if not self.has_work():
                    break
                self.step()
        finally:
            self.abort("warm-up")
            self.observer = observer
            pool.queries, pool.hits = counters
            self.speculation = speculation

    def fail_all(self, failure: Failure) -> None:
        """End every request with ``failure``; steps in flight are forgotten (after a failed
        step their results cannot be trusted)."""
        for flight in self._in_flight:
            for sequence in flight.plan.sequences:
                sequence.busy = False
        self._in_flight.clear()
        for request_id in list(self._sequences):
            self.abort(request_id, failure)


@dataclass
class Flight:
    """A submitted step: what was scheduled, who samples, and the runner's handle."""

    plan: Plan
    sampling: list[Sequence]
    pending: Any
