"""``POST /v1/embeddings`` in the OpenAI shape."""

from __future__ import annotations

import base64
from typing import Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from maas.api import governance
from maas.api.deps import InferenceKey
from maas.api.errors import KEYED_STATUSES, error_responses
from maas.api.governance import meter
from maas.api.hardening import StrictJSONRoute
from maas.api.inference import ServingDep, serve
from maas.errors import InvalidRequest
from maas.tasks.embeddings import dimension, embed

router = APIRouter(
    prefix="/v1",
    tags=["openai"],
    dependencies=[Depends(governance.inference_key)],
    responses=error_responses("/v1", *KEYED_STATUSES, 400, 403, 404, 413),
    route_class=StrictJSONRoute,
)

MAX_INPUTS = 2048


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] | None = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


@router.post("/embeddings")
async def create_embeddings(
    body: EmbeddingRequest, request: Request, key: InferenceKey, serving: ServingDep
) -> EmbeddingList:
    texts, token_ids = _inputs(body.input)
    async with serve(request, serving, key, body.model) as deployment:
        if deployment.manifest.task != "embeddings":
            raise InvalidRequest(
                f"{body.model} is a {deployment.manifest.task} model, not an embedding model",
                param="model",
            )
        native = dimension(deployment)
        if body.dimensions is not None and body.dimensions != native:
            raise InvalidRequest(
                f"{body.model} makes {native}-dimensional embeddings and cannot shorten them; "
                "leave out 'dimensions'",
                param="dimensions",
            )
        vectors, tokens = await embed(deployment, texts=texts, token_ids=token_ids)
        meter(request, prompt_tokens=tokens, items=len(vectors))
    data = [
        Embedding(index=i, embedding=_encoded(v, body.encoding_format))
        for i, v in enumerate(vectors)
    ]
    return EmbeddingList(
        data=data, model=body.model, usage=Usage(prompt_tokens=tokens, total_tokens=tokens)
    )


def _inputs(value) -> tuple[list[str] | None, list[list[int]] | None]:
    """Texts, or token id lists, checked the way OpenAI checks them."""
    if isinstance(value, str):
        value = [value]
    if not value:
        raise InvalidRequest("'input' must not be empty", param="input")
    if len(value) > MAX_INPUTS:
        raise InvalidRequest(f"'input' has more than {MAX_INPUTS} items", param="input")
    if all(isinstance(item, int) for item in value):
        return None, [value]
    if all(isinstance(item, list) for item in value):
        return None, value
    if all(isinstance(item, str) for item in value):
        if any(not item for item in value):
            raise InvalidRequest("'input' must not contain empty strings", param="input")
        return value, None
    raise InvalidRequest(
        "'input' must be a string, a list of strings or of token ids", param="input"
    )


def _encoded(vector, encoding_format: str | None) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode()
    return vector.tolist()
