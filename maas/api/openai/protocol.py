"""Request and response shapes of OpenAI's chat and text completions (as vLLM's
``protocol.py``): what enters and what leaves are separate classes.

Unknown fields are ignored and nulls mean "default", as OpenAI's own server does. A few of
vLLM's extensions are accepted too (top_k, min_p, repetition_penalty, min_tokens,
stop_token_ids, ignore_eos), so clients written for vLLM keep working. A known OpenAI or vLLM
field that would change the output but that maas does not honour yet (``best_of``,
``guided_regex``, ``logit_bias``...) is refused with a 400 naming it, never ignored; the
``NOT_HONOURED`` tables list them with the values that change nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
)

from maas.errors import InvalidRequest
from maas.messages import SamplingParams

MAX_N = 16

Harmless = Callable[[Any, "GenerationFields"], bool]
"""Whether a field's value changes nothing (so leaving the field unhonoured is right)."""


def _one_of(*values: Any) -> Harmless:
    return lambda value, request: (
        any(value == harmless and type(value) is type(harmless) for harmless in values)
        or value is None
    )


def _text_format(value: Any, request: GenerationFields) -> bool:
    return value is None or (isinstance(value, dict) and value.get("type", "text") == "text")


NOT_HONOURED: dict[str, Harmless] = {
    # OpenAI
    "logit_bias": _one_of({}),
    # vLLM's sampling and structured-output extensions
    "guided_json": _one_of(),
    "guided_regex": _one_of(),
    "guided_choice": _one_of(),
    "guided_grammar": _one_of(),
    "guided_decoding_backend": _one_of(),
    "guided_whitespace_pattern": _one_of(),
    "structural_tag": _one_of(),
    "structured_outputs": _one_of(),
    "use_beam_search": _one_of(False),
    "length_penalty": _one_of(1.0, 1),
    "prompt_logprobs": _one_of(),
    "allowed_token_ids": _one_of(),
    "bad_words": _one_of([]),
    "include_stop_str_in_output": _one_of(False),
    "skip_special_tokens": _one_of(True),
    "spaces_between_special_tokens": _one_of(True),
    "truncate_prompt_tokens": _one_of(),
    "logits_processors": _one_of([]),
    "return_tokens_as_token_ids": _one_of(False),
}
"""Known fields maas does not honour yet, each with a test of the values that change nothing."""


class GenerationFields(BaseModel):
    """What chat and text completion requests share."""

    model_config = ConfigDict(extra="allow")
    not_honoured: ClassVar[dict[str, Harmless]] = NOT_HONOURED

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int | None = Field(default=None, ge=1, le=MAX_N)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    user: str | None = None
    # vLLM's extensions
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0, le=10)
    min_tokens: int | None = Field(default=None, ge=0)
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = False
    timeout: float | None = Field(default=None, gt=0)
    """maas: stop the generation after this many seconds (capped by the server's limit)."""

    def check_honoured(self) -> None:
        """400 for a field that would change the output but that maas does not honour."""
        fields = {**self.__dict__, **(self.model_extra or {})}
        for name, harmless in self.not_honoured.items():
            if name in fields and not harmless(fields[name], self):
                raise InvalidRequest(
                    f"{name} is not supported (yet); leave it out or use its default", param=name
                )

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        return value

    @property
    def asked_max_tokens(self) -> int | None:
        """The output limit the request sets, if it sets one."""
        return self.max_tokens

    @property
    def engine_logprobs(self) -> int | None:
        """Logprobs as the engine takes them: None, or k for the chosen token's and the k most
        likely tokens'."""
        return None

    @property
    def include_usage(self) -> bool:
        """A stream ends with a chunk of usage (``stream_options.include_usage``)."""
        return bool(self.stream_options and self.stream_options.include_usage)

    def check(self) -> None:
        """400 for what the fields' types cannot say: a field maas does not honour."""
        self.check_honoured()

    def sampling(
        self,
        max_tokens: int,
        vocab_size: int,
        defaults: dict[str, Any] | None = None,
    ) -> SamplingParams:
        """The engine's parameters: the request's fields, else the model's ``defaults``, else
        OpenAI's."""

        def pick(name: str, fallback: Any) -> Any:
            value = getattr(self, name)
            return (defaults or {}).get(name, fallback) if value is None else value

        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not 0 <= token < vocab_size for token in self.stop_token_ids or ()):
            raise InvalidRequest(
                f"stop_token_ids must be between 0 and {vocab_size - 1}", param="stop_token_ids"
            )
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=pick("temperature", 1.0),
            top_p=pick("top_p", 1.0),
            top_k=max(0, pick("top_k", 0)),
            min_p=pick("min_p", 0.0),
            presence_penalty=pick("presence_penalty", 0.0),
            frequency_penalty=pick("frequency_penalty", 0.0),
            repetition_penalty=pick("repetition_penalty", 1.0),
            seed=self.seed,
            stop=tuple(stops),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=bool(self.ignore_eos),
            min_tokens=min(self.min_tokens or 0, max_tokens),
            logprobs=self.engine_logprobs,
        )


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool | None = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise InvalidRequest(
                    f"message parts of type {part.get('type')!r} are not supported; send text",
                    param="messages",
                )
            parts.append(str(part.get("text") or ""))
        return "".join(parts)


