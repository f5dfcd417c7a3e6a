"""Which sequences run in the next step: continuous batching with chunked prefill over a paged
KV cache, with preemption by recompute.

Every decoding sequence gets one token per step. What is left of the step's token budget goes
to prompts, in arrival order, a chunk at a time, so a long prompt never stalls everyone
else's decoding. A sequence takes KV blocks as it grows. When none is left, the newest running
sequence is preempted: its blocks go back to the pool and it waits at the head of the queue,
to be recomputed (prompt and output so far, as one prompt) once blocks free up. No request
fails for want of memory; under pressure the oldest requests finish first.

With a pipeline of stages, several steps (micro-batches) are in flight at once: a sequence in
one is ``busy``, skipped by ``schedule`` and never chosen for preemption until its step is
back, and ``max_rows`` keeps each micro-batch to its share of the running sequences.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from maas.engine.kv_cache import BlockPool, extend_names
from maas.engine.sequence import Sequence, Status


@dataclass
class Plan:
    decode: list[Sequence] = field(default_factory=list)
    prefill: list[tuple[Sequence, int, int]] = field(default_factory=list)
    """(sequence, first token position, end) of each chunk this step."""

    @property
    def empty(self) -> bool:
        return not self.decode and not self.prefill

    @property
    def sequences(self) -> list[Sequence]:
        return self.decode + [sequence for sequence, _, _ in self.prefill]


class Scheduler:
    def __init__(self, pool: BlockPool, max_sequences: int, max_batch_tokens: int) -> None:
        self.pool = pool
        self.max_sequences = max_sequences
        self.max_batch_tokens = max_batch_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        """In admission order: the newest is last, and preempted first."""
        self.preemptions = 0

    def add(self, sequence: Sequence) -> None:
        self.waiting.append(sequence)

    def schedule(self, max_rows: int | None = None) -> Plan:
        """The next step: at most ``max_rows`` sequences (all that fit by default)."""
        plan = Plan()
        budget = self.max_batch_tokens
        rows = max_rows or self.max_sequences
        index = 0
        while index < len(self.running):  # preemption only ever removes from the end
            sequence = self.running[index]
            index += 1
            if sequence.busy:
                continue
            if len(plan.decode) + len(plan.prefill) >= rows:
                break
            if sequence.status is Status.DECODE:
                if self._grow(sequence, sequence.computed + 1):
                    plan.decode.append(sequence)
                    budget -= 1
            elif budget > 0:
                budget -= self._chunk(plan, sequence, budget)
        while (
            self.waiting
            and len(self.running) < self.max_sequences
            and budget > 0
            and len(plan.decode) + len(plan.prefill) < rows
        ):
            if not self._admit(self.waiting[0]):
                break
            sequence = self.waiting.popleft()
            self.running.append(sequence)
            budget -= self._chunk(plan, sequence, budget)
        return plan

    def finish(self, sequence: Sequence) -> None:
        """Take a sequence out (done or aborted) and give its blocks back."""
        if sequence in self.running:
            self.running.remove(sequence)
            self._release(sequence)
        elif sequence in self.waiting:
            self.waiting.remove(sequence)

    def computed(self, sequence: Sequence) -> None:
        """After a step: name the sequence's blocks that became full, for later prompts."""
        size = self.pool.block_size
        full = sequence.computed // size
        if full <= sequence.named_blocks:
            return
        if full > len(sequence.block_names):
            tokens = sequence.tokens[: full * size]
            extend_names(sequence.block_names, tokens, size, sequence.salt)
        for index in range(sequence.named_blocks, full):
            self.pool.name(sequence.blocks[index], sequence.block_names[index])
        sequence.named_blocks = full

    def _admit(self, sequence: Sequence) -> bool:
        """Give a waiting sequence its cached prefix and the blocks for all it must compute
        before sampling, if the pool has them (checked whole, so that admitting it does not
        at once preempt another)."""
        tokens = sequence.tokens
        size = self.pool.block_size
        cacheable = (len(tokens) - 1) // size  # the last token is computed for its logits
        extend_names(sequence.block_names, tokens[: cacheable * size], size, sequence.salt)
        hit = self.pool.cached_prefix(sequence.block_names[:cacheable])
        needed = -(-len(tokens) // size) - len(hit)
        if needed > self.pool.free_blocks:
            self.pool.release(hit)
            return False
        self.pool.count_lookup(len(tokens), len(hit))
        sequence.blocks = hit
        sequence.named_blocks = len(hit)
        sequence.computed = len(hit) * size
        sequence.status = Status.PREFILL
        return True

    def _chunk(self, plan: Plan, sequence: Sequence, budget: int) -> int:
        size = min(sequence.remaining_prefill, budget)
        if not self._grow(sequence, sequence.computed + size):
            return 0
        plan.prefill.append((sequence, sequence.computed, sequence.computed + size))
        return size

    def _grow(self, sequence: Sequence, positions: int) -> bool:
        """Blocks for ``positions`` positions of ``sequence``, preempting the newest running
        sequences if the pool is out. False if ``sequence`` itself had to go, or if every
        newer one is busy (it then waits, keeping its blocks, for a step to come back)."""
        while len(sequence.blocks) * self.pool.block_size < positions:
            block = self.pool.allocate()
            if block is None:
                victim = next((s for s in reversed(self.running) if not s.busy), None)
                if victim is None:
                    return False
                self._preempt(victim)
                if victim is sequence:
                    return False
                continue
            sequence.blocks.append(block)
        return True

    def grow_without_preempting(self, sequence: Sequence, positions: int) -> int:
        """Blocks for up to ``positions`` positions of ``sequence``, as far as free (or
        evictable) blocks go; the positions its blocks now hold."""
        size = self.pool.block_size
        while len(sequence.blocks) * size < positions:
            block = self.pool.allocate()
            if block is None:
                break
            sequence.blocks.append(block)
        return len(sequence.blocks) * size

    def _preempt(self, sequence: Sequence) -> None:
        self.running.remove(sequence)
        self._release(sequence)
        sequence.status = Status.WAITING
        self.waiting.appendleft(sequence)
        self.preemptions += 1

    def _release(self, sequence: Sequence) -> None:
        self.pool.release(sequence.blocks)
        sequence.blocks = []
        sequence.named_blocks = 0
        sequence.computed = 0
