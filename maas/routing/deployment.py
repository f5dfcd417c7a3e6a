"""A loaded model version: its runtime behind a batcher."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Self

import numpy as np

from maas.engine.batcher import Batcher, BatchStats
from maas.registry.manifest import Manifest, TensorSpec
from maas.registry.records import VersionRecord
from maas.runtime.base import Runtime

Tensors = dict[str, np.ndarray]


@dataclass
class ServingConfig:
    """How requests to one model are batched; defaults come from settings and the manifest,
    and can be changed per model while it serves."""

    max_batch_size: int = 32
    """Rows in one forward pass at most; 1 turns batching off."""
    max_delay_ms: float = 5.0
    """How long the oldest request may wait for others to join its batch."""
    max_queue_rows: int = 4096
    """Rows waiting at most; past it requests get 503 with Retry-After."""
    pipeline_stages: int | None = None
    """Processes the model is split across (pipeline stages), read when it loads; None: a
    text-generation model takes ``MAAS_LLM_PIPELINE_STAGES``, a classic one runs whole."""


class InFlight:
    """Requests running on a loaded version: an unload waits for them and eviction skips a
    version that has any. Subclasses set ``in_flight = 0`` and ``last_used`` when loaded.

    A deployment whose work runs elsewhere (an engine process) can die on its own: it then
    reports ``dead`` and calls what ``watch`` gave it; one that runs in the server cannot."""

    in_flight: int
    last_used: float
    dead: bool = False

    def watch(self, on_dead: Callable[[], None]) -> None:
        """Have ``on_dead()`` called (from any thread) if this deployment dies unasked."""

    @asynccontextmanager
    async def use(self) -> AsyncIterator[Self]:
        """Count a request as running on this deployment (an unload waits for it)."""
        self.in_flight += 1
        self.last_used = time.monotonic()
        try:
            yield self
        finally:
            self.in_flight -= 1


class Deployment(InFlight):
    def __init__(
        self,
        record: VersionRecord,
        manifest: Manifest,
        runtime: Runtime,
        config: ServingConfig,
        on_batch=None,
    ) -> None:
        self.record = record
        self.manifest = manifest
        self.runtime = runtime
        self.opened_folder = runtime.opened.folder
        self.helpers: dict[str, object] = {}
        """Per-deployment task helpers made once (tokenizer, image preprocessing)."""
        self.in_flight = 0
        self.last_used = time.monotonic()
        self.batcher: Batcher[Tensors, Tensors] = Batcher(
            self._run,
            max_batch_size=config.max_batch_size if runtime.batchable else 1,
            max_delay=config.max_delay_ms / 1000,
            max_queue_rows=config.max_queue_rows,
            name=record.reference,
            on_batch=on_batch,
        )

    @property
    def memory_bytes(self) -> int:
        return self.runtime.memory_bytes

    @property
    def dead(self) -> bool:
        """A runtime whose work runs in other processes (pipeline stages) can die."""
        return getattr(self.runtime, "dead", False)

    def watch(self, on_dead: Callable[[], None]) -> None:
        if hasattr(self.runtime, "on_dead"):
            self.runtime.on_dead = on_dead

    @property
    def queued_rows(self) -> int:
        return self.batcher.queued_rows

    @property
    def inputs(self) -> list[TensorSpec]:
        return self.runtime.inputs

    @property
    def outputs(self) -> list[TensorSpec]:
        return self.runtime.outputs

    def configure(self, config: ServingConfig) -> None:
        """Apply new batching settings to the next batches (no reload)."""
        self.batcher.max_batch_size = config.max_batch_size if self.runtime.batchable else 1
        self.batcher.max_delay = config.max_delay_ms / 1000
        self.batcher.max_queue_rows = config.max_queue_rows

    async def infer(self, inputs: Tensors) -> Tensors:
        """Run tensors with a batch dimension first; rows may share a forward pass with others."""
        wanted = {spec.name for spec in self.inputs}
        chunk = {name: array for name, array in inputs.items() if name in wanted}
        rows = len(next(iter(chunk.values()))) if self.runtime.batchable else 1
        return await self.batcher.submit(chunk, rows)

    async def close(self) -> None:
        await self.batcher.close()
        self.runtime.unload()

    def _run(self, chunks: list[Tensors]) -> list[Tensors]:
        names = [spec.name for spec in self.inputs]
        batch = {name: stack([chunk[name] for chunk in chunks]) for name in names}
        outputs = self.runtime.predict(batch)
        sizes = [len(chunk[names[0]]) for chunk in chunks] if names else [1] * len(chunks)
        bounds = np.cumsum([0, *sizes])
        return [
            {name: array[bounds[i] : bounds[i + 1]] for name, array in outputs.items()}
            for i in range(len(chunks))
        ]


def stack(arrays: list[np.ndarray]) -> np.ndarray:
    """Concatenate along the batch axis, padding other axes with zeros where lengths differ
    (token sequences of different lengths; their attention masks pad with 0 too)."""
    if len(arrays) == 1:
        return arrays[0]
    shape = [max(dims) for dims in zip(*(a.shape[1:] for a in arrays), strict=True)]
    if all(list(a.shape[1:]) == shape for a in arrays):
        return np.concatenate(arrays)
    out = np.zeros((sum(len(a) for a in arrays), *shape), dtype=arrays[0].dtype)
    row = 0
    for array in arrays:
        out[(slice(row, row + len(array)), *(slice(0, d) for d in array.shape[1:]))] = array
        row += len(array)
    return out


def batch_stats_recorder(metrics, record: VersionRecord):
    """Feed batch sizes into the serving metrics."""

    def record_batch(stats: BatchStats) -> None:
        metrics.batch_rows.labels(record.name, str(record.version)).observe(stats.rows)

    return record_batch
