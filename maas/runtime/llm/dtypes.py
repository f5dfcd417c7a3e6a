"""What a model's weights and activations run in: a named choice, or ``auto``, measured here.

Which is fastest depends on the CPU: on one with AMX, bfloat16 matrix products run 2.4x
float32; on one without, bfloat16 was slower than float32. So ``auto`` decodes a few steps in
each candidate at load (one sequence, and a full batch), checks each against float32, and
keeps the fastest that meets the quality bar, preferring the higher-quality dtype unless a
lower one is clearly faster. The bar has two parts: the next-token choices over a probe text
agree with float32's, and fed float32's greedy answer to a probe question token by token, the
candidate picks float32's token wherever float32 itself is sure of it, whether the question
is computed whole or its start comes from the prefix cache (a cached start was computed in
another chunk and rounds otherwise). Where float32 is unsure (the demo's first answer token
leads the next by 0.08 logits) either token is as good, and rounding that flips it is no
loss of quality: comparing free-running answers made the choice hinge on such near-ties.
The choice and every timing are kept (``DtypeChoice``) and shown with the deployment.

The KV cache is kept in the activations' dtype unless a ``kv_cache`` dtype is set; every
candidate is then measured with it. ``auto`` does not lower the cache's precision on its own
(as vLLM's ``--kv-cache-dtype auto``): a bfloat16 cache for int8 passed this quality bar on
the demo, but it flipped the unsure first token of the demo's answer to the README's
question, which then no longer named Paris (docs/llm.md).
"""

from __future__ import annotations

import copy
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from maas.runtime.llm.kernels import (
    Int8Embedding,
    pack_linears,
    quantize_linears,
    quantize_weights,
)
from maas.runtime.llm.model import (
    DecodeRows,
    KVCache,
    LlamaModel,
    PrefillRows,
    StepInput,
    rope_frequencies,
)

log = logging.getLogger(__name__)

QUALITY_ORDER = ("float32", "bfloat16", "int8-weight", "int8")
"""Best first: bfloat16 rounds weights and activations to 8 bits of mantissa; ``int8-weight``
rounds the weights to int8 per output channel (activations bfloat16); ``int8`` (W8A8) rounds
the activations to int8 per token too (the rest of the model in float32)."""

ACTIVATIONS = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "int8-weight": torch.bfloat16,
    "int8": torch.float32,
}
"""The dtype of activations, and of the KV cache unless another is chosen, for each choice."""

KV_CACHE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
"""What the KV cache may be kept in (``kv_cache`` options besides "auto")."""

STORED_ACTIVATIONS = {
    "float32": "float32",
    "bfloat16": "bfloat16",
    "int8-weight": "bfloat16",
    "int8": "float32",
}
"""For a version whose weights are stored quantized (see quantized.py), a dtype names only
the activations: the int8 choices run the stored weights with theirs, and ``auto`` chooses
between float32 and bfloat16 activations."""

MIN_AGREEMENT = 0.9
"""Quality bar: share of the probe's next-token choices (argmax) equal to float32's."""

MIN_GAIN = 0.05
"""A lower-quality dtype replaces a better one only if it is this much faster."""

SPLIT = 16
ANSWER_TOKENS = 12
SURE_MARGIN = 1.0
"""float32 is sure of an answer token when its logit leads the next one's by this much; only
those positions are held against a candidate (a dtype that loses quality flips sure ones:
int8 moves the demo's logits by up to about 1, its sure tokens lead by 2.6 to 13)."""
CONTEXT = 128
"""Positions each timed sequence has in cache."""
WARM_STEPS, TIMED_STEPS = 2, 5
BLOCK = 16


def convert(model: LlamaModel, dtype: str, *, pack: bool) -> LlamaModel:
    """``model`` (float32, or already bfloat16 for "bfloat16") in ``dtype``, in place;
    ``pack`` packs float weights for eager steps (see kernels.pack_linears)."""
    if dtype not in ACTIVATIONS:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(ACTIVATIONS)}")
    head, embed = model.lm_head, model.embed  # stored-quantized ones have no .weight
    tied = isinstance(head, nn.Linear) and isinstance(embed, nn.Embedding)
    tied = tied and head.weight is embed.weight
    model.inv_freq = rope_frequencies(model.config)
    model.to(ACTIVATIONS[dtype])  # the rotary frequencies too, as transformers' .to() does:
    # SmolLM2 in bfloat16 answers the README's question right with them in bfloat16 and
    # loops with them in float32
    if dtype == "int8":
        quantize_linears(model)
    elif dtype == "int8-weight":
        quantize_weights(model)
    elif pack:
        pack_linears(model)
    if tied and dtype in ("int8", "int8-weight"):  # one int8 matrix, not a float one beside
        model.embed = Int8Embedding(model.lm_head)
    return model


