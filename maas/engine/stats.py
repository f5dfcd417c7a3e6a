"""What the engine reports after each step: gauges and latency samples for metrics."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EngineStats:
    """What the engine process reports after each step, for metrics and the pool."""

    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    e2e: list[float] = field(default_factory=list)


class StatsObserver:
    """The engine's observer inside the engine process: collects one step's figures."""

    def __init__(self) -> None:
        self.stats = EngineStats()

    def take(self) -> EngineStats:
        stats, self.stats = self.stats, EngineStats()
        return stats

    def on_step(self, engine) -> None:
        scheduler = engine.scheduler
        self.stats.running = len(scheduler.running)
        self.stats.waiting = len(scheduler.waiting)
        self.stats.kv_usage = scheduler.slots.usage

    def on_token(self, sequence) -> None:
        self.stats.generation_tokens += 1
        if len(sequence.output_ids) == 1:
            self.stats.prompt_tokens += len(sequence.prompt_ids)
            self.stats.ttft.append(sequence.first_token_at - sequence.arrival)
        elif sequence.previous_token_at is not None:
            self.stats.itl.append(sequence.last_token_at - sequence.previous_token_at)

    def on_finish(self, sequence) -> None:
        self.stats.e2e.append((sequence.last_token_at or sequence.arrival) - sequence.arrival)
