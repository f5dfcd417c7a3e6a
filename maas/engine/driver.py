"""Driving an ``LLMEngine`` from a loop, the same way on a server thread (``EngineClient``)
and in the engine process (``EngineProcess``): take the server's messages, step, report."""

from __future__ import annotations

import logging
from collections.abc import Callable

from maas.engine.llm_engine import LLMEngine
from maas.engine.stats import StatsObserver
from maas.errors import StageLost
from maas.messages import (
    MODEL_FAILED,
    EngineAbort,
    EngineDescription,
    EngineMessage,
    EngineReady,
    EngineRequest,
    EngineStats,
    EngineStop,
    GenerationDelta,
)

log = logging.getLogger(__name__)

Sinks = Callable[[str], Callable[[GenerationDelta], None]]
"""Request id -> where that request's deltas go."""


def engine_ready(engine: LLMEngine) -> EngineReady:
    """What a loaded engine offers the server; the one place that reads the runner's sizes."""
    runner = engine.runner
    choice = runner.dtype_choice
    description = EngineDescription(
        runtime="maas",
        dtype=runner.dtype,
        weights=runner.weights,
        dtype_trials=tuple(choice.to_dict()["trials"]) if choice else (),
        kv_cache_dtype=str(runner.cache.dtype).removeprefix("torch."),
        compiled=runner.compiled is not None,
        compiled_rows=runner.compiled.rows if runner.compiled else 0,
        kv_blocks=runner.cache.num_blocks,
        kv_block_size=runner.cache.block_size,
        draft=runner.draft.dtype if runner.draft else "",
        speculative_tokens=runner.speculative_tokens,
        draft_min_confidence=runner.draft.min_confidence if runner.draft else 0.0,
    )
    return EngineReady(
        memory_bytes=runner.memory_bytes,
        max_len=runner.max_len,
        num_slots=runner.max_sequences,
        description=description,
    )


def apply(engine: LLMEngine, message: EngineMessage, sinks: Sinks) -> bool:
    """Do what ``message`` asks; False when it is ``EngineStop``."""
    if isinstance(message, EngineStop):
        return False
    if isinstance(message, EngineAbort):
        engine.abort(message.request_id)
    elif isinstance(message, EngineRequest):
        engine.add_request(message, sinks(message.request_id))
    return True


def step(engine: LLMEngine) -> None:
    """One step; a step that raises fails the requests it had, not the loop, except when a
    pipeline stage is lost (``StageLost`` is raised on: the engine cannot go on)."""
    try:
        engine.step()
    except StageLost:
        raise
    except Exception:
        log.exception("engine step failed")
        engine.fail_all(MODEL_FAILED)


def observed(engine: LLMEngine) -> StatsObserver:
    """The engine's ``StatsObserver``, given one if it had no observer."""
    if engine.observer is None:
        engine.observer = StatsObserver()
    return engine.observer


def report(engine: LLMEngine, observer: StatsObserver, *, stepped: bool) -> EngineStats:
    """The figures since the last report. Without a step (the loop only took messages, e.g. an
    abort), the gauges are read afresh, so they never show work that has gone."""
    if not stepped:
        observer.on_step(engine)
    return observer.take()
