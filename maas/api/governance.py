"""Every request's governance: authenticate the key, admit it under its limits, meter it.

The dependencies run before a route; ``GovernanceMiddleware`` runs around the whole response
(streams included), so a request's concurrency slot is released and its usage recorded only
when the last byte is sent, also when the client goes away.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from maas.auth import policy
from maas.auth.principal import Principal, Role
from maas.errors import Unauthenticated
from maas.messages import UsageEvent
from maas.registry import VersionRecord

KEY_IN_URL = re.compile(r"maas-[a-z0-9]{12}_")
KEY_PARAMS = frozenset({"api_key", "api-key", "apikey", "key", "token", "access_token"})


@dataclass
class Usage:
    """What a route reports about the work a request did, for metering and token limits."""

    model: VersionRecord | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    items: int = 0


def meter(request: Request, **fields: object) -> Usage:
    """Set usage fields of this request (model=, prompt_tokens=, completion_tokens=, items=)."""
    usage = getattr(request.state, "usage", None) or Usage()
    for name, value in fields.items():
        setattr(usage, name, value)
    request.state.usage = usage
    return usage


async def authenticate(request: Request) -> Principal:
    """The caller's principal from ``Authorization: Bearer maas-...``; 401 otherwise."""
    for name, value in request.query_params.multi_items():
        if name.lower() in KEY_PARAMS or KEY_IN_URL.match(value):
            raise Unauthenticated(
                "API keys in the URL are refused (they end up in logs); "
                "send them as 'Authorization: Bearer <key>'"
            )
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("missing API key; send 'Authorization: Bearer <key>'")
    authenticator = request.app.state.authenticator
    token = token.strip()
    principal = authenticator.cached(token) or await run_in_threadpool(
        authenticator.authenticate, token
    )
    request.state.principal = principal
    return principal


async def admit(request: Request, principal: Principal, *, uses_tokens: bool) -> None:
    """Admit the request once, however many dependencies ask: a second admission would take
    a second concurrency slot that is never given back."""
    limiter = request.app.state.limiter
    if uses_tokens and limiter.needs_budget(principal):
        await run_in_threadpool(limiter.load_budget, principal)
    admitted = getattr(request.state, "admission", None)
    if admitted is None:
        request.state.admission = limiter.admit(principal, uses_tokens=uses_tokens)
    elif uses_tokens:
        limiter.check_tokens(principal)


async def current_key(request: Request) -> Principal:
    """Any valid key, admitted under its request and concurrency limits."""
    principal = await authenticate(request)
    await admit(request, principal, uses_tokens=False)
    return principal


async def inference_key(request: Request) -> Principal:
    """As ``current_key``, and also under the key's token limits and monthly budget."""
    principal = await authenticate(request)
    await admit(request, principal, uses_tokens=True)
    return principal


def role_key(role: Role):
    """A dependency admitting keys of ``role`` or above (403 for the rest)."""

    async def dependency(principal: Principal = Depends(current_key)) -> Principal:
        policy.require_role(principal, role)
        return principal

    dependency.__name__ = f"{role.value}_key"
    return dependency


maintainer_key = role_key(Role.maintainer)
admin_key = role_key(Role.admin)


CLIENT_CLOSED_REQUEST = 499
"""Status recorded for a request whose client hung up before the answer began."""


class GovernanceMiddleware:
    """Adds ``x-ratelimit-*`` headers, then releases and meters each admitted request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        started = time.perf_counter()
        status = None
        limiter = scope["app"].state.limiter

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                principal = state.get("principal")
                if principal is not None and "admission" in state:
                    headers = list(message.get("headers", []))
                    for name, value in limiter.headers(principal).items():
                        headers.append((f"x-ratelimit-{name}".encode(), value.encode()))
                    message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except asyncio.CancelledError:
            if status is None:  # no answer started: the client went away (nginx's 499)
                status = CLIENT_CLOSED_REQUEST
            raise
        finally:
            self._finish(scope, state, status or 500, time.perf_counter() - started)

    @staticmethod
    def _finish(scope: Scope, state: dict, status: int, seconds: float) -> None:
        app_state = scope["app"].state
        principal: Principal | None = state.get("principal")
        if principal is None:
            return
        if (admission := state.get("admission")) is not None:
            app_state.limiter.release(admission)
        usage: Usage = state.get("usage") or Usage()
        cost = None  # only successful inference requests are charged, as maas costs counts
        if usage.model is not None and status < 400:
            cost = app_state.prices.cost(
                usage.model.name,
                usage.model.version,
                usage.prompt_tokens,
                usage.completion_tokens,
                usage.items,
            )
        tokens = usage.prompt_tokens + usage.completion_tokens
        app_state.limiter.charge(principal, tokens, cost or 0.0)
        route = getattr(scope.get("route"), "path", "unmatched")
        app_state.recorder.record(
            UsageEvent(
                at=datetime.now(UTC),
                key_id=principal.key_id,
                tenant=principal.tenant,
                industry=principal.industry,
                model=usage.model.name if usage.model else None,
                version=usage.model.version if usage.model else None,
                endpoint=f"{scope['method']} {route}",
                status=status,
                latency_ms=seconds * 1000,
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                items=usage.items,
                cost=cost,
            )
        )
