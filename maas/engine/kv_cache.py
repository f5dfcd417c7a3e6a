"""KV slots: which sequence holds which slot, and reuse of a shared prompt prefix.

A freed slot keeps its keys and values. A new sequence takes the free slot whose content
shares the longest prefix with its prompt (a chat system prompt, a retried request), or copies
that prefix from a busy slot, and computes only the rest: on a CPU, prefill is the expensive
part of a short chat turn.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

MIN_REUSE = 16
"""Shorter shared prefixes are recomputed: not worth a copy."""


@dataclass(frozen=True)
class Allocation:
    slot: int
    reused: int
    """Prompt tokens whose keys and values are already in the slot."""


class SlotAllocator:
    def __init__(self, num_slots: int, copy_prefix: Callable[[int, int, int], None]) -> None:
        """``copy_prefix(source, target, length)`` copies cached positions between slots."""
        self.num_slots = num_slots
        self._free = list(range(num_slots))
        self._contents: list[list[int]] = [[] for _ in range(num_slots)]
        self._copy_prefix = copy_prefix

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1 - len(self._free) / self.num_slots

    def allocate(self, prompt: list[int], busy: dict[int, list[int]]) -> Allocation:
        """A slot for ``prompt``; ``busy`` maps slots in use to the tokens they hold."""
        best_free = max(self._free, key=lambda s: (_shared(self._contents[s], prompt), -s))
        reused = _shared(self._contents[best_free], prompt)
        donor = max(busy, key=lambda s: _shared(busy[s], prompt), default=None)
        slot = best_free
        if donor is not None:
            from_busy = _shared(busy[donor], prompt)
            if from_busy >= MIN_REUSE and from_busy > reused:
                slot = min(self._free)
                self._copy_prefix(donor, slot, from_busy)
                reused = from_busy
        if reused < MIN_REUSE:
            slot, reused = min(self._free), 0
        reused = min(reused, len(prompt) - 1)  # the last prompt token is computed for its logits
        self._free.remove(slot)
        self._contents[slot] = prompt[:reused]
        return Allocation(slot, reused)

    def release(self, slot: int, tokens: list[int]) -> None:
        """Free a slot, keeping what it holds for a later prompt that starts the same way."""
        self._contents[slot] = tokens
        self._free.append(slot)


def _shared(held: list[int], prompt: list[int]) -> int:
    length = min(len(held), len(prompt))
    for i in range(length):
        if held[i] != prompt[i]:
            return i
    return length
