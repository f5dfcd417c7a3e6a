"""``GenerationEngine``: what every text-generation back-end offers the server.

Three back-ends implement it: ``EngineProcess`` (``maas/engine/process.py``, maas's engine in
a process of its own), ``EngineClient`` (``maas/engine/client.py``, the same engine on a
server thread) and ``TransformersGenerator`` (``maas/engine/hf_generator.py``, any causal LM
through ``transformers``, one request at a time). ``LLMDeployment`` picks one and uses it only
through this interface; ``tests/unit/engine/test_contract.py`` checks the three the same way.

A new back-end streams its deltas with ``DeltaStreams`` (``maas/engine/streams.py``), which
gives it the rules below for leaving early and for closing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from typing import Protocol, runtime_checkable

from maas.messages import EngineDescription, EngineStats, GenerationDelta, SamplingParams


@runtime_checkable
class GenerationEngine(Protocol):
    on_dead: Callable[[], None] | None
    """Called, from another thread, when the engine dies without being closed (the pool
    then loads the model again)."""

    @property
    def dead(self) -> bool:
        """The engine stopped without being closed; its requests failed as unavailable."""
        ...

    @property
    def stats(self) -> EngineStats:
        """What the engine reported after its last step (running and waiting sequences)."""
        ...

    @property
    def memory_bytes(self) -> int:
        """Weights and caches, for the pool's memory budget."""
        ...

    @property
    def max_len(self) -> int:
        """Positions one sequence may use, prompt and output together."""
        ...

    @property
    def num_slots(self) -> int:
        """Sequences that run at once; more wait."""
        ...

    @property
    def description(self) -> EngineDescription | None:
        """How the model runs (dtype and its timings, compiled or not, the KV pool)."""
        ...

    def generate(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        *,
        n: int = 1,
        timeout: float | None = None,
        cache_salt: str = "",
    ) -> AsyncIterator[GenerationDelta]:
        """Sample ``n`` sequences from one prompt: their deltas as they come, until every
        sequence has finished (a delta with ``finish_reason``). A failure is a delta with
        ``error`` and ``error_kind``: ``TIMEOUT`` once ``timeout`` seconds have passed,
        ``UNAVAILABLE`` when the engine is closed or dies. Leaving the iterator early (a
        client gone, a cancelled task) aborts the request, and the engine frees its work
        before its next step. Requests share cached prompt blocks only within one
        ``cache_salt`` (the API passes the tenant). Raises ``Unavailable`` if the engine is
        closing."""
        ...

    def close(self) -> None:
        """Stop the engine; requests still running or waiting fail as unavailable."""
        ...
