"""Structs that cross a process, thread or actor boundary."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any


@dataclass(frozen=True)
class UsageEvent:
    """One metered request, handed from the request path to the usage recorder."""

    at: datetime
    key_id: str | None
    tenant: str | None
    industry: str | None
    model: str | None
    version: int | None
    endpoint: str
    """Route template with method, e.g. ``POST /v1/chat/completions``."""
    status: int
    latency_ms: float
    prompt_tokens: int = 0
    completion_tokens: int = 0
    items: int = 0
    """Inputs processed where tokens do not apply (images, rows)."""

    def to_row(self) -> dict[str, Any]:
        return {**asdict(self), "day": self.at.date().isoformat()}


GREEDY_BELOW = 1e-5
"""Temperatures under this are greedy, as in vLLM: dividing float32 logits by a tinier one
overflows them to infinities (and the probabilities to NaN)."""


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence picks its tokens and when it stops (OpenAI's and vLLM's fields)."""

    max_tokens: int = 16
    temperature: float = 1.0
    """Below ``GREEDY_BELOW`` (0 included) is greedy."""
    top_p: float = 1.0
    top_k: int = 0
    """0 means no top-k cut."""
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    """Strings that end the output; they are never part of it."""
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    """Keep generating past end-of-sequence tokens (benchmarks)."""
    min_tokens: int = 0
    logprobs: int | None = None
    """None: no logprobs; k >= 0: the chosen token's and the k most likely."""

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW or self.top_k == 1


@dataclass(frozen=True)
class EngineRequest:
    """A generation request as every engine back-end takes it (and the engine process
    receives it): the prompt's token ids and how to sample ``n`` sequences from it."""

    request_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    n: int = 1
    deadline: float | None = None
    """``time.monotonic()`` after which the request fails with ``DEADLINE_PASSED``."""


class FailureKind(StrEnum):
    """Why a sequence failed; the API answers each kind with its own status."""

    TIMEOUT = "timeout"
    """Its deadline passed (504)."""
    UNAVAILABLE = "unavailable"
    """The engine stopped or the model is being unloaded; a retry can succeed (503)."""
    FAILED = "failed"
    """The model raised while generating (500)."""


@dataclass(frozen=True)
class Failure:
    kind: FailureKind
    message: str


DEADLINE_PASSED = Failure(FailureKind.TIMEOUT, "the request's deadline passed before it finished")
MODEL_UNLOADED = Failure(FailureKind.UNAVAILABLE, "the model was unloaded; retry the request")
ENGINE_STOPPED = Failure(
    FailureKind.UNAVAILABLE, "the model's engine stopped; it is restarting, retry the request"
)
MODEL_FAILED = Failure(FailureKind.FAILED, "the model failed while generating; see the server log")
NOT_STARTED = Failure(FailureKind.FAILED, "the request could not start; see the server log")


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class GenerationDelta:
    """What one sequence of a generation request produced in one engine step."""

    index: int
    """Which of the request's ``n`` sequences."""
    text: str = ""
    """New visible text (stop strings and end-of-sequence tokens are never in it)."""
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None
    """``stop``, ``length`` or ``abort`` once the sequence is done."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    """Set when the sequence failed (e.g. its deadline passed); finish_reason is then ``abort``."""
    error_kind: FailureKind | None = None
    """Why it failed, with ``error``."""
