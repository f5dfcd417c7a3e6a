"""``POST /v1/completions``: plain prompts (a string, a list, or token ids), streamed or not."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import Request, Response
from starlette.concurrency import run_in_threadpool

from maas.api.access import resolve_for
from maas.api.deps import InferenceKey
from maas.api.governance import meter
from maas.api.inference import ServingDep
from maas.api.openai.chat import _usage
from maas.api.openai.generation import (
    Generation,
    check_sequences,
    generation_router,
    generator_of,
    output_budget,
    request_id_header,
    sampling_defaults,
    sse,
    watch_disconnect,
)
from maas.api.openai.protocol import CompletionRequest
from maas.errors import InvalidRequest
from maas.messages import GenerationDelta, TokenLogprob

router = generation_router()

MAX_PROMPTS = 64
OPENAI_MAX_TOKENS = 16
"""What OpenAI's text completions produce when neither the request nor the model says."""


@router.post("/completions")
async def create_completion(
    body: CompletionRequest,
    request: Request,
    response: Response,
    key: InferenceKey,
    serving: ServingDep,
):
    body.check_honoured()
    if body.echo and body.logprobs is not None:
        raise InvalidRequest("echo together with logprobs is not supported", param="echo")
    record = resolve_for(serving.registry, key, body.model)
    deployment = generator_of(await serving.deployment(record, body.model), body.model)
    meter(request, model=deployment.record)
    n = body.n or 1
    check_sequences(_count(body.prompt) * n, serving.max_request_sequences)
    prompts = await run_in_threadpool(_prompts, body.prompt, deployment)
    defaults = sampling_defaults(serving, deployment)
    default_max = defaults.get("max_tokens", OPENAI_MAX_TOKENS)
    budgets = [
        output_budget(
            deployment, len(p), body.max_tokens, prompt_param="prompt", default=default_max
        )
        for p in prompts
    ]
    deployment.check_room(len(prompts) * n)  # 503 now, before a stream starts
    generation = Generation(request, deployment, min(body.timeout or 1e9, serving.request_timeout))
    runs = [
        (
            index,
            prompt,
            body.sampling(budget, body.logprobs, deployment.tokenizer.vocab_size, defaults),
        )
        for index, (prompt, budget) in enumerate(zip(prompts, budgets, strict=True))
    ]
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return sse(lambda: _chunks(generation, body, runs, n, usage), request)
    async with deployment.use():
        results = await watch_disconnect(
            request, asyncio.gather(*(_collect(generation, p, params, n) for _, p, params in runs))
        )
    response.headers.update(request_id_header(request))
    return _response(generation, body, runs, results, n)


def _count(prompt) -> int:
    """How many prompts a request's ``prompt`` field holds."""
    if isinstance(prompt, str) or all(isinstance(t, int) for t in prompt):
        return 1
    return len(prompt)


def _prompts(prompt, deployment) -> list[list[int]]:
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise InvalidRequest("prompt must not be empty", param="prompt")
    if all(isinstance(t, int) for t in prompt):
        prompt = [prompt]
    if len(prompt) > MAX_PROMPTS:
        raise InvalidRequest(f"at most {MAX_PROMPTS} prompts per request", param="prompt")
    vocab = deployment.tokenizer.vocab_size
    encoded = []
    for item in prompt:
        ids = deployment.tokenizer.encode(item) if isinstance(item, str) else list(item)
        if not ids:
            raise InvalidRequest("a prompt is empty: it encodes to no tokens", param="prompt")
        if min(ids) < 0 or max(ids) >= vocab:
            raise InvalidRequest(
                f"prompt token ids must be between 0 and {vocab - 1}", param="prompt"
            )
        encoded.append(ids)
    return encoded


async def _collect(generation, prompt, params, n) -> list[GenerationDelta]:
    return [delta async for delta in generation.run(prompt, params, n)]


