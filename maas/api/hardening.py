"""Request hardening in front of every route: the Host check, the body size limit, and JSON
bodies that must be text."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from maas.api import strict_json
from maas.api.errors import send_error
from maas.config import Settings
from maas.logs import RedactKeys

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def allowed_hosts(settings: Settings) -> frozenset[str] | None:
    """Host names to accept, or None to accept any."""
    extra = {host.lower() for host in settings.allowed_hosts}
    if "*" in extra:
        return None
    if settings.bound_to_loopback:
        return LOOPBACK_NAMES | extra
    return frozenset(extra) or None


def _host_name(header: str) -> str:
    if header.startswith("["):  # [::1]:8000
        return header[1:].partition("]")[0].lower()
    return header.rpartition(":")[0].lower() if header.count(":") == 1 else header.lower()


class HostCheckMiddleware:
    """Refuse requests whose Host is not ours: a page on another site that re-points its DNS
    name at 127.0.0.1 (DNS rebinding) must not reach a server bound to loopback."""

    def __init__(self, app: ASGIApp, allowed: frozenset[str]) -> None:
        self.app = app
        self.allowed = allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            if _host_name(host) not in self.allowed:
                await send_error(
                    scope,
                    send,
                    400,
                    f"Host {host!r} is not allowed; add it to MAAS_ALLOWED_HOSTS",
                    "host_not_allowed",
                )
                return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """413 for a body over the limit: at once from Content-Length, or as soon as a streamed
    body passes it (the route then sees a disconnect and its answer is replaced)."""

    def __init__(self, app: ASGIApp, limit: int, uploads: list[tuple[str, int]]) -> None:
        self.app = app
        self.limit = limit
        self.uploads = [(re.compile(path), upload_limit) for path, upload_limit in uploads]
        """(path pattern, its own limit) of the routes that take files."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = next(
            (size for path, size in self.uploads if path.fullmatch(scope["path"])), self.limit
        )
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            await _too_large(scope, send, limit)
            return
        guard = _StreamGuard(receive, send, limit)
        try:
            await self.app(scope, guard.receive, guard.send)
        except Exception:
            if not guard.too_large:
                raise
        if guard.too_large and not guard.started:
            await _too_large(scope, send, limit)


class _StreamGuard:
    """Counts body bytes as they arrive; past the limit, the app sees a disconnect and
    nothing it answers is sent."""

    def __init__(self, receive: Receive, send: Send, limit: int) -> None:
        self._receive, self._send, self._limit = receive, send, limit
        self.received = 0
        self.too_large = False
        self.started = False

    async def receive(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self._limit:
                self.too_large = True
                return {"type": "http.disconnect"}
        return message

    async def send(self, message: Message) -> None:
        if self.too_large:
            return
        self.started = self.started or message["type"] == "http.response.start"
        await self._send(message)


async def _too_large(scope: Scope, send: Send, limit: int) -> None:
    message = f"request body is over the {limit}-byte limit"
    await send_error(scope, send, 413, message, "payload_too_large")


class StrictJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = strict_json.loads(await self.body())
        return self._json


class StrictJSONRoute(APIRoute):
    """The route class of every router whose routes take a JSON body: the body is parsed by
    ``strict_json``, so text that is not Unicode is a 400 before the route runs."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict_handler(request: Request) -> Response:
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict_handler


def uvicorn_log_config(level: str = "info") -> dict:
    """uvicorn's logging set-up with API keys redacted from every line, and maas's own log
    (loads, restarts, the drain) on the same handler at ``level``."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["redact_keys"] = {"()": RedactKeys}
    for handler in config["handlers"].values():
        handler.setdefault("filters", []).append("redact_keys")
    config["loggers"]["maas"] = {
        "handlers": ["default"],
        "level": level.upper(),
        "propagate": False,
    }
    return config
