"""The draft model of speculative decoding: the served model again, in a cheaper dtype, that
proposes the next few tokens of one sequence for the served model to check in one step.

One sequence's decode step reads every weight once for one token; at float32 that is memory's
speed, whatever the step's other costs. Checking k proposed tokens takes one step of k + 1 rows
(the same weights read once), so when the draft's guesses are mostly right, several tokens
come for about one step of the served model and k of the draft's. The draft is the same model
in int8 (a quarter of float32's bytes): on the demo, float32 accepted 88% of its int8 draft's
proposals on chat questions (1.34x the tokens/s), and 99.7% after the serving benchmark's
random prompts, whose greedy answers loop (1.74x; bench/speculation.py). What the sequence
outputs is always the served model's choice (see maas/engine/speculation.py), so drafting
changes speed, never tokens.

The draft keeps a KV cache of its own for one sequence at a time (``max_len`` positions), with
the tokens it holds; a new sequence, or one whose tokens changed, keeps the cached prefix it
shares with the last one and computes the rest.
"""

from __future__ import annotations

import copy
import logging
import time

import torch

from maas.runtime.llm import paged_attention
from maas.runtime.llm.compiled import MIN_BLOCKS, CompileReport, compile_decode
from maas.runtime.llm.dtypes import ACTIVATIONS, convert
from maas.runtime.llm.kernels import weight_bytes
from maas.runtime.llm.model import DecodeRows, KVCache, LlamaModel, PrefillRows, StepInput
from maas.runtime.llm.sampler import greedy_tokens

log = logging.getLogger(__name__)

DRAFT_DTYPES = ("bfloat16", "int8-weight", "int8")

CATCH_UP_ROWS = 2
"""Tokens the draft takes as decode rows (its compiled step) when it catches up; more (a new
sequence's prompt) go as prefill chunks. After a round whose every proposal was accepted it
has two to take: its last proposal and the served model's next token."""

CHUNK_TOKENS = 512
"""Most tokens of one prefill chunk when the draft catches up on a prompt."""


