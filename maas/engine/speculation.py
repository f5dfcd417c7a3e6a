"""Speculative decoding of a lone greedy sequence: the draft model (runtime/llm/draft.py)
proposes k tokens, and the served model checks them all in one step of k + 1 rows.

Row i of that step computes the served model's logits after the sequence and the first i
proposals. The sequence samples row 0 as it would after a normal step; if its pick is the
draft's first proposal, row 1's logits are the ones the next normal step would have given, so
it samples row 1, and so on: it takes tokens until a pick differs from the proposal (that pick
is still its own next token) or all k + 1 rows are used. Every token is thus the served
model's own greedy choice after the sequence's actual tokens, as without a draft. The keys and
values the step wrote for rejected proposals lie past the sequence's computed positions and
are written over by its next step.

A round runs only for one running sequence that decodes greedily (vLLM likewise drafts less as
batches grow): a full batch already reads each weight once for many tokens, and a sampled
token matches the draft's guess too seldom to pay for the drafting.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from maas.engine.sequence import Sequence, Status
from maas.runtime.llm.draft import rows_of_one_sequence
from maas.runtime.llm.sampler import sample

log = logging.getLogger(__name__)


@dataclass
class SpeculationCounts:
    """Cumulative, as vLLM's ``spec_decode`` counters."""

    drafts: int = 0
    """Rounds run."""
    draft_tokens: int = 0
    """Tokens proposed."""
    accepted_tokens: int = 0
    """Proposed tokens the served model picked too."""


def round_tokens(engine, sequence: Sequence) -> int:
    """How many tokens a round may propose for ``sequence`` (0: take a normal step): at most
    the configured number; no more than it may still output, nor than the context holds,
    less the round's own token; few enough that the round's rows run as the sequence's
    normal steps do (within the compiled step's batch sizes, if it is compiled) and fit the
    step's token budget; and only as far as the KV blocks it holds or can take without
    preempting anyone reach."""
    runner = engine.runner
    wanted = min(
        runner.speculative_tokens,
        sequence.params.max_tokens - len(sequence.output_ids) - 1,
        runner.max_len - len(sequence.tokens) - 1,
        engine.scheduler.max_batch_tokens - 1,
    )
    if runner.compiled is not None:
        wanted = min(wanted, runner.model.compiled_rows - 1)
    if wanted < 1:
        return 0
    held = engine.scheduler.grow_without_preempting(sequence, sequence.computed + wanted + 1)
    return max(0, min(wanted, held - sequence.computed - 1))


def speculate(engine, sequence: Sequence, count: int) -> bool:
    """One round of ``count`` proposals for ``sequence`` (scheduled alone, decoding). False,
    with nothing done, if the draft fails: it is then dropped (the log says why) and the
    engine goes on without, as the draft only ever saves time."""
    runner = engine.runner
    try:
        proposal = runner.draft.propose(sequence.tokens, count)
    except Exception:
        log.exception("the draft model failed: decoding goes on without speculation")
        runner.draft = None
        return False
    rows = [sequence.tokens[-1], *proposal]
    step = rows_of_one_sequence(
        rows, sequence.computed, sequence.blocks, engine.block_size, as_decode=True
    )
    logits = runner.forward(step)
    counts = engine.speculation
    counts.drafts += 1
    counts.draft_tokens += len(proposal)  # fewer than count where the draft was unsure
    eos = engine.tokenizer.eos_token_ids
    for row, guess in enumerate([*proposal, None]):
        sequence.computed += 1  # row's input token: its keys and values are now the real ones
        engine.scheduler.computed(sequence)
        (picked,) = sample(logits[row : row + 1], [sequence.sample_row(eos)])
        engine.advance(sequence, picked)
        if picked.token != guess:
            break
        counts.accepted_tokens += 1
        if sequence.status is Status.FINISHED:
            break
    return True
