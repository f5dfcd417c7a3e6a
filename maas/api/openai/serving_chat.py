"""Chat completions: the model's chat template over the messages; the answer as a message, or
as chunks (the role first, then the text as it comes)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from maas.api.openai.generation import Generation
from maas.api.openai.protocol import (
    AssistantMessage,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatLogprobs,
    DeltaMessage,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from maas.api.openai.serving import GenerationServing, PromptRun
from maas.errors import InvalidRequest
from maas.messages import GenerationDelta
from maas.messages import TokenLogprob as EngineLogprob
from maas.routing.llm_deployment import LLMDeployment

if TYPE_CHECKING:  # the API never loads the runtime itself
    from maas.runtime.llm.tokenizer import ChatTokenizer


class ChatServing(GenerationServing[ChatCompletionRequest]):
    prompt_param = "messages"

    def check_model(self, deployment: LLMDeployment) -> None:
        if deployment.manifest.task != "chat":
            raise InvalidRequest(
                f"{self.body.model} has no chat template; send a prompt to /v1/completions",
                param="model",
            )

    def prompts(self) -> list[list[int]]:
        messages = [{"role": m.role, "content": m.text()} for m in self.body.messages]
        return [self.deployment.tokenizer.encode_chat(messages)]

    def response(
        self,
        generation: Generation,
        runs: list[PromptRun],
        results: list[list[GenerationDelta]],
    ) -> ChatCompletionResponse:
        [run], [deltas] = runs, results
        by_choice = [[d for d in deltas if d.index == index] for index in range(self.n)]
        return ChatCompletionResponse(
            id=f"chatcmpl-{generation.id}",
            created=generation.created,
            model=self.body.model,
            choices=[self._choice(index, mine) for index, mine in enumerate(by_choice)],
            usage=Usage.of(len(run.prompt_ids), sum(m[-1].completion_tokens for m in by_choice)),
        )

    async def chunks(
        self, generation: Generation, runs: list[PromptRun]
    ) -> AsyncIterator[ChatCompletionChunk]:
        [run] = runs
        for index in range(self.n):
            role = DeltaMessage(role="assistant", content="")
            yield self._chunk(generation, [ChatCompletionStreamChoice(index=index, delta=role)])
        completion = [0] * self.n
        async for delta in generation.run(run.prompt_ids, run.params, self.n):
            completion[delta.index] = delta.completion_tokens
            if delta.text or delta.finish_reason is not None or delta.logprobs:
                logprobs = None
                if run.params.logprobs is not None:
                    logprobs = self._logprobs(delta.logprobs)
                choice = ChatCompletionStreamChoice(
                    index=delta.index,
                    delta=DeltaMessage(content=delta.text or None),
                    logprobs=logprobs,
                    finish_reason=delta.finish_reason,
                )
                yield self._chunk(generation, [choice])
        if self.body.include_usage:
            usage = Usage.of(len(run.prompt_ids), sum(completion))
            yield self._chunk(generation, [], usage)

    def _choice(self, index: int, deltas: list[GenerationDelta]) -> ChatCompletionChoice:
        logprobs = [item for delta in deltas for item in delta.logprobs]
        return ChatCompletionChoice(
            index=index,
            message=AssistantMessage(content="".join(delta.text for delta in deltas)),
            logprobs=self._logprobs(logprobs) if logprobs else None,
            finish_reason=deltas[-1].finish_reason,
        )

    def _chunk(
        self,
        generation: Generation,
        choices: list[ChatCompletionStreamChoice],
        usage: Usage | None = None,
    ) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=f"chatcmpl-{generation.id}",
            created=generation.created,
            model=self.body.model,
            choices=choices,
            usage=usage,
        )

    def _logprobs(self, items: tuple[EngineLogprob, ...] | list[EngineLogprob]) -> ChatLogprobs:
        tokenizer = self.deployment.tokenizer
        return ChatLogprobs(content=[token_logprob(item, tokenizer) for item in items])


def token_logprob(item: EngineLogprob, tokenizer: ChatTokenizer) -> TokenLogprob:
    """OpenAI's chat logprob of a chosen token, with the likeliest tokens."""
    return TokenLogprob(
        token=tokenizer.token_text(item.token),
        logprob=item.logprob,
        bytes=list(tokenizer.token_bytes(item.token)),
        top_logprobs=[top_logprob(token, logprob, tokenizer) for token, logprob in item.top],
    )


def top_logprob(token: int, logprob: float, tokenizer: ChatTokenizer) -> TopLogprob:
    return TopLogprob(
        token=tokenizer.token_text(token),
        logprob=logprob,
        bytes=list(tokenizer.token_bytes(token)),
    )
