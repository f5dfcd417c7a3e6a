"""Open Inference Protocol v2 inference: ``POST /v2/models/{m}[/versions/{v}]/infer``, JSON
tensors or the binary tensor data extension (what ``tritonclient.http`` sends by default)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from starlette.concurrency import run_in_threadpool

from maas.api import governance
from maas.api.deps import InferenceKey
from maas.api.errors import KEYED_STATUSES, error_responses
from maas.api.governance import meter
from maas.api.inference import ServingDep, serve
from maas.api.inference_v2 import versioned
from maas.api.v2_codec import DATATYPES, HEADER_LENGTH, encode_response, parse_request

_TENSOR = {
    "type": "object",
    "required": ["name", "shape", "datatype"],
    "properties": {
        "name": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "datatype": {"type": "string", "enum": list(DATATYPES)},
        "parameters": {"type": "object"},
        "data": {"type": "array", "description": "Row-major values, flat or nested"},
    },
}
INFER_BODY = {
    "requestBody": {
        "required": True,
        "description": "A v2 inference request. With the binary tensor data extension, the "
        "first Inference-Header-Content-Length bytes are this JSON and raw tensor data follows.",
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "parameters": {"type": "object"},
                        "inputs": {"type": "array", "items": _TENSOR},
                        "outputs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["name"],
                                "properties": {
                                    "name": {"type": "string"},
                                    "parameters": {"type": "object"},
                                },
                            },
                        },
                    },
                }
            }
        },
    }
}
"""The body ``/infer`` reads itself (it may be binary), documented by hand."""

router = APIRouter(
    prefix="/v2",
    tags=["inference v2"],
    dependencies=[Depends(governance.inference_key)],
    responses=error_responses("/v2", *KEYED_STATUSES, 400, 403, 404, 413),
)


@router.post("/models/{model}/infer", openapi_extra=INFER_BODY)
async def infer(model: str, request: Request, key: InferenceKey, serving: ServingDep) -> Response:
    return await _infer(model, request, key, serving)


@router.post("/models/{model}/versions/{version}/infer", openapi_extra=INFER_BODY)
async def infer_version(
    model: str, version: str, request: Request, key: InferenceKey, serving: ServingDep
) -> Response:
    return await _infer(versioned(model, version), request, key, serving)


async def _infer(reference, request: Request, key, serving) -> Response:
    body = await request.body()
    async with serve(request, serving, key, reference) as deployment:
        parsed = await run_in_threadpool(
            parse_request,
            body,
            request.headers.get(HEADER_LENGTH),
            deployment.inputs,
            [spec.name for spec in deployment.outputs],
        )
        outputs = await deployment.infer(parsed.inputs)
        rows = len(next(iter(parsed.inputs.values()))) if deployment.runtime.batchable else 1
        meter(request, items=rows)
        record = deployment.record
        content, headers = await run_in_threadpool(
            encode_response, record.name, str(record.version), outputs, parsed, deployment.outputs
        )
    return Response(content=content, headers=headers)
