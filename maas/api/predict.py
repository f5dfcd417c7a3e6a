"""Task-level REST: ``POST /v1/models/{m}:predict`` takes images or texts, not tensors.

JSON in the style of KServe's v1 protocol, ``{"instances": [...], "top_k": 5}``, where an
instance is a text, or an image as ``{"b64": "<base64 PNG/JPEG>"}``; or a multipart upload with
one or more ``file`` parts (images). Answers ``{"model", "predictions": [...]}``: for
classifiers each prediction is ``{"label", "score", "top_k": [{"label", "score"}]}``, for
embedding models the vector.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from maas.api import governance
from maas.api.deps import InferenceKey
from maas.api.errors import KEYED_STATUSES, error_responses
from maas.api.governance import meter
from maas.api.inference import ServingDep, serve
from maas.errors import InvalidRequest, UnsupportedFormat
from maas.routing.deployment import Deployment
from maas.tasks.classification import classify_images, classify_texts
from maas.tasks.embeddings import embed

router = APIRouter(
    prefix="/v1",
    tags=["predict"],
    dependencies=[Depends(governance.inference_key)],
    responses=error_responses("/v1", *KEYED_STATUSES, 400, 403, 404, 413),
)

MAX_INSTANCES = 2048


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    instances: list[Any] = Field(min_length=1, max_length=MAX_INSTANCES)
    top_k: int = Field(default=5, ge=1, le=1000)


PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": PredictRequest.model_json_schema()},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "array", "items": {"type": "string", "format": "binary"}},
                        "top_k": {"type": "integer", "minimum": 1, "maximum": 1000},
                    },
                }
            },
        },
    }
}
"""The body ``:predict`` reads itself (JSON, or images as multipart parts), documented by hand."""


class PredictResponse(BaseModel):
    model: str
    predictions: list[Any]


@router.post("/models/{model}:predict", openapi_extra=PREDICT_BODY)
async def predict(
    model: str, request: Request, key: InferenceKey, serving: ServingDep
) -> PredictResponse:
    body = await _read(request)
    async with serve(request, serving, key, model) as deployment:
        predictions = await _run(deployment, body)
        meter(request, items=len(body.instances))
        return PredictResponse(model=deployment.record.reference, predictions=predictions)


async def _run(deployment: Deployment, body: PredictRequest) -> list[Any]:
    task = deployment.manifest.task
    if task == "image-classification":
        images = [_image_bytes(instance, i) for i, instance in enumerate(body.instances)]
        return _predictions(await classify_images(deployment, images, body.top_k))
    texts = [_text(instance, i) for i, instance in enumerate(body.instances)]
    if task == "text-classification":
        return _predictions(await classify_texts(deployment, texts, body.top_k))
    if task == "embeddings":
        vectors, _ = await embed(deployment, texts=texts)
        return [vector.tolist() for vector in vectors]
    raise UnsupportedFormat(
        f"{deployment.record.reference} is a {task} model; send tensors to "
        f"/v2/models/{deployment.record.name}/infer instead",
        param="model",
    )


async def _read(request: Request) -> PredictRequest:
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        form = await request.form()
        files = [part for part in form.getlist("file") if hasattr(part, "read")]
        if not files:
            raise InvalidRequest("send the images as multipart parts named 'file'", param="file")
        instances = [{"bytes": await part.read()} for part in files]
        top_k = form.get("top_k", "5")
        return _validated({"instances": instances, "top_k": top_k})
    try:
        return PredictRequest.model_validate_json(await request.body())
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise InvalidRequest(f"{where}: {first['msg']}", param=where) from None


def _validated(data: dict) -> PredictRequest:
    try:
        return PredictRequest.model_validate(data)
    except ValidationError as err:
        raise InvalidRequest(str(err.errors()[0]["msg"])) from None


def _predictions(ranked: list[list[dict]]) -> list[dict]:
    return [{"label": top[0]["label"], "score": top[0]["score"], "top_k": top} for top in ranked]


def _text(instance: Any, index: int) -> str:
    if not isinstance(instance, str) or not instance:
        raise InvalidRequest(f"instance {index} should be a non-empty text", param="instances")
    return instance


def _image_bytes(instance: Any, index: int) -> bytes:
    if isinstance(instance, dict) and isinstance(instance.get("bytes"), bytes):
        return instance["bytes"]
    encoded = instance.get("b64") if isinstance(instance, dict) else None
    if not isinstance(encoded, str):
        raise InvalidRequest(
            f'instance {index} should be an image as {{"b64": "<base64 PNG or JPEG>"}}',
            param="instances",
        )
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"instance {index} is not valid base64", param="instances") from None
