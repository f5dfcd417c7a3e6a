"""One table from ``maas.errors`` to HTTP, and the error body each protocol expects.

``/v2/...`` (Open Inference Protocol) answers ``{"error": "message"}`` (``V2ErrorBody``);
everything else answers the OpenAI shape ``{"error": {"message", "type", "param", "code"}}``
(``OpenAIErrorBody``). No handler lets a stack trace or a file path reach the client.

The OpenAPI schema says the same: each route lists the error statuses it can answer, made by
``error_responses`` from one table of descriptions, with the body its protocol uses.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Message, Scope, Send

from maas import errors

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ErrorKind:
    status: int
    type: str
    """OpenAI error ``type``."""
    code: str | None = None
    """OpenAI error ``code``."""


ERROR_TABLE: dict[type[errors.MaasError], ErrorKind] = {
    errors.InvalidRequest: ErrorKind(400, "invalid_request_error"),
    errors.InvalidName: ErrorKind(400, "invalid_request_error", "invalid_name"),
    errors.InvalidReference: ErrorKind(400, "invalid_request_error", "invalid_model_reference"),
    errors.UnsupportedFormat: ErrorKind(400, "invalid_request_error", "unsupported_format"),
    errors.RefusedArtifact: ErrorKind(400, "invalid_request_error", "refused_artifact"),
    errors.UnsafeArchive: ErrorKind(400, "invalid_request_error", "unsafe_archive"),
    errors.NotFound: ErrorKind(404, "not_found_error"),
    errors.ModelNotFound: ErrorKind(404, "invalid_request_error", "model_not_found"),
    errors.VersionNotFound: ErrorKind(404, "invalid_request_error", "model_not_found"),
    errors.AliasNotFound: ErrorKind(404, "invalid_request_error", "model_not_found"),
    errors.Unauthenticated: ErrorKind(401, "authentication_error", "invalid_api_key"),
    errors.PermissionDenied: ErrorKind(403, "permission_error", "permission_denied"),
    errors.Conflict: ErrorKind(409, "invalid_request_error", "conflict"),
    errors.RateLimited: ErrorKind(429, "rate_limit_error", "rate_limit_exceeded"),
    errors.QuotaExceeded: ErrorKind(429, "insufficient_quota", "insufficient_quota"),
    errors.PayloadTooLarge: ErrorKind(413, "invalid_request_error", "payload_too_large"),
    errors.ArtifactCorrupted: ErrorKind(500, "server_error", "artifact_corrupted"),
    # nginx's "client closed request": never seen by the client, but metered and logged as such
    errors.ClientGone: ErrorKind(499, "client_closed_request"),
    errors.Unavailable: ErrorKind(503, "server_error", "service_unavailable"),
    errors.TimedOut: ErrorKind(504, "server_error", "timeout"),
    errors.ContextTooLong: ErrorKind(400, "invalid_request_error", "context_length_exceeded"),
    errors.MaasError: ErrorKind(500, "server_error"),
}

HTTP_KINDS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    """The request field the error is about, when there is one."""
    code: str | None


class OpenAIErrorBody(BaseModel):
    """The error body everywhere but under ``/v2`` (OpenAI's shape)."""

    error: OpenAIErrorDetail


class V2ErrorBody(BaseModel):
    """The error body under ``/v2`` (the Open Inference Protocol's shape)."""

    error: str


ERROR_DESCRIPTIONS: dict[int, str] = {
    400: "The request is malformed: bad JSON, a field missing, of the wrong type or out of "
    "range, a bad name or model reference, input the model cannot take",
    401: "No API key, or one that is unknown, revoked or expired",
    403: "The key's role or allowed models do not cover this request",
    404: "The model, version, alias, tenant or key does not exist, or this key cannot see it",
    409: "The request clashes with what exists: a name taken, an alias still pointing at the "
    "version, a pinned model, an alias target that failed to load",
    413: "The request body is over the limit (MAAS_MAX_REQUEST_BYTES, MAAS_MAX_UPLOAD_BYTES)",
    429: "A limit of the key is reached (requests, tokens or concurrency per minute, or the "
    "monthly token budget); Retry-After says when to try again",
    503: "The server is shutting down, or the model is loading, restarting, at capacity or "
    "failed to load; Retry-After says when to try again, when that is known",
    504: "The generation passed its deadline (MAAS_REQUEST_TIMEOUT_S or the request's timeout)",
}
"""Every error status a route documents, and what it means."""

RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before trying again",
        "schema": {"type": "integer"},
    }
}
ERROR_HEADERS: dict[int, dict[str, Any]] = {429: RETRY_AFTER, 503: RETRY_AFTER}

