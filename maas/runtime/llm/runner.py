"""The model with its KV cache and tokenizer, ready for the engine to step."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from maas.registry.records import OpenedVersion
from maas.runtime.llm.kernels import pack_linears, quantize_linears, weight_bytes
from maas.runtime.llm.model import KVCache, StepInput
from maas.runtime.llm.tokenizer import load_tokenizer
from maas.runtime.llm.weights import load_model

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.float32}
"""int8 runs the linear layers W8A8 (see kernels.Int8Linear); the rest, and the KV cache, in
float32."""


@dataclass(frozen=True)
class RunnerOptions:
    dtype: str = "float32"
    max_sequences: int = 32
    """KV slots: sequences that run at once; more wait for a slot."""
    max_model_len: int = 4096
    """Positions per slot (prompt plus output); capped by the model's context."""
    kv_cache_bytes: int = 2 * 1024**3
    """The most the KV cache may take; fewer slots are made if needed."""
    threads: int = 0
    pack_weights: bool = True


class ModelRunner:
    def __init__(self, opened: OpenedVersion, options: RunnerOptions, tokenizer=None) -> None:
        started = time.perf_counter()
        if options.threads:
            torch.set_num_threads(options.threads)
        dtype = DTYPES[options.dtype]
        self.model = load_model(opened, dtype)
        self.config = self.model.config
        if options.dtype == "int8":
            quantize_linears(self.model)
        elif options.pack_weights:
            pack_linears(self.model)
        weights = weight_bytes(self.model)
        self.tokenizer = tokenizer or load_tokenizer(opened)
        max_len = min(options.max_model_len, self.config.max_position_embeddings)
        per_slot = KVCache.bytes_per_slot(self.config, max_len, dtype)
        slots = max(1, min(options.max_sequences, options.kv_cache_bytes // per_slot))
        self.cache = KVCache(self.config, slots, max_len, dtype)
        self.memory_bytes = weights + slots * per_slot
        log.info(
            "%s ready in %.1fs: %s, %d slots of %d positions",
            opened.record.reference,
            time.perf_counter() - started,
            options.dtype,
            slots,
            max_len,
        )

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    def forward(self, step: StepInput) -> Tensor:
        return self.model(step, self.cache)
