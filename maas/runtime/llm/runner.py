"""The model with its KV cache and what the engine needs of its tokenizer, ready for the
engine to step."""

from __future__ import annotations

import logging
import os
import time

import torch
from torch import Tensor

from maas.registry.records import OpenedVersion
from maas.runtime.llm import dtype_cache, int8_matmul, paged_attention
from maas.runtime.llm.compiled import CompileReport, PrefillReport, compile_decode, compile_prefill
from maas.runtime.llm.draft import DraftModel, draft_weights, ready_draft
from maas.runtime.llm.dtypes import (
    ACTIVATIONS,
    KV_CACHE_DTYPES,
    QUALITY_ORDER,
    STORED_ACTIVATIONS,
    DtypeChoice,
    choose,
    convert,
    log_trials,
)
from maas.runtime.llm.kernels import pack_linears, weight_bytes
from maas.runtime.llm.model import KVCache, StepInput
from maas.runtime.llm.options import RunnerOptions
from maas.runtime.llm.quantized import stored_method
from maas.runtime.llm.tokenizer import ChatTokenizer, EngineTokenizer, load_tokenizer
from maas.runtime.llm.weights import load_model
from maas.runtime.memory import release_freed_memory

log = logging.getLogger(__name__)


AUTO_BATCH = 32
"""The full batch ``auto`` times (or max_sequences, if fewer)."""


KV_CACHE_SHARE = 4
"""A derived KV budget takes at most 1/KV_CACHE_SHARE of the machine's memory."""


