"""``StatsObserver``: the engine's observer, which turns its steps into ``EngineStats``.

The engine calls ``on_step``, ``on_token`` and ``on_finish``; whoever drives it calls
``take()`` after a step and hands the figures to the metrics (``EngineStats`` lives in
``maas/messages.py`` because the engine process sends it over its pipe).
"""

from __future__ import annotations

from maas.messages import EngineStats

__all__ = ["EngineStats", "StatsObserver"]


class StatsObserver:
    def __init__(self) -> None:
        self.running = 0
        self.waiting = 0
        self.kv_usage = 0.0
        self._counts_taken = (0,) * 6
        """Cumulative prefix-cache queries, hits, preemptions, and speculative rounds,
        proposed and accepted tokens, at the last ``take``."""
        self._counts_now = (0,) * 6
        self._reset_counts()

    def _reset_counts(self) -> None:
        self._prompt_tokens = 0
        self._generation_tokens = 0
        self._ttft: list[float] = []
        self._itl: list[float] = []
        self._e2e: list[float] = []

    def take(self) -> EngineStats:
        """The gauges now, and the counts and samples since the last ``take``."""
        stats = EngineStats(
            running=self.running,
            waiting=self.waiting,
            kv_usage=self.kv_usage,
            prompt_tokens=self._prompt_tokens,
            generation_tokens=self._generation_tokens,
            ttft=tuple(self._ttft),
            itl=tuple(self._itl),
            e2e=tuple(self._e2e),
            prefix_cache_queries=self._counts_now[0] - self._counts_taken[0],
            prefix_cache_hits=self._counts_now[1] - self._counts_taken[1],
            preemptions=self._counts_now[2] - self._counts_taken[2],
            spec_drafts=self._counts_now[3] - self._counts_taken[3],
            spec_draft_tokens=self._counts_now[4] - self._counts_taken[4],
            spec_accepted_tokens=self._counts_now[5] - self._counts_taken[5],
        )
        self._counts_taken = self._counts_now
        self._reset_counts()
        return stats

    def on_step(self, engine) -> None:
        scheduler = engine.scheduler
        self.running = len(scheduler.running)
        self.waiting = len(scheduler.waiting)
        self.kv_usage = scheduler.pool.usage
        pool, speculation = scheduler.pool, engine.speculation
        self._counts_now = (
            pool.queries,
            pool.hits,
            scheduler.preemptions,
            speculation.drafts,
            speculation.draft_tokens,
            speculation.accepted_tokens,
        )

    def on_token(self, sequence) -> None:
        self._generation_tokens += 1
        if len(sequence.output_ids) == 1:
            self._prompt_tokens += len(sequence.prompt_ids)
            self._ttft.append(sequence.first_token_at - sequence.arrival)
        elif sequence.previous_token_at is not None:
            self._itl.append(sequence.last_token_at - sequence.previous_token_at)

    def on_finish(self, sequence) -> None:
        self._e2e.append((sequence.last_token_at or sequence.arrival) - sequence.arrival)
