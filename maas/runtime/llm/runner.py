"""The model with its KV cache and tokenizer, ready for the engine to step."""

from __future__ import annotations

import logging
import os
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
    kv_cache_bytes: int = 0
    """The most the KV cache may take; fewer slots are made if needed. 0: what the slots
    need (``kv_cache_budget``)."""
    commit_kv_cache: bool = False
    """Touch every KV page at load (first writes then cost nothing) instead of as tokens fill
    them (the memory is then held only once used)."""
    threads: int = 0
    pack_weights: bool = True


KV_CACHE_SHARE = 4
"""A derived KV budget takes at most 1/KV_CACHE_SHARE of the machine's memory."""


def kv_cache_budget(options: RunnerOptions, per_slot: int) -> int:
    """The KV cache's size: the set budget, else what ``max_sequences`` slots of the context
    need (sequences x positions x bytes per position), at most a quarter of the memory."""
    if options.kv_cache_bytes:
        return options.kv_cache_bytes
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return min(options.max_sequences * per_slot, memory // KV_CACHE_SHARE)


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
        budget = kv_cache_budget(options, per_slot)
        slots = max(1, min(options.max_sequences, budget // per_slot))
        self.cache = KVCache(self.config, slots, max_len, dtype, commit=options.commit_kv_cache)
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
