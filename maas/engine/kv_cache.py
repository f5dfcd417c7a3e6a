"""The paged KV cache's bookkeeping: fixed-size blocks, per-sequence block tables, and
automatic prefix caching by block hash (vLLM's design).

The runner's cache is a pool of blocks of ``block_size`` positions (per layer). A sequence
holds a list of block ids, its block table: position ``p`` lives in block
``table[p // block_size]`` at offset ``p % block_size``. Block 0 is never handed out: rows that
only pad a step write there. Blocks are taken as a sequence grows, so a short sequence holds
only what it uses and more sequences share one budget than whole-length slots would allow.

A block whose positions are all computed is named by a hash of its tokens chained to the
previous block's hash, so the name stands for the whole prefix up to it. A new sequence looks
its prompt's full blocks up by name and shares those it finds (reference counted), computing
only the rest: on a CPU, prefill is the expensive part of a chat turn with a long system
prompt. Freed blocks keep their name and stay evictable, least recently freed first, until
their memory is needed. Names are a keyed cryptographic hash, so two different prefixes never
meet by accident, and requests can only share blocks within one ``salt`` (the tenant).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

NULL_BLOCK = 0
"""Never allocated: padding rows of a step read and write it."""


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        """``num_blocks`` usable blocks (ids 1..num_blocks; 0 is the null block)."""
        if num_blocks < 1 or block_size < 1:
            raise ValueError("the KV cache needs at least one block of at least one position")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._refs = [0] * (num_blocks + 1)
        self._free = list(range(num_blocks, 0, -1))
        """Unnamed free blocks; popped from the end, so low ids (already-touched memory) first."""
        self._evictable: OrderedDict[int, None] = OrderedDict()
        """Named blocks no sequence holds, least recently freed first."""
        self._name_of: dict[int, bytes] = {}
        self._by_name: dict[bytes, int] = {}
        self.queries = 0
        """Prompt tokens looked up in the prefix cache (cumulative)."""
        self.hits = 0
        """Of those, tokens found cached (cumulative)."""

    @property
    def free_blocks(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def usage(self) -> float:
        """Share of the blocks held by sequences (cached but free blocks count as free)."""
        return 1 - self.free_blocks / self.num_blocks

    def allocate(self) -> int | None:
        """A block for one sequence, or None when every block is held."""
        if self._free:
            block = self._free.pop()
        elif self._evictable:
            block, _ = self._evictable.popitem(last=False)
            del self._by_name[self._name_of.pop(block)]
        else:
            return None
        self._refs[block] = 1
        return block

    def release(self, blocks: list[int]) -> None:
        """Give a sequence's blocks back. Named ones stay findable; the table's tail is freed
        first, so it is evicted before the prefix that other prompts are likelier to share."""
        for block in reversed(blocks):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._name_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)

    def cached_prefix(self, names: list[bytes]) -> list[int]:
        """The blocks holding the longest cached run of ``names`` (the prompt's full blocks,
        in order), each now also held by the caller."""
        found = []
        for name in names:
            block = self._by_name.get(name)
            if block is None:
                break
            self._hold(block)
            found.append(block)
        return found

    def count_lookup(self, tokens: int, blocks_found: int) -> None:
        """Count one admitted prompt of ``tokens`` tokens, ``blocks_found`` of whose blocks
        came from the cache (a prompt looked up but not admitted is counted when it is)."""
        self.queries += tokens
        self.hits += blocks_found * self.block_size

    def name(self, block: int, name: bytes) -> None:
        """Record that ``block``, now full, holds the prefix ``name`` stands for. If another
        block already holds it (two prompts computed at once), that one stays the cached
        copy and this one is freed unnamed when its sequence ends."""
        if block not in self._name_of and name not in self._by_name:
            self._name_of[block] = name
            self._by_name[name] = block

    def _hold(self, block: int) -> None:
        if self._refs[block] == 0:
            del self._evictable[block]
        self._refs[block] += 1


def extend_names(names: list[bytes], tokens: list[int], block_size: int, salt: str) -> None:
    """Append to ``names`` (a sequence's block names so far) the names of the full blocks of
    ``tokens`` that it lacks; each name chains the previous block's."""
    previous = names[-1] if names else _root(salt)
    for index in range(len(names), len(tokens) // block_size):
        chunk = tokens[index * block_size : (index + 1) * block_size]
        previous = hashlib.blake2b(previous + array("q", chunk).tobytes(), digest_size=16).digest()
        names.append(previous)


def _root(salt: str) -> bytes:
    return hashlib.blake2b(salt.encode(), digest_size=16, person=b"maas-kv").digest()
