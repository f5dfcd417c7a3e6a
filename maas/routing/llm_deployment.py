"""A loaded text-generation model: the runner and the engine thread that steps it."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from maas.engine.client import EngineClient
from maas.engine.llm_engine import LLMEngine
from maas.registry.manifest import Manifest, TensorSpec
from maas.registry.records import OpenedVersion, VersionRecord
from maas.runtime.llm.runner import ModelRunner, RunnerOptions


@dataclass(frozen=True)
class EngineOptions:
    runner: RunnerOptions
    max_batch_tokens: int = 512
    """Tokens in one step: every decoding sequence's next token, then prompt chunks."""


class LLMDeployment:
    def __init__(self, opened: OpenedVersion, options: EngineOptions, observer=None) -> None:
        self.record: VersionRecord = opened.record
        self.manifest: Manifest = opened.manifest
        self.runner = ModelRunner(opened, options.runner)
        self.tokenizer = self.runner.tokenizer
        engine = LLMEngine(
            self.runner, max_batch_tokens=options.max_batch_tokens, observer=observer
        )
        self.engine = EngineClient(engine, name=opened.record.reference)
        self.in_flight = 0
        self.last_used = time.monotonic()
        self.helpers: dict[str, object] = {}
        self.inputs: list[TensorSpec] = []
        self.outputs: list[TensorSpec] = []

    @property
    def memory_bytes(self) -> int:
        return self.runner.memory_bytes

    @property
    def queued_rows(self) -> int:
        return len(self.engine.engine.scheduler.waiting)

    @property
    def max_len(self) -> int:
        return self.runner.max_len

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
