"""``POST /v1/chat/completions``: the model's chat template, streamed or not."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import Request, Response
from starlette.concurrency import run_in_threadpool

from maas.api.access import resolve_for
from maas.api.deps import InferenceKey
from maas.api.governance import meter
from maas.api.inference import ServingDep
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
from maas.api.openai.protocol import ChatCompletionRequest
from maas.errors import InvalidRequest
from maas.messages import GenerationDelta, TokenLogprob

router = generation_router()


@router.post("/chat/completions")
async def create_chat_completion(
    body: ChatCompletionRequest,
    request: Request,
    response: Response,
    key: InferenceKey,
    serving: ServingDep,
):
    body.check_honoured()
    check_sequences(body.n or 1, serving.max_request_sequences)
    record = resolve_for(serving.registry, key, body.model)
    deployment = generator_of(await serving.deployment(record, body.model), body.model)
    meter(request, model=deployment.record)
    if deployment.manifest.task != "chat":
        raise InvalidRequest(
            f"{body.model} has no chat template; send a prompt to /v1/completions", param="model"
        )
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    prompt = await run_in_threadpool(deployment.tokenizer.encode_chat, messages)
    asked = body.max_completion_tokens or body.max_tokens
    defaults = sampling_defaults(serving, deployment)
    budget = output_budget(
        deployment,
        len(prompt),
        asked,
        prompt_param="messages",
        default=defaults.get("max_tokens"),
    )
    params = body.sampling(
        budget,
        logprobs=(body.top_logprobs or 0) if body.logprobs else None,
        vocab_size=deployment.tokenizer.vocab_size,
        defaults=defaults,
    )
    n = body.n or 1
    deployment.check_room(n)  # 503 now, before a stream starts
    generation = Generation(request, deployment, min(body.timeout or 1e9, serving.request_timeout))
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return sse(lambda: _chunks(generation, body.model, prompt, params, n, usage), request)
    async with deployment.use():
        deltas = await watch_disconnect(request, _collect(generation.run(prompt, params, n)))
    response.headers.update(request_id_header(request))
    return _response(generation, body.model, deltas, len(prompt), n, deployment.tokenizer)


async def _collect(deltas: AsyncIterator[GenerationDelta]) -> list[GenerationDelta]:
    return [delta async for delta in deltas]


def _response(generation, model, deltas, prompt_tokens, n, tokenizer) -> dict:
    choices = []
    completion_tokens = 0
    for index in range(n):
        mine = [d for d in deltas if d.index == index]
        completion_tokens += mine[-1].completion_tokens
        logprobs = [lp for d in mine for lp in d.logprobs]
        choices.append(
            {
                "index": index,
                "message": {"role": "assistant", "content": "".join(d.text for d in mine)},
                "logprobs": {"content": [_logprob(lp, tokenizer) for lp in logprobs]}
                if mine[-1].logprobs or logprobs
                else None,
                "finish_reason": mine[-1].finish_reason,
            }
        )
    return {
        "id": f"chatcmpl-{generation.id}",
        "object": "chat.completion",
        "created": generation.created,
        "model": model,
        "choices": choices,
        "usage": _usage(prompt_tokens, completion_tokens),
        "system_fingerprint": None,
    }


async def _chunks(generation, model, prompt, params, n, include_usage) -> AsyncIterator[dict]:
    def chunk(choices: list[dict], usage: dict | None = None) -> dict:
        body = {
            "id": f"chatcmpl-{generation.id}",
            "object": "chat.completion.chunk",
            "created": generation.created,
            "model": model,
            "choices": choices,
        }
        if include_usage:
            body["usage"] = usage
        return body

    for index in range(n):
        yield chunk(
            [
                {
                    "index": index,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ]
        )
    completion = [0] * n
    tokenizer = generation.deployment.tokenizer
    async with generation.deployment.use():
        async for delta in generation.run(prompt, params, n):
            completion[delta.index] = delta.completion_tokens
            if delta.text or delta.finish_reason is not None or delta.logprobs:
                logprobs = None
                if params.logprobs is not None:
                    logprobs = {"content": [_logprob(lp, tokenizer) for lp in delta.logprobs]}
                content = {"content": delta.text} if delta.text else {}
                yield chunk(
                    [
                        {
                            "index": delta.index,
                            "delta": content,
                            "logprobs": logprobs,
                            "finish_reason": delta.finish_reason,
                        }
                    ]
                )
    if include_usage:
        yield chunk([], _usage(len(prompt), sum(completion)))


def _logprob(item: TokenLogprob, tokenizer) -> dict:
    def entry(token: int, logprob: float) -> dict:
        text = tokenizer.token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(tokenizer.token_bytes(token))}

    return {**entry(item.token, item.logprob), "top_logprobs": [entry(t, lp) for t, lp in item.top]}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
