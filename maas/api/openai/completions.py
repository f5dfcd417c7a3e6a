"""``POST /v1/completions``: the route; ``serving_completion.py`` does the work."""

from __future__ import annotations

from fastapi.responses import JSONResponse, StreamingResponse

from maas.api.openai.protocol import CompletionRequest, CompletionResponse
from maas.api.openai.serving import GenerationCallDep, generation_router
from maas.api.openai.serving_completion import CompletionServing

router = generation_router()


# JSONResponse: see chat.py.
@router.post("/completions", response_model=CompletionResponse, response_class=JSONResponse)
async def create_completion(
    body: CompletionRequest, call: GenerationCallDep
) -> CompletionResponse | StreamingResponse:
    """OpenAI's text completion of one prompt or several (text or token ids), answered whole
    or streamed as server-sent events."""
    return await CompletionServing(call, body).answer()
