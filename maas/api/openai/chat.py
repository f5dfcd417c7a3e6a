"""``POST /v1/chat/completions``: the route; ``serving_chat.py`` does the work."""

from __future__ import annotations

from fastapi.responses import JSONResponse, StreamingResponse

from maas.api.openai.protocol import ChatCompletionRequest, ChatCompletionResponse
from maas.api.openai.serving import GenerationCallDep, generation_router
from maas.api.openai.serving_chat import ChatServing

router = generation_router()


# JSONResponse renders the answer with json.dumps, as before the response model was declared
# (Pydantic's own JSON writes a float such as 1e-05 as 0.00001).
@router.post(
    "/chat/completions", response_model=ChatCompletionResponse, response_class=JSONResponse
)
async def create_chat_completion(
    body: ChatCompletionRequest, call: GenerationCallDep
) -> ChatCompletionResponse | StreamingResponse:
    """OpenAI's chat completion: the model's chat template over the messages, answered whole
    or streamed as server-sent events."""
    return await ChatServing(call, body).answer()