KEYED_STATUSES = (401, 429, 503)
"""What every route behind a key can answer: the key refused, one of its limits reached, the
server draining."""


def is_v2(path: str) -> bool:
    """Whether a path speaks the Open Inference Protocol (and its error body)."""
    return path.startswith("/v2")


def error_responses(prefix: str, *statuses: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses=`` of a router or route under ``prefix`` that answers ``statuses``:
    each with its description and the error body of the prefix's protocol."""
    body = V2ErrorBody if is_v2(prefix) else OpenAIErrorBody
    return {
        status: {
            "model": body,
            "description": ERROR_DESCRIPTIONS[status],
            **({"headers": ERROR_HEADERS[status]} if status in ERROR_HEADERS else {}),
        }
        for status in statuses
    }


def kind_of(err: errors.MaasError) -> ErrorKind:
    for cls in type(err).__mro__:
        if cls in ERROR_TABLE:
            return ERROR_TABLE[cls]
    return ERROR_TABLE[errors.MaasError]


def error_body(
    path: str, message: str, *, type_: str, code: str | None = None, param: str | None = None
) -> dict:
    """The error body the caller's protocol expects, chosen by the request path."""
    if is_v2(path):
        return V2ErrorBody(error=message).model_dump()
    detail = OpenAIErrorDetail(message=message, type=type_, param=param, code=code)
    return OpenAIErrorBody(error=detail).model_dump()


def error_response(
    request: Request,
    status: int,
    message: str,
    *,
    type_: str,
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = error_body(request.url.path, message, type_=type_, code=code, param=param)
    return JSONResponse(body, status_code=status, headers=headers)


async def send_error(
    scope: Scope,
    send: Send,
    status: int,
    message: str,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> None:
    """Answer from ASGI middleware, before any route runs, in the protocol's error shape."""
    type_ = HTTP_KINDS.get(status, "server_error" if status >= 500 else "invalid_request_error")
    body = error_body(scope["path"], message, type_=type_, code=code)
    await JSONResponse(body, status_code=status, headers=headers)(scope, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


def _headers_of(err: errors.MaasError) -> dict[str, str] | None:
    if isinstance(err, errors.Unauthenticated):
        return {"WWW-Authenticate": "Bearer"}
    if isinstance(err, errors.Unavailable) and err.retry_after is not None:
        return {"Retry-After": str(max(1, math.ceil(err.retry_after)))}
    if isinstance(err, errors.RateLimited):
        headers = {"Retry-After": str(max(1, math.ceil(err.retry_after)))}
        headers |= {f"x-ratelimit-{name}": value for name, value in err.state.items()}
        return headers
    return None


async def _maas_error(request: Request, err: errors.MaasError) -> JSONResponse:
    kind = kind_of(err)
    if kind.status >= 500:
        log.error("%s %s failed: %s", request.method, request.url.path, err.message)
    return error_response(
        request,
        kind.status,
        err.message,
        type_=kind.type,
        code=kind.code,
        param=err.param,
        headers=_headers_of(err),
    )


async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
    first = err.errors()[0] if err.errors() else {"loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":  # its location is a character offset, not a field
        reason = first.get("ctx", {}).get("error", first["msg"])
        message = f"the body is not valid JSON: {reason}"
        return error_response(request, 400, message, type_="invalid_request_error")
    location = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path")]
    param = ".".join(location) or None
    message = f"{param}: {first['msg']}" if param else str(first["msg"])
    return error_response(request, 400, message, type_="invalid_request_error", param=param)


async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    if err.status_code == 404 and err.detail == "Not Found":
        message = f"no route for {request.method} {request.url.path}"
    else:
        message = str(err.detail)
    return error_response(
        request,
        err.status_code,
        message,
        type_=HTTP_KINDS.get(
            err.status_code, "server_error" if err.status_code >= 500 else "invalid_request_error"
        ),
        headers=getattr(err, "headers", None),
    )


async def _unexpected_error(request: Request, err: Exception) -> JSONResponse:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return error_response(
        request, 500, "internal server error; the server log has the details", type_="server_error"
    )


def _openapi_without_422(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """``app.openapi`` without the 422 FastAPI documents for every route with parameters:
    validation errors are answered 400 here (``_validation_error``), which routes document."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()  # cached by FastAPI as app.openapi_schema
            for operations in schema["paths"].values():
                for operation in operations.values():
                    operation["responses"].pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
        return app.openapi_schema

    return openapi


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(errors.MaasError, _maas_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
    app.openapi = _openapi_without_422(app)
