"""Which sequences run in the next step: continuous batching with chunked prefill.

Every decoding sequence gets one token per step. What is left of the step's token budget goes
to prompts, in arrival order, a chunk at a time, so a long prompt never stalls everyone
else's decoding. Waiting sequences are admitted as KV slots free up; when all slots are busy
they wait (a slot is sized for a whole sequence, so nothing running is ever preempted).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from maas.engine.kv_cache import SlotAllocator
from maas.engine.sequence import Sequence, Status


@dataclass
class Plan:
    decode: list[Sequence] = field(default_factory=list)
    prefill: list[tuple[Sequence, int, int]] = field(default_factory=list)
    """(sequence, first prompt position, end) of each chunk this step."""

    @property
    def empty(self) -> bool:
        return not self.decode and not self.prefill


class Scheduler:
    def __init__(self, slots: SlotAllocator, max_batch_tokens: int) -> None:
        self.slots = slots
        self.max_batch_tokens = max_batch_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, sequence: Sequence) -> None:
        self.waiting.append(sequence)

    def schedule(self) -> Plan:
        plan = Plan(decode=[s for s in self.running if s.status is Status.DECODE])
        budget = self.max_batch_tokens - len(plan.decode)
        for sequence in self.running:
            if sequence.status is Status.PREFILL and budget > 0:
                budget -= self._chunk(plan, sequence, budget)
        while self.waiting and self.slots.free_slots and budget > 0:
            sequence = self.waiting.popleft()
            self._admit(sequence)
            budget -= self._chunk(plan, sequence, budget)
        return plan

    def finish(self, sequence: Sequence) -> None:
        """Take a sequence out (done or aborted) and give its slot back."""
        if sequence in self.running:
            self.running.remove(sequence)
            self.slots.release(sequence.slot, sequence.tokens[: sequence.computed])
        elif sequence in self.waiting:
            self.waiting.remove(sequence)

    def _admit(self, sequence: Sequence) -> None:
        busy = {s.slot: s.tokens[: s.computed] for s in self.running}
        allocation = self.slots.allocate(sequence.prompt_ids, busy)
        sequence.slot = allocation.slot
        sequence.computed = allocation.reused
        sequence.status = Status.PREFILL
        self.running.append(sequence)

    @staticmethod
    def _chunk(plan: Plan, sequence: Sequence, budget: int) -> int:
        size = min(sequence.remaining_prompt, budget)
        plan.prefill.append((sequence, sequence.computed, sequence.computed + size))
        return size
