"""Per-request generation state: one ``Sequence`` per output the request asked for."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

import torch

from maas.engine.detokenizer import Detokenizer
from maas.messages import GenerationDelta, SamplingParams, TokenLogprob


class Status(Enum):
    WAITING = "waiting"
    """No KV slot yet."""
    PREFILL = "prefill"
    """Has a slot; some prompt tokens are not in the cache yet."""
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
    status: Status = Status.WAITING
    slot: int | None = None
    computed: int = 0
    """Tokens whose keys and values are in the slot."""
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
            self.generator = torch.Generator().manual_seed(self.params.seed + self.index)

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def remaining_prompt(self) -> int:
        return len(self.prompt_ids) - self.computed

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

    def fail(self, message: str) -> None:
        self.status = Status.FINISHED
        self.finish_reason = "abort"
        self.sink(
            GenerationDelta(
                index=self.index,
                finish_reason="abort",
                prompt_tokens=len(self.prompt_ids),
                completion_tokens=len(self.output_ids),
                error=message,
            )
        )