def _response(generation, body, runs, results, n) -> dict:
    tokenizer = generation.deployment.tokenizer
    choices, completion = [], 0
    for (index, prompt, params), deltas in zip(runs, results, strict=True):
        for i in range(n):
            mine = [d for d in deltas if d.index == i]
            completion += mine[-1].completion_tokens
            text = "".join(d.text for d in mine)
            if body.echo:
                text = tokenizer.decode(prompt) + text
            logprobs = [lp for d in mine for lp in d.logprobs]
            choices.append(
                {
                    "index": index * n + i,
                    "text": text,
                    "logprobs": _logprobs(logprobs, tokenizer)
                    if params.logprobs is not None
                    else None,
                    "finish_reason": mine[-1].finish_reason,
                }
            )
    prompt_tokens = sum(len(p) for _, p, _ in runs)
    return {
        "id": f"cmpl-{generation.id}",
        "object": "text_completion",
        "created": generation.created,
        "model": body.model,
        "choices": choices,
        "usage": _usage(prompt_tokens, completion),
    }


async def _chunks(generation, body, runs, n, include_usage) -> AsyncIterator[dict]:
    tokenizer = generation.deployment.tokenizer
    queue: asyncio.Queue = asyncio.Queue()
    completion: dict[tuple[int, int], int] = {}
    offsets: dict[tuple[int, int], int] = {}  # text_offset runs on across a choice's chunks

    async def pump(index, prompt, params) -> None:
        if body.echo:
            text = tokenizer.decode(prompt)
            for choice in range(n):
                await queue.put((index, GenerationDelta(index=choice, text=text), params, True))
        async for delta in generation.run(prompt, params, n):
            await queue.put((index, delta, params, False))

    def chunk(choices: list[dict], usage: dict | None = None) -> dict:
        result = {
            "id": f"cmpl-{generation.id}",
            "object": "text_completion",
            "created": generation.created,
            "model": body.model,
            "choices": choices,
        }
        if include_usage:
            result["usage"] = usage
        return result

    async with generation.deployment.use():
        tasks = [asyncio.ensure_future(pump(*run)) for run in runs]
        try:
            pending = set(tasks)
            while pending or not queue.empty():
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait(
                    {getter, *pending}, return_when=asyncio.FIRST_COMPLETED
                )
                for task in done - {getter}:
                    pending.discard(task)
                    task.result()  # raise an engine error into the stream
                if getter not in done:
                    getter.cancel()
                    continue
                index, delta, params, echo = getter.result()
                if not echo:
                    completion[(index, delta.index)] = delta.completion_tokens
                logprobs = None
                if params.logprobs is not None and not echo:
                    start = offsets.get((index, delta.index), 0)
                    logprobs = _logprobs(delta.logprobs, tokenizer, start)
                    offsets[(index, delta.index)] = start + sum(map(len, logprobs["tokens"]))
                yield chunk(
                    [
                        {
                            "index": index * n + delta.index,
                            "text": delta.text,
                            "logprobs": logprobs,
                            "finish_reason": delta.finish_reason,
                        }
                    ]
                )
        finally:
            for task in tasks:
                task.cancel()
    if include_usage:
        prompt_tokens = sum(len(p) for _, p, _ in runs)
        yield chunk([], _usage(prompt_tokens, sum(completion.values())))


def _logprobs(
    items: tuple[TokenLogprob, ...] | list[TokenLogprob], tokenizer, start: int = 0
) -> dict:
    """OpenAI's completion logprobs; ``text_offset`` counts from ``start``."""
    tokens = [tokenizer.token_text(item.token) for item in items]
    offsets, position = [], start
    for token in tokens:
        offsets.append(position)
        position += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": [item.logprob for item in items],
        "top_logprobs": [_top(item, tokenizer) for item in items],
        "text_offset": offsets,
    }


def _top(item: TokenLogprob, tokenizer) -> dict[str, float]:
    """Text -> logprob of the likeliest tokens; where two read the same (e.g. two partial
    characters, both U+FFFD), the likelier one is kept."""
    top: dict[str, float] = {}
    for token, logprob in item.top:
        top.setdefault(tokenizer.token_text(token), logprob)
    return top