@dataclass(frozen=True)
class Trial:
    dtype: str
    one_ms: float
    """Median decode step of one sequence."""
    batch_ms: float
    """Median decode step of ``batch`` sequences."""
    batch: int
    agreement: float
    """Share of the probe's next-token choices equal to float32's."""
    same_answer: bool = True
    """Fed float32's answer to the probe question, it picks float32's token wherever float32
    is sure of it (``SURE_MARGIN``), with the question whole and its start cached."""
    kv_cache: str = ""
    """The KV cache's dtype, if not the activations'."""

    @property
    def good(self) -> bool:
        """Meets the quality bar."""
        return self.agreement >= MIN_AGREEMENT and self.same_answer

    @property
    def score(self) -> float:
        """Geometric mean of the time per token alone and in a full batch (lower is better)."""
        return (self.one_ms * self.batch_ms / self.batch) ** 0.5


@dataclass(frozen=True)
class DtypeChoice:
    dtype: str
    trials: tuple[Trial, ...]
    kv_cache: str = ""
    """The KV cache's dtype, if not the activations'."""

    def to_dict(self) -> dict:
        trials = [asdict(t) for t in self.trials]
        return {"dtype": self.dtype, "kv_cache": self.kv_cache, "trials": trials}

    @property
    def kv_cache_dtype(self) -> torch.dtype:
        return KV_CACHE_DTYPES[self.kv_cache] if self.kv_cache else ACTIVATIONS[self.dtype]


def choose(
    model: LlamaModel,
    probe_ids: list[int],
    question_ids: list[int],
    *,
    batch: int,
    pack: bool,
    timer: Callable[[], float] = time.perf_counter,
    candidates: tuple[str, ...] = QUALITY_ORDER,
    paged: bool = False,
    kv_cache: str = "auto",
) -> DtypeChoice:
    """Measure every candidate (best quality first) against the float32 ``model`` (left
    unchanged) and pick; ``paged``: timed with the paged attention kernel, as they will run.
    ``kv_cache``: "auto" keeps each candidate's cache in its activations' dtype; a dtype name
    keeps every candidate's cache in it."""
    reference = Reference(model, probe_ids, question_ids)
    fixed = "" if kv_cache == "auto" else kv_cache
    trials = []
    for dtype in candidates:
        trials.append(_trial(model, reference, dtype, fixed, batch, pack, paged, timer))
    best = trials[0]
    for trial in trials[1:]:
        if trial.good and trial.score < best.score * (1 - MIN_GAIN):
            best = trial
    choice = DtypeChoice(best.dtype, tuple(trials), best.kv_cache)
    log_trials(choice)
    return choice


class Reference:
    """What float32 answers, that candidates are held against."""

    def __init__(self, model: LlamaModel, probe_ids: list[int], question_ids: list[int]):
        self.probe_ids, self.question_ids = probe_ids, question_ids
        self.next_tokens = _next_tokens(model, probe_ids)
        logits = _answer_logits(model, question_ids, 0)
        self.answer = logits.argmax(dim=-1)
        self.sure = _margins(logits) >= SURE_MARGIN


def _trial(
    model: LlamaModel,
    reference: Reference,
    dtype: str,
    kv_cache: str,
    batch: int,
    pack: bool,
    paged: bool,
    timer: Callable[[], float],
) -> Trial:
    """A copy of ``model`` in ``dtype`` (its KV cache in ``kv_cache``, or "" for its
    activations'), checked against float32 and timed."""
    candidate = convert(copy.deepcopy(model), dtype, pack=pack)
    candidate.use_paged_attention(paged)
    kv = KV_CACHE_DTYPES[kv_cache] if kv_cache else None
    agreement, same = _quality(candidate, reference, kv)
    one = _step_ms(candidate, 1, timer, kv)
    full = _step_ms(candidate, batch, timer, kv)
    return Trial(dtype, one, full, batch, agreement, same, kv_cache)


