"""Pick next tokens for a batch of sequences, each with its own sampling parameters.

Penalties act on each row's own history; greedy rows take the argmax; the rest are scaled by
temperature, cut by top-k, top-p and min-p, and sampled with the sequence's own generator
(seeded ones reproduce). Log-probabilities are of the model's raw distribution.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import Tensor

from maas.messages import SamplingParams


@dataclass
class SampleRow:
    params: SamplingParams
    generator: torch.Generator | None
    history: Counter[int]
    """Tokens generated so far, with counts (presence and frequency penalties)."""
    seen: set[int]
    """Prompt and generated tokens (repetition penalty, as vLLM applies it)."""
    banned: tuple[int, ...] = ()
    """Tokens that may not be picked now (end-of-sequence before min_tokens)."""


@dataclass(frozen=True)
class Sampled:
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def greedy_tokens(logits: Tensor) -> Tensor:
    """Each row's likeliest token, the first of equals: ``argmax``'s answer, through
    ``max``, which torch computes faster on the CPU (a demo vocabulary of 49,152: 26 against
    71 us for one row, 0.43 against 1.12 ms for 32)."""
    return logits.max(dim=-1).indices


def sample(logits: Tensor, rows: list[SampleRow]) -> list[Sampled]:
    """One token per row of ``logits`` [rows, vocab] (float32)."""
    raw = logits
    if any(row.banned or _penalised(row) for row in rows):  # else read as they are: a copy
        logits = logits.clone()  # of a batch's logits (32 x 49K) cost a millisecond a step
        for i, row in enumerate(rows):
            _penalise(logits[i], row)
            if row.banned:
                _ban(logits[i], row.banned)
    greedy = [i for i, row in enumerate(rows) if row.params.greedy]
    if len(greedy) == len(rows):
        tokens = greedy_tokens(logits)
    else:
        tokens = torch.empty(len(rows), dtype=torch.long)
        if greedy:
            tokens[greedy] = greedy_tokens(logits[greedy])
    sampled = [i for i, row in enumerate(rows) if not row.params.greedy]
    if sampled:
        probs = _filtered_probs(logits[sampled], [rows[i].params for i in sampled])
        for j, i in enumerate(sampled):
            tokens[i] = torch.multinomial(probs[j], 1, generator=rows[i].generator)
    return _with_logprobs(raw, tokens, rows)


def _ban(logits: Tensor, banned: tuple[int, ...]) -> None:
    """Rule out ``banned`` tokens, unless that would rule out every token (stop_token_ids
    covering the vocabulary before min_tokens): then nothing is banned."""
    ids = torch.tensor(banned, dtype=torch.long).unique()
    if len(ids) < logits.shape[-1]:
        logits[ids] = float("-inf")


def _penalised(row: SampleRow) -> bool:
    return _repetition_penalised(row) or _presence_penalised(row)


def _repetition_penalised(row: SampleRow) -> bool:
    return bool(row.params.repetition_penalty != 1.0 and row.seen)


def _presence_penalised(row: SampleRow) -> bool:
    params = row.params
    return bool((params.presence_penalty or params.frequency_penalty) and row.history)


def _penalise(logits: Tensor, row: SampleRow) -> None:
    params = row.params
    if _repetition_penalised(row):
        ids = torch.tensor(sorted(row.seen))
        values = logits[ids]
        logits[ids] = torch.where(
            values > 0, values / params.repetition_penalty, values * params.repetition_penalty
        )
    if _presence_penalised(row):
        ids = torch.tensor(list(row.history.keys()))
        counts = torch.tensor(list(row.history.values()), dtype=logits.dtype)
        logits[ids] -= params.presence_penalty + params.frequency_penalty * counts


def _filtered_probs(logits: Tensor, params: list[SamplingParams]) -> Tensor:
    temperature = torch.tensor([p.temperature for p in params])[:, None]
    logits = logits / temperature
    top_k = [p.top_k for p in params]
    if any(k > 0 for k in top_k):
        vocab = logits.shape[-1]
        k = torch.tensor([min(k, vocab) if k > 0 else vocab for k in top_k])
        kth = logits.sort(dim=-1, descending=True).values.gather(1, (k - 1)[:, None])
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    top_p = torch.tensor([p.top_p for p in params])
    if bool((top_p < 1.0).any()):
        ordered, order = probs.sort(dim=-1, descending=True)
        before = ordered.cumsum(dim=-1) - ordered  # mass of the tokens ranked above each
        ordered = ordered.masked_fill(before > top_p[:, None], 0.0)
        probs = torch.zeros_like(probs).scatter(1, order, ordered)
    min_p = torch.tensor([p.min_p for p in params])
    if bool((min_p > 0).any()):
        floor = probs.max(dim=-1, keepdim=True).values * min_p[:, None]
        probs = probs.masked_fill(probs < floor, 0.0)
    return probs / probs.sum(dim=-1, keepdim=True)


def _with_logprobs(raw: Tensor, tokens: Tensor, rows: list[SampleRow]) -> list[Sampled]:
    wanted = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
    results = [Sampled(int(t), 0.0) for t in tokens.tolist()]
    if not wanted:
        return results
    logprobs = torch.log_softmax(raw[wanted], dim=-1)
    for j, i in enumerate(wanted):
        token = results[i].token
        k = rows[i].params.logprobs or 0
        top = ()
        if k:
            values, ids = logprobs[j].topk(k)
            top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
        results[i] = Sampled(token, float(logprobs[j, token]), top)
    return results
