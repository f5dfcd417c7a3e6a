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
    cost: float | None = None
    """What the request cost at its model version's price when it ran, in the price table's
    currency; None for an unpriced model or a request that is not charged."""

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
    cache_salt: str = ""
    """Scope of the prefix cache: requests share cached prompt blocks only within one salt
    (the API passes the tenant, so one tenant never learns another's prompts from timing)."""


@dataclass(frozen=True)
class EngineAbort:
    """Stop a request's sequences and free their slots: its caller stopped listening."""

    request_id: str


@dataclass(frozen=True)
class EngineStop:
    """Stop the engine; what is running or waiting fails as unavailable."""


EngineMessage = EngineRequest | EngineAbort | EngineStop
"""What the server sends an engine, through a thread's inbox or the engine process's pipe."""


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


@dataclass(frozen=True)
class RequestDelta:
    """A delta and the request it belongs to, as the engine process sends it."""

    request_id: str
    delta: GenerationDelta


@dataclass(frozen=True)
class EngineStats:
    """What an engine reports after a step, for metrics and the pool: gauges as they are now,
    and tokens and latency samples since its previous report."""

    running: int = 0
    """Sequences in the running batch."""
    waiting: int = 0
    """Sequences waiting to run (or, on the transformers fallback, requests queued)."""
    kv_usage: float = 0.0
    """Share of the KV cache's blocks held by sequences, 0 to 1."""
    prompt_tokens: int = 0
    generation_tokens: int = 0
    prefix_cache_queries: int = 0
    """Prompt tokens looked up in the prefix cache."""
    prefix_cache_hits: int = 0
    """Of those, tokens found cached (not computed again)."""
    preemptions: int = 0
    """Sequences preempted for want of KV blocks (to be recomputed)."""
    spec_drafts: int = 0
    """Rounds of speculative decoding."""
    spec_draft_tokens: int = 0
    """Tokens the draft model proposed."""
    spec_accepted_tokens: int = 0
    """Of those, tokens the model picked too."""
    ttft: tuple[float, ...] = ()
    """Seconds from arrival to the first token, one sample per sequence that got it."""
    itl: tuple[float, ...] = ()
    """Seconds between two tokens of a sequence."""
    e2e: tuple[float, ...] = ()
    """Seconds from arrival to the last token, one sample per finished sequence."""


@dataclass(frozen=True)
class EngineOutput:
    """One step of the engine process: every delta it produced, and its figures."""

    deltas: tuple[RequestDelta, ...]
    stats: EngineStats


@dataclass(frozen=True)
class EngineDescription:
    """How an engine runs its model, for operators (``GET /api/v1/deployments``)."""

    runtime: str
    """``maas`` (maas's engine) or ``transformers`` (the fallback)."""
    dtype: str
    """What the model computes in (for weights stored quantized: the activations)."""
    weights: str = ""
    """How the version stores its weights quantized ("int4, group 32"), or "" (as dtype)."""
    dtype_trials: tuple[dict[str, Any], ...] = ()
    """With ``MAAS_LLM_DTYPE=auto``: each candidate's step times and agreement."""
    kv_cache_dtype: str = ""
    """What the KV cache keeps keys and values in ("" where the engine has no such cache)."""
    compiled: bool = False
    """Decode steps run through the compiled step (else eagerly)."""
    compiled_rows: int = 0
    """Compiled steps are used for batches of at most this many sequences."""
    kv_blocks: int = 0
    kv_block_size: int = 0
    draft: str = ""
    """Speculative decoding's draft model: the dtype it runs the model in, or "" (none)."""
    speculative_tokens: int = 0
    """Most tokens the draft proposes each round."""
    draft_min_confidence: float = 0.0
    """A proposal ends after a token the draft is less sure of."""
    pipeline_stages: tuple[dict[str, Any], ...] = ()
    """With the model split into pipeline stages: each stage's layers, weight bytes, memory
    and node."""


@dataclass(frozen=True)
class EngineReady:
    """The engine loaded its model and takes requests: what the server plans with."""

    memory_bytes: int
    """Weights and KV cache."""
    max_len: int
    """Positions one sequence may use, prompt and output together."""
    num_slots: int
    """Sequences that run at once."""
    description: EngineDescription | None = None


@dataclass(frozen=True)
class EngineLoad:
    """What the engine process loads, the first message the server sends it (over its pipe
    rather than in its start arguments: see ``EngineProcess._send_load``)."""

    opened: Any
    """The version (an ``OpenedVersion``)."""
    options: Any
    """How to run it (``EngineOptions``)."""
    tokenizer: Any
    """What the engine needs of its tokenizer (an ``EngineTokenizer``), made by the server
    from the ``ChatTokenizer`` it loaded."""
    spec: Any = None
    """With the model split into pipeline stages: this rank's ``PipelineSpec``."""


@dataclass(frozen=True)
class EngineLoadError:
    """The engine process could not load its model; the server raises ``message``."""

    message: str


EngineReply = EngineReady | EngineLoadError | EngineOutput
"""What the engine process sends back: once ``EngineReady`` or ``EngineLoadError``, then an
``EngineOutput`` after each step."""