CHAT_NOT_HONOURED: dict[str, Harmless] = {
    **NOT_HONOURED,
    "tools": _one_of([]),
    "tool_choice": _one_of("none", "auto"),
    "functions": _one_of([]),
    "function_call": _one_of("none", "auto"),
    "response_format": _text_format,
    "audio": _one_of(),
    "modalities": _one_of(["text"]),
    "reasoning_effort": _one_of(),
    # vLLM's chat extensions
    "echo": _one_of(False),
    "add_generation_prompt": _one_of(True),
    "continue_final_message": _one_of(False),
    "chat_template": _one_of(),
    "chat_template_kwargs": _one_of({}),
    "documents": _one_of([]),
}

COMPLETION_NOT_HONOURED: dict[str, Harmless] = {
    **NOT_HONOURED,
    "best_of": lambda value, request: value is None or value == (request.n or 1),
    "suffix": _one_of(""),
}


class ChatCompletionRequest(GenerationFields):
    not_honoured: ClassVar[dict[str, Harmless]] = CHAT_NOT_HONOURED

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    @property
    def asked_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def engine_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(GenerationFields):
    not_honoured: ClassVar[dict[str, Harmless]] = COMPLETION_NOT_HONOURED

    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = False
    logprobs: int | None = Field(default=None, ge=0, le=20)

    @property
    def engine_logprobs(self) -> int | None:
        return self.logprobs

    @property
    def num_prompts(self) -> int:
        """How many prompts ``prompt`` holds: one text or token list, or a list of them."""
        if isinstance(self.prompt, str) or all(isinstance(t, int) for t in self.prompt):
            return 1
        return len(self.prompt)

    def check(self) -> None:
        super().check()
        if self.echo and self.logprobs is not None:
            raise InvalidRequest("echo together with logprobs is not supported", param="echo")


# What leaves: the answers and the chunks of a stream


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]
    """The token's UTF-8 bytes (a token may hold part of a character)."""


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatCompletionChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    """``stop`` (end of sequence, a stop string or token) or ``length``."""


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None


class DeltaMessage(BaseModel):
    """What a chunk adds to a choice's message; a field left unset is not sent at all."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _set_fields_only(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {name: value for name, value in handler(self).items() if value is not None}


class ChatCompletionStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: Usage | None = None
    """Sent only with ``stream_options.include_usage``: null but in the last chunk."""


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    """Per token, the text of each likeliest token and its logprob."""
    text_offset: list[int]
    """Where each token starts in the choice's text."""


class CompletionChoice(BaseModel):
    """A choice of an answer, or what a stream's chunk adds to one."""

    index: int
    """``prompt index x n + sequence index``."""
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    """Sent only with ``stream_options.include_usage``: null but in the last chunk."""


GenerationFields.model_rebuild()
ChatCompletionRequest.model_rebuild()
CompletionRequest.model_rebuild()