def _quality(
    candidate: LlamaModel, reference: Reference, kv: torch.dtype | None
) -> tuple[float, bool]:
    """The candidate's next-token agreement with float32 over the probe, and whether it keeps
    float32's sure answer tokens (``Trial.same_answer``)."""
    chosen = _next_tokens(candidate, reference.probe_ids, kv)
    agreement = float((chosen == reference.next_tokens).float().mean())
    ids, answer = reference.question_ids, reference.answer
    splits = (0, SPLIT, (len(ids) - 1) // BLOCK * BLOCK)  # whole, and as a repeat of the
    # question computes it: after its cached full blocks
    same = all(
        _keeps_sure_tokens(
            _answer_logits(candidate, ids, split, answer, kv), answer, reference.sure
        )
        for split in splits
    )
    return agreement, same


def log_trials(choice: DtypeChoice) -> None:
    for trial in choice.trials:
        log.info(
            "dtype %s%s: %.1f ms a step alone, %.1f ms for %d, agreement %.2f, %s answer%s",
            trial.dtype,
            f" (KV cache {trial.kv_cache})" if trial.kv_cache else "",
            trial.one_ms,
            trial.batch_ms,
            trial.batch,
            trial.agreement,
            "same" if trial.same_answer else "another",
            " (chosen)" if (trial.dtype, trial.kv_cache) == (choice.dtype, choice.kv_cache) else "",
        )


def _next_tokens(model: LlamaModel, ids: list[int], kv: torch.dtype | None = None) -> torch.Tensor:
    """Argmax of the next-token logits at every position of ``ids`` (one prefill)."""
    return prefill_logits(model, ids, kv).argmax(dim=-1)


def prefill_logits(
    model: LlamaModel, ids: list[int], kv: torch.dtype | None = None
) -> torch.Tensor:
    """The next-token logits at every position of ``ids``, computed in one prefill (the KV
    cache in ``kv``, else in the activations' dtype)."""
    cache = _cache(model, -(-len(ids) // BLOCK), kv)
    step = StepInput(
        input_ids=torch.tensor(ids),
        positions=torch.arange(len(ids)),
        cache_index=torch.arange(len(ids)) + cache.block_size,
        decode=None,
        prefills=[PrefillRows(0, len(ids), _blocks(cache, 0, len(ids)), 0)],
        logits_rows=torch.arange(len(ids)),
    )
    return model(step, cache)


def greedy_answer(model: LlamaModel, ids: list[int]) -> list[int]:
    """The first ``ANSWER_TOKENS`` greedy tokens after ``ids``."""
    return _answer_logits(model, ids, 0).argmax(dim=-1).tolist()


def decode_step_ms(model: LlamaModel, sequences: int) -> float:
    """Median wall time of one decode step of ``sequences`` sequences (``CONTEXT`` cached)."""
    return _step_ms(model, sequences, time.perf_counter)


def _margins(logits: torch.Tensor) -> torch.Tensor:
    """How far each row's top logit leads its second."""
    top = logits.float().topk(2, dim=-1).values
    return top[:, 0] - top[:, 1]


def _keeps_sure_tokens(logits: torch.Tensor, answer: torch.Tensor, sure: torch.Tensor) -> bool:
    """The candidate's choice is float32's ``answer`` at every position where float32 is sure."""
    return bool((logits.argmax(dim=-1) == answer)[sure].all())


def _answer_logits(
    model: LlamaModel,
    ids: list[int],
    split: int,
    forced: torch.Tensor | None = None,
    kv: torch.dtype | None = None,
) -> torch.Tensor:
    """The next-token logits of ``ANSWER_TOKENS`` decode steps after ``ids``, each step fed
    the last one's greedy token, or ``forced``'s (float32's answer, so a candidate is judged
    at every position on the same text). With a ``split``, as a repeated request gets them
    from the prefix cache: ``ids`` computed whole first, then from ``split`` on again over
    the first ``split`` positions' cached keys and values."""
    total = len(ids) + ANSWER_TOKENS
    cache = _cache(model, -(-total // BLOCK), kv)
    blocks = _blocks(cache, 0, total)
    chunks = [(0, len(ids)), (split, len(ids))] if 0 < split < len(ids) else [(0, len(ids))]
    for start, end in chunks:
        step = StepInput(
            input_ids=torch.tensor(ids[start:end]),
            positions=torch.arange(start, end),
            cache_index=torch.arange(start, end) + BLOCK,
            decode=None,
            prefills=[PrefillRows(0, end - start, blocks, start)],
            logits_rows=torch.tensor([end - start - 1]),
        )
        logits = model(step, cache)
    rows = [logits[0]]
    for index, position in enumerate(range(len(ids), total - 1)):
        token = int(rows[-1].argmax()) if forced is None else int(forced[index])
        step = StepInput(
            input_ids=torch.tensor([token]),
            positions=torch.tensor([position]),
            cache_index=torch.tensor([position + BLOCK]),
            decode=DecodeRows(1, blocks[None, :], torch.tensor([position + 1])),
            prefills=[],
            logits_rows=torch.tensor([0]),
        )
        rows.append(model(step, cache)[0])
    return torch.stack(rows)


def _step_ms(
    model: LlamaModel, sequences: int, timer: Callable[[], float], kv: torch.dtype | None = None
) -> float:
    """Median decode step of ``sequences`` sequences with ``CONTEXT`` positions cached."""
    per = -(-(CONTEXT + 1) // BLOCK)
    cache = _cache(model, sequences * per, kv)
    tables = torch.stack([_blocks(cache, s * per, CONTEXT + 1) for s in range(sequences)])
    step = StepInput(
        input_ids=torch.arange(sequences) % model.config.vocab_size,
        positions=torch.full((sequences,), CONTEXT),
        cache_index=tables[:, CONTEXT // cache.block_size] * cache.block_size
        + CONTEXT % cache.block_size,
        decode=DecodeRows(sequences, tables, torch.full((sequences,), CONTEXT + 1)),
        prefills=[],
        logits_rows=torch.arange(sequences),
    )
    times = []
    for index in range(WARM_STEPS + TIMED_STEPS):
        started = timer()
        model(step, cache)
        if index >= WARM_STEPS:
            times.append((timer() - started) * 1000)
    return statistics.median(times)


def _cache(model: LlamaModel, blocks: int, kv: torch.dtype | None = None) -> KVCache:
    return KVCache(model.config, blocks, BLOCK, kv or model.dtype)


def _blocks(cache: KVCache, first: int, positions: int) -> torch.Tensor:
    """Consecutive blocks from ``first`` (after the null block) for ``positions``."""
    return torch.arange(-(-positions // cache.block_size)) + 1 + first