def kv_cache_budget(options: RunnerOptions, per_sequence: int) -> int:
    """The KV cache's size: the set budget, else what ``max_sequences`` sequences of the
    whole context need (sequences x positions x bytes per position), at most a quarter of the
    memory. Blocks are committed as they are first written, so an idle cache holds little."""
    if options.kv_cache_bytes:
        return options.kv_cache_bytes
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return min(options.max_sequences * per_sequence, memory // KV_CACHE_SHARE)


class ModelRunner:
    """The model (or, with ``layers``, the pipeline stage of those decoder blocks) with its KV
    cache. ``submit`` then ``result`` run one step; here the step is computed at ``submit``,
    a pipeline's first stage (maas.distributed.pipeline) computes its part there and collects
    the logits at ``result``, so ``depth`` steps can be in flight. ``tokenizer`` is the
    engine's part of the version's tokenizer (a ``ChatTokenizer`` is reduced to it), loaded
    from the version when not given."""

    depth = 1
    """Steps that may be in flight at once."""

    def __init__(
        self,
        opened: OpenedVersion,
        options: RunnerOptions,
        tokenizer: EngineTokenizer | ChatTokenizer | None = None,
        *,
        layers: range | None = None,
    ) -> None:
        started = time.perf_counter()
        if options.kv_cache_dtype not in ("auto", *KV_CACHE_DTYPES):
            raise ValueError(f"unknown KV cache dtype {options.kv_cache_dtype!r}")
        if options.threads:
            torch.set_num_threads(options.threads)
        self.tokenizer = _for_engine(tokenizer or load_tokenizer(opened))
        self.dtype_choice: DtypeChoice | None = None
        """With ``dtype="auto"``: what was measured and chosen."""
        self.weights = stored_method(opened)
        """How the version stores its weights quantized ("int4, group 32"), or ""."""
        wanted = options.dtype
        if self.weights and wanted in STORED_ACTIVATIONS:
            wanted = STORED_ACTIVATIONS[wanted]
            log.info("weights stored %s: dtype %s runs %s", self.weights, options.dtype, wanted)
        self.dtype = wanted
        pack = options.pack_weights and not options.compile
        if wanted == "auto" and layers is not None:
            # auto measures the whole model in one process; a stage alone cannot
            log.info("a pipeline stage runs float32 unless MAAS_LLM_DTYPE names a dtype")
            self.dtype = "float32"
            self.model = load_model(opened, torch.float32, layers)
        elif wanted == "auto":
            self.model = load_model(opened, torch.float32)
            self.dtype_choice = self._auto_choice(opened, options, pack)
            self.dtype = self.dtype_choice.dtype
        else:
            self.model = load_model(opened, ACTIVATIONS[wanted], layers)
        draft = self._draft_dtype(options, layers)
        draft_model = draft_weights(self.model, draft) if draft else None
        convert(self.model, self.dtype, pack=pack)
        self.config = self.model.config
        kv_dtype = self._kv_cache_dtype(options)
        self.compiled: CompileReport | None = None
        context = min(options.max_model_len, self.config.max_position_embeddings)
        self.cache = self._make_cache(options, kv_dtype, context)
        self.max_len = min(context, self.cache.capacity)
        """Positions one sequence may reach (prompt plus output)."""
        self.max_sequences = options.max_sequences
        self.paged_attention = options.paged_attention and all(
            paged_attention.available(d) for d in (kv_dtype, self.model.dtype)
        )
        self.model.use_paged_attention(self.paged_attention)
        self.prefill_compiled: PrefillReport | None = None
        self._compile_steps(options)
        self.draft: DraftModel | None = None
        """Speculative decoding's draft model, if ``options.draft`` asks for one."""
        if draft_model is not None:
            self.draft = ready_draft(
                draft_model,
                draft,
                max_len=self.max_len,
                block_size=self.cache.block_size,
                compile=options.compile,
                compile_always=options.compile_always,
                paged=options.paged_attention,
                min_confidence=options.draft_min_confidence,
            )
        self.speculative_tokens = options.speculative_tokens if self.draft else 0
        self.memory_bytes = weight_bytes(self.model) + self.cache.nbytes
        if self.draft is not None:
            self.memory_bytes += self.draft.nbytes
        release_freed_memory()  # what loading, measuring and compiling freed
        log.info(
            "%s ready in %.1fs: %s%s, %d %s KV blocks of %d positions, decode step %s%s",
            opened.record.reference,
            time.perf_counter() - started,
            self.dtype,
            f" activations, weights stored {self.weights}" if self.weights else "",
            self.cache.num_blocks,
            str(kv_dtype).removeprefix("torch."),
            self.cache.block_size,
            "compiled" if self.compiled else "eager",
            ", paged attention" if self.paged_attention else "",
        )

    def _compile_steps(self, options: RunnerOptions) -> None:
        """Compile the decode step and, with it, the prefill parts (see compiled.py); pack
        the weights of a model whose steps all run eagerly."""
        if options.compile:
            self.compiled = compile_decode(
                self.model, self.cache, options.max_sequences, always=options.compile_always
            )
        if self.compiled is not None:  # weights stay as compiled (unpacked): the rest too
            self.prefill_compiled = compile_prefill(
                self.model, self.cache, always=options.compile_always
            )
        if self.compiled is None and options.compile and options.pack_weights:
            # eager only. With compiled steps, float32 weights stay unpacked even for the
            # batches that may run eagerly: MKL's packed copy needs the plain one beside it
            # (twice the weights: 490 MiB more for the demo) and pays off only at exactly
            # kernels.BATCH_HINT rows, where the demo's 32 streams ran as fast without it.
            pack_linears(self.model)

    def _draft_dtype(self, options: RunnerOptions, layers: range | None) -> str:
        """The draft's dtype, or "" for none. ``auto`` drafts in int8 for a whole float32
        model (a quarter of its bytes a step; on the demo, served, float32 accepted 91% of
        the int8 draft's proposals); a model already in a cheaper dtype has no much cheaper
        draft."""
        wanted = options.draft
        if wanted == "off":
            return ""
        if layers is not None or self.weights:
            if wanted != "auto":
                log.info("no draft model: not for a pipeline stage or weights stored quantized")
            return ""
        if options.speculative_tokens < 1:
            raise ValueError("speculative_tokens must be at least 1")
        if wanted == "auto":
            return "int8" if self.dtype == "float32" else ""
        return wanted

    def _make_cache(self, options: RunnerOptions, dtype: torch.dtype, context: int) -> KVCache:
        """The KV cache of this model's layers, as many blocks as the whole model's budget
        holds (so that every pipeline stage has as many)."""
        size = options.block_size
        per_block = KVCache.bytes_per_block(self.config, size, dtype)  # the whole model's
        budget = kv_cache_budget(options, per_block * -(-context // size))
        return KVCache(
            self.config,
            max(1, budget // per_block),
            size,
            dtype,
            commit=options.commit_kv_cache,
            num_layers=len(self.model.layers),
        )

    def _kv_cache_dtype(self, options: RunnerOptions) -> torch.dtype:
        """As set, else as ``auto`` chose, else the activations'."""
        if self.dtype_choice is not None:
            return self.dtype_choice.kv_cache_dtype
        return KV_CACHE_DTYPES.get(options.kv_cache_dtype, ACTIVATIONS[self.dtype])

    def _auto_choice(
        self, opened: OpenedVersion, options: RunnerOptions, pack: bool
    ) -> DtypeChoice:
        """The choice kept for this model, machine and code (dtype_cache.py), or one measured
        on the float32 model now, and kept."""
        candidates = ("float32", "bfloat16") if self.weights else QUALITY_ORDER
        batch = min(options.max_sequences, AUTO_BATCH)
        paged = options.paged_attention and paged_attention.available(torch.float32)
        name = dtype_cache.key(
            dtype_cache.model_digest(opened.manifest),
            candidates=candidates,
            batch=batch,
            pack=pack,
            paged=paged and paged_attention.built_name(),  # its source, compiler and flags
            int8_kernel=int8_matmul.available() and int8_matmul.NATIVE.built_name(),
            kv_cache=options.kv_cache_dtype,
        )
        kept = dtype_cache.load(name)
        if kept is not None and kept.dtype in candidates:
            log.info(
                "dtype auto: %s, as measured at an earlier load (kept as %s)", kept.dtype, name
            )
            log_trials(kept)
            return kept
        choice = choose(
            self.model,
            list(self.tokenizer.probe_ids),
            list(self.tokenizer.question_ids),
            batch=batch,
            pack=pack,
            candidates=candidates,
            paged=paged,
            kv_cache=options.kv_cache_dtype,
        )
        dtype_cache.save(name, choice)
        return choice

    def forward(self, step: StepInput) -> Tensor:
        return self.model(step, self.cache)

    def submit(self, step: StepInput) -> Tensor:
        """Start a step; what ``result`` takes. Here: the step's logits, computed now."""
        return self.forward(step)

    def result(self, pending: Tensor) -> Tensor:
        """The logits of a submitted step (float32 [rows, vocab])."""
        return pending


def _for_engine(tokenizer: EngineTokenizer | ChatTokenizer) -> EngineTokenizer:
    return tokenizer.for_engine() if isinstance(tokenizer, ChatTokenizer) else tokenizer
