"""Per-request generation state: one ``Sequence`` per output the request asked for."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

import torch

from maas.engine.detokenizer import Detokenizer
from maas.messages import NOT_STARTED, Failure, GenerationDelta, SamplingParams, TokenLogprob
from maas.runtime.llm.sampler import Sampled, SampleRow


class Status(Enum):
    WAITING = "waiting"
    """Not running: new, or preempted (its blocks given back, to be recomputed)."""
    PREFILL = "prefill"
    """Running; some of its tokens (prompt, or prompt and output after a preemption) are not
    in the cache yet."""
    DECODE = "decode"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    index: int
    prompt_ids: list[int]
    params: SamplingParams
    sink: Callable[[GenerationDelta], None]
    detokenizer: Detokenizer
    deadline: float | None = None
    arrival: float = field(default_factory=time.monotonic)
    salt: str = ""
    """Prefix-cache scope: only sequences with the same salt share cached blocks."""
    status: Status = Status.WAITING
    blocks: list[int] = field(default_factory=list)
    """Block table: the KV blocks holding this sequence's positions, in order."""
    block_names: list[bytes] = field(default_factory=list)
    """Prefix-cache names of its full blocks (see kv_cache.extend_names)."""
    named_blocks: int = 0
    """Blocks of the table already given their name in the pool."""
    computed: int = 0
    """Tokens whose keys and values are in the cache."""
    busy: bool = False
    """In a step still in flight (a pipeline's micro-batch): not scheduled again, and never
    preempted, until that step's result is back."""
    output_ids: list[int] = field(default_factory=list)
    history: Counter[int] = field(default_factory=Counter)
    seen: set[int] = field(default_factory=set)
    generator: torch.Generator | None = None
    finish_reason: str | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    previous_token_at: float | None = None

    def __post_init__(self) -> None:
        self.seen = set(self.prompt_ids)
        if self.params.seed is not None:
            # torch takes seeds in [-2**63, 2**64): wrap, so seed + index never overflows
            seed = (self.params.seed + self.index) % 2**64
            self.generator = torch.Generator().manual_seed(seed)

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def remaining_prefill(self) -> int:
        """Tokens to compute before the next one can be sampled."""
        return len(self.prompt_ids) + len(self.output_ids) - self.computed

    def sample_row(self, eos_token_ids: set[int]) -> SampleRow:
        """What the sampler needs to pick this sequence's next token."""
        banned = ()
        if len(self.output_ids) < self.params.min_tokens:  # as vLLM: no stop token before
            eos = () if self.params.ignore_eos else tuple(eos_token_ids)
            banned = self.params.stop_token_ids + eos
        return SampleRow(self.params, self.generator, self.history, self.seen, banned)

    def append(self, picked: Sampled, eos_token_ids: set[int], max_len: int) -> None:
        """Take the next token: count and time it, decide whether the sequence ends with it
        (``max_len`` counts prompt and output), and send the text it makes visible."""
        token = picked.token
        self.output_ids.append(token)
        self.history[token] += 1
        self.seen.add(token)
        now = time.monotonic()
        self.first_token_at = self.first_token_at or now
        self.previous_token_at = self.last_token_at
        self.last_token_at = now
        logprob = None
        if self.params.logprobs is not None:
            logprob = TokenLogprob(token, picked.logprob, picked.top)
        self.emit(self._text_and_finish(token, eos_token_ids, max_len), token, logprob)

    def _text_and_finish(self, token: int, eos_token_ids: set[int], max_len: int) -> str:
        params = self.params
        ends = token in params.stop_token_ids or (not params.ignore_eos and token in eos_token_ids)
        if ends and len(self.output_ids) > params.min_tokens:
            self.finish_reason = "stop"
            return self.detokenizer.flush()
        text = self.detokenizer.add(token, find_stops=len(self.output_ids) >= params.min_tokens)
        if self.detokenizer.stopped:
            self.finish_reason = "stop"
        elif len(self.output_ids) >= params.max_tokens or (
            len(self.prompt_ids) + len(self.output_ids) >= max_len
        ):
            self.finish_reason = "length"
            text += self.detokenizer.flush()
        return text

    def emit(self, text: str, token: int | None, logprob: TokenLogprob | None) -> None:
        self.sink(
            GenerationDelta(
                index=self.index,
                text=text,
                token_ids=() if token is None else (token,),
                logprobs=() if logprob is None else (logprob,),
                finish_reason=self.finish_reason,
                prompt_tokens=len(self.prompt_ids),
                completion_tokens=len(self.output_ids),
            )
        )

    def fail(self, failure: Failure) -> None:
        self.status = Status.FINISHED
        self.finish_reason = "abort"
        self.sink(
            GenerationDelta(
                index=self.index,
                finish_reason="abort",
                prompt_tokens=len(self.prompt_ids),
                completion_tokens=len(self.output_ids),
                error=failure.message,
                error_kind=failure.kind,
            )
        )


def fail_unstarted(sink: Callable[[GenerationDelta], None], n: int, prompt_tokens: int) -> None:
    """End a request whose sequences could not even be made: one error delta per sequence."""
    for index in range(n):
        sink(
            GenerationDelta(
                index=index,
                finish_reason="abort",
                prompt_tokens=prompt_tokens,
                error=NOT_STARTED.message,
                error_kind=NOT_STARTED.kind,
            )
        )
