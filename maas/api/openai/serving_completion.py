"""Text completions: plain prompts (a string, a list, token ids), each with its ``n`` choices;
a stream merges the prompts' deltas as they come."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from maas.api.openai.generation import Generation, merge
from maas.api.openai.protocol import (
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Usage,
)
from maas.api.openai.serving import GenerationServing, PromptRun
from maas.errors import InvalidRequest
from maas.messages import GenerationDelta, TokenLogprob

if TYPE_CHECKING:  # the API never loads the runtime itself
    from maas.runtime.llm.tokenizer import ChatTokenizer

MAX_PROMPTS = 64
OPENAI_MAX_TOKENS = 16
"""What OpenAI's text completions produce when neither the request nor the model says."""

Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionServing(GenerationServing[CompletionRequest]):
    prompt_param = "prompt"
    default_max_tokens = OPENAI_MAX_TOKENS

    def num_prompts(self) -> int:
        return self.body.num_prompts

    def prompts(self) -> list[list[int]]:
        return encode_prompts(self.body.prompt, self.deployment.tokenizer)

    def response(
        self,
        generation: Generation,
        runs: list[PromptRun],
        results: list[list[GenerationDelta]],
    ) -> CompletionResponse:
        choices, completion = [], 0
        for index, (run, deltas) in enumerate(zip(runs, results, strict=True)):
            for i in range(self.n):
                mine = [d for d in deltas if d.index == i]
                completion += mine[-1].completion_tokens
                choices.append(self._choice(index * self.n + i, run, mine))
        return CompletionResponse(
            id=f"cmpl-{generation.id}",
            created=generation.created,
            model=self.body.model,
            choices=choices,
            usage=Usage.of(sum(len(run.prompt_ids) for run in runs), completion),
        )

    async def chunks(
        self, generation: Generation, runs: list[PromptRun]
    ) -> AsyncIterator[CompletionChunk]:
        tokenizer = self.deployment.tokenizer
        completion: dict[tuple[int, int], int] = {}
        offsets: dict[tuple[int, int], int] = {}  # text_offset runs on across a choice's chunks
        streams = [self._echoed(generation, run) for run in runs]
        async for index, (delta, echo) in merge(streams):
            key = (index, delta.index)
            logprobs = None
            if not echo:
                completion[key] = delta.completion_tokens
                if runs[index].params.logprobs is not None:
                    start = offsets.get(key, 0)
                    logprobs = completion_logprobs(delta.logprobs, tokenizer, start)
                    offsets[key] = start + sum(map(len, logprobs.tokens))
            choice = CompletionChoice(
                index=index * self.n + delta.index,
                text=delta.text,
                logprobs=logprobs,
                finish_reason=delta.finish_reason,
            )
            yield self._chunk(generation, [choice])
        if self.body.include_usage:
            prompt_tokens = sum(len(run.prompt_ids) for run in runs)
            yield self._chunk(generation, [], Usage.of(prompt_tokens, sum(completion.values())))

    async def _echoed(
        self, generation: Generation, run: PromptRun
    ) -> AsyncIterator[tuple[GenerationDelta, bool]]:
        """A prompt's deltas, each with whether it is the echo of the prompt (sent first)."""
        if self.body.echo:
            text = self.deployment.tokenizer.decode(run.prompt_ids)
            for choice in range(self.n):
                yield GenerationDelta(index=choice, text=text), True
        async for delta in generation.run(run.prompt_ids, run.params, self.n):
            yield delta, False

    def _choice(
        self, index: int, run: PromptRun, deltas: list[GenerationDelta]
    ) -> CompletionChoice:
        tokenizer = self.deployment.tokenizer
        text = "".join(delta.text for delta in deltas)
        if self.body.echo:
            text = tokenizer.decode(run.prompt_ids) + text
        logprobs = None
        if run.params.logprobs is not None:
            items = [item for delta in deltas for item in delta.logprobs]
            logprobs = completion_logprobs(items, tokenizer)
        return CompletionChoice(
            index=index, text=text, logprobs=logprobs, finish_reason=deltas[-1].finish_reason
        )

    def _chunk(
        self, generation: Generation, choices: list[CompletionChoice], usage: Usage | None = None
    ) -> CompletionChunk:
        return CompletionChunk(
            id=f"cmpl-{generation.id}",
            created=generation.created,
            model=self.body.model,
            choices=choices,
            usage=usage,
        )


def encode_prompts(prompt: Prompt, tokenizer: ChatTokenizer) -> list[list[int]]:
    """Each prompt as token ids, checked: not empty, in the vocabulary, at most 64."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise InvalidRequest("prompt must not be empty", param="prompt")
    if all(isinstance(t, int) for t in prompt):
        prompt = [prompt]
    if len(prompt) > MAX_PROMPTS:
        raise InvalidRequest(f"at most {MAX_PROMPTS} prompts per request", param="prompt")
    vocab = tokenizer.vocab_size
    encoded = []
    for item in prompt:
        ids = tokenizer.encode(item) if isinstance(item, str) else list(item)
        if not ids:
            raise InvalidRequest("a prompt is empty: it encodes to no tokens", param="prompt")
        if min(ids) < 0 or max(ids) >= vocab:
            raise InvalidRequest(
                f"prompt token ids must be between 0 and {vocab - 1}", param="prompt"
            )
        encoded.append(ids)
    return encoded


def completion_logprobs(
    items: tuple[TokenLogprob, ...] | list[TokenLogprob], tokenizer: ChatTokenizer, start: int = 0
) -> CompletionLogprobs:
    """OpenAI's completion logprobs; ``text_offset`` counts from ``start``."""
    tokens = [tokenizer.token_text(item.token) for item in items]
    offsets, position = [], start
    for token in tokens:
        offsets.append(position)
        position += len(token)
    return CompletionLogprobs(
        tokens=tokens,
        token_logprobs=[item.logprob for item in items],
        top_logprobs=[_top(item, tokenizer) for item in items],
        text_offset=offsets,
    )


def _top(item: TokenLogprob, tokenizer: ChatTokenizer) -> dict[str, float]:
    """Text -> logprob of the likeliest tokens; where two read the same (e.g. two partial
    characters, both U+FFFD), the likelier one is kept."""
    top: dict[str, float] = {}
    for token, logprob in item.top:
        top.setdefault(tokenizer.token_text(token), logprob)
    return top
