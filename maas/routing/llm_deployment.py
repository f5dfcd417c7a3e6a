"""A loaded text-generation model: its tokenizer here, its engine in a process of its own
(or, with MAAS_LLM_ENGINE_PROCESS=false, on a thread of the server)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from maas.engine.client import EngineClient
from maas.engine.llm_engine import LLMEngine
from maas.engine.process import EngineProcess
from maas.engine.stats import EngineStats, StatsObserver
from maas.registry.manifest import Manifest, TensorSpec
from maas.registry.records import OpenedVersion, VersionRecord
from maas.runtime.llm.runner import ModelRunner, RunnerOptions
from maas.runtime.llm.tokenizer import load_tokenizer


@dataclass(frozen=True)
class EngineOptions:
    runner: RunnerOptions
    max_batch_tokens: int = 512
    """Tokens in one step: every decoding sequence's next token, then prompt chunks."""
    separate_process: bool = True


class LLMDeployment:
    def __init__(
        self,
        opened: OpenedVersion,
        options: EngineOptions,
        on_stats: Callable[[EngineStats], None] | None = None,
    ) -> None:
        self.record: VersionRecord = opened.record
        self.manifest: Manifest = opened.manifest
        self.tokenizer = load_tokenizer(opened)
        name = opened.record.reference
        if options.separate_process:
            self.engine = EngineProcess(
                opened, options, self.tokenizer, name=name, on_stats=on_stats
            )
            self.memory_bytes = self.engine.memory_bytes
            self.max_len = self.engine.max_len
        else:
            runner = ModelRunner(opened, options.runner, tokenizer=self.tokenizer)
            engine = LLMEngine(
                runner, max_batch_tokens=options.max_batch_tokens, observer=StatsObserver()
            )
            self.engine = EngineClient(engine, name=name, on_stats=on_stats)
            self.memory_bytes = runner.memory_bytes
            self.max_len = runner.max_len
        self.in_flight = 0
        self.last_used = time.monotonic()
        self.helpers: dict[str, object] = {}
        self.inputs: list[TensorSpec] = []
        self.outputs: list[TensorSpec] = []

    @property
    def dead(self) -> bool:
        return self.engine.dead

    @property
    def queued_rows(self) -> int:
        return (self.engine.stats or EngineStats()).waiting

    def configure(self, config) -> None:
        """Batching settings are for classic models; the engine batches continuously."""

    @asynccontextmanager
    async def use(self) -> AsyncIterator[LLMDeployment]:
        self.in_flight += 1
        self.last_used = time.monotonic()
        try:
            yield self
        finally:
            self.in_flight -= 1

    async def close(self) -> None:
        self.engine.close()