def rows_of_one_sequence(
    tokens: list[int], start: int, blocks: list[int], block_size: int, *, as_decode: bool
) -> StepInput:
    """A step of ``tokens`` at positions ``start``, ``start + 1``, ... of one sequence whose
    positions lie in ``blocks``. ``as_decode``: each token is a decode row of its own (row i
    attends over positions up to its own, the earlier rows' keys and values written in the
    same step), so the compiled decode step runs it and every row's logits come back;
    otherwise one prefill chunk, with the last token's logits."""
    count = len(tokens)
    positions = range(start, start + count)
    index = [blocks[p // block_size] * block_size + p % block_size for p in positions]
    held = -(-(start + count) // block_size)  # the blocks these positions reach
    if as_decode:
        table = blocks[:held] + [0] * (MIN_BLOCKS - held)
        decode = DecodeRows(
            count, torch.tensor([table] * count), torch.tensor([p + 1 for p in positions])
        )
        prefills, logits_rows = [], torch.arange(count)
    else:
        decode, logits_rows = None, torch.tensor([count - 1])
        prefills = [PrefillRows(0, count, torch.tensor(blocks[:held]), start)]
    return StepInput(
        torch.tensor(tokens),
        torch.tensor(positions),
        torch.tensor(index),
        decode,
        prefills,
        logits_rows,
    )


class DraftModel:
    """Proposes greedy continuations of one sequence at a time."""

    def __init__(
        self,
        model: LlamaModel,
        dtype: str,
        max_len: int,
        block_size: int,
        kv_dtype: torch.dtype,
        min_confidence: float = 0.0,
    ) -> None:
        self.model = model
        self.dtype = dtype
        self.min_confidence = min_confidence
        """A proposal stops after a token the draft gives less probability than this (as
        llama.cpp's ``--draft-p-min``): past a guess it is unsure of, the next are likelier
        wasted than accepted."""
        blocks = -(-max_len // block_size)
        self.cache = KVCache(model.config, blocks, block_size, kv_dtype)
        self.blocks = list(range(1, blocks + 1))
        """The draft's one block table: positions in order (block 0 is the null block)."""
        self.fed: list[int] = []
        """The tokens whose keys and values the cache holds, from position 0."""
        self.compiled: CompileReport | None = None

    @property
    def nbytes(self) -> int:
        return weight_bytes(self.model) + self.cache.nbytes

    def propose(self, tokens: list[int], count: int) -> list[int]:
        """Up to ``count`` tokens the draft would pick after ``tokens``, greedily: fewer if it
        picks one with less than ``min_confidence`` probability (that one is the last). It
        computes only what its cache lacks of ``tokens``, and leaves them and all but the
        last proposal cached."""
        if count < 1 or not tokens:
            return []
        held = min(_common_prefix(self.fed, tokens), len(tokens) - 1)  # the last: for logits
        del self.fed[held:]
        logits = self._feed(tokens[held:])
        proposal = []
        while True:
            row = logits[-1:]
            proposal.append(int(greedy_tokens(row)[0]))
            if len(proposal) == count or not self._sure(row):
                return proposal
            logits = self._feed(proposal[-1:])

    def _sure(self, logits: torch.Tensor) -> bool:
        """Whether the top token of ``logits`` (one row) has ``min_confidence`` probability."""
        if self.min_confidence <= 0:
            return True
        row = logits[0].float()
        return float(torch.exp(row.max() - torch.logsumexp(row, 0))) >= self.min_confidence

    def _feed(self, tokens: list[int]):
        """Compute ``tokens`` after what the cache holds; the last one's logits (and, fed as
        decode rows, every one's)."""
        size = self.cache.block_size
        if len(tokens) <= CATCH_UP_ROWS:
            step = rows_of_one_sequence(tokens, len(self.fed), self.blocks, size, as_decode=True)
            logits = self.model(step, self.cache)
            self.fed.extend(tokens)
            return logits
        for first in range(0, len(tokens), CHUNK_TOKENS):
            chunk = tokens[first : first + CHUNK_TOKENS]
            step = rows_of_one_sequence(chunk, len(self.fed), self.blocks, size, as_decode=False)
            logits = self.model(step, self.cache)
            self.fed.extend(chunk)
        return logits


def _common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    length = min(len(a), len(b))
    if a[:length] == b[:length]:
        return length
    return next(i for i in range(length) if a[i] != b[i])


def draft_weights(model: LlamaModel, dtype: str) -> LlamaModel:
    """The served ``model`` (whole, before its own conversion) again in ``dtype``, made from
    the weights already in memory rather than read and dequantised again. Where the draft
    computes in the model's dtype (an int8 draft of a float32 model), the tensors that stay
    as they are (norms, biases, the float weights the int8 ones are made from) are shared,
    not copied, so that making it never holds the float weights twice: for a 7B model in
    float32, 28 GB."""
    if dtype not in DRAFT_DTYPES:
        raise ValueError(f"unknown draft dtype {dtype!r}; expected one of {DRAFT_DTYPES}")
    shared = {}
    if ACTIVATIONS[dtype] == model.dtype:  # the copy's .to() then keeps each tensor itself
        shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return convert(copy.deepcopy(model, memo=shared), dtype, pack=False)


def ready_draft(
    model: LlamaModel,
    dtype: str,
    *,
    max_len: int,
    block_size: int,
    compile: bool,
    compile_always: bool = False,
    paged: bool = True,
    min_confidence: float = 0.0,
) -> DraftModel:
    """``model`` (``draft_weights``) as a draft for sequences of up to ``max_len`` positions,
    its decode step compiled for one and two rows (as it runs) where that works."""
    started = time.perf_counter()
    kv_dtype = ACTIVATIONS[dtype]
    draft = DraftModel(model, dtype, max_len, block_size, kv_dtype, min_confidence)
    model.use_paged_attention(
        paged and all(paged_attention.available(d) for d in (kv_dtype, model.dtype))
    )
    if compile:
        draft.compiled = compile_decode(
            model, draft.cache, max_sequences=CATCH_UP_ROWS, always=compile_always
        )
    log.info(
        "draft model (%s) ready in %.1fs, decode step %s",
        dtype,
        time.perf_counter() - started,
        "compiled" if draft.compiled else "eager",
    )
    return draft
