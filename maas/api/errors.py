"""One table from ``maas.errors`` to HTTP, and the error body each protocol expects.

``/v2/...`` (Open Inference Protocol) answers ``{"error": "message"}``; everything else answers
the OpenAI shape ``{"error": {"message", "type", "param", "code"}}``. No handler lets a stack
trace or a file path reach the client.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
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


def kind_of(err: errors.MaasError) -> ErrorKind:
    for cls in type(err).__mro__:
        if cls in ERROR_TABLE:
            return ERROR_TABLE[cls]
    return ERROR_TABLE[errors.MaasError]


def error_body(
    path: str, message: str, *, type_: str, code: str | None = None, param: str | None = None
) -> dict:
    """The error body the caller's protocol expects, chosen by the request path."""
    if path.startswith("/v2"):
        return {"error": message}
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


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


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(errors.MaasError, _maas_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
