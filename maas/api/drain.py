"""Graceful shutdown: drain on the first SIGTERM, stop at once on the second.

The first SIGTERM (or Ctrl-C) starts draining: ``/v2/health/ready`` turns 503 so that a load
balancer stops sending traffic, new requests get 503 with ``Retry-After`` (the connection
stays open, so nothing is refused at the TCP level), and requests already running, streams
included, finish. Once none is left, or ``MAAS_SHUTDOWN_TIMEOUT`` has passed, the server stops
as usual: engines are closed and usage records flushed, and the process exits with status 0.
A second signal ends the wait at once.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from types import FrameType

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from maas.api.errors import send_error

log = logging.getLogger(__name__)

HEALTH_PREFIX = "/v2/health/"
RETRY_AFTER_S = 5
"""What a request refused while draining is told: another replica, or this one restarted,
should take it by then."""
CANCEL_AFTER_S = 1.0
"""How long uvicorn's own shutdown waits for what is left after the drain."""


class Drain:
    """The server's drain state, shared by the server, the middleware and readiness."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.in_flight = 0
        """HTTP requests running now (health checks not counted)."""
        self.deadline: float | None = None

    @property
    def draining(self) -> bool:
        return self.deadline is not None

    def start(self) -> None:
        if self.deadline is None:
            self.deadline = time.monotonic() + self.timeout

    def stop_now(self) -> None:
        self.deadline = time.monotonic()

    def finished(self) -> bool:
        """Draining, and nothing left to wait for."""
        return self.draining and (self.in_flight == 0 or time.monotonic() >= self.deadline)


class DrainMiddleware:
    """Counts running requests; while draining, answers new ones 503 with Retry-After."""

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(HEALTH_PREFIX):
            await self.app(scope, receive, send)
            return
        if self.drain.draining:
            await send_error(
                scope,
                send,
                503,
                "the server is shutting down; retry the request",
                "service_unavailable",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
            return
        started = False

        async def watched_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        self.drain.in_flight += 1
        try:
            await self.app(scope, receive, watched_send)
        except asyncio.CancelledError:
            if not self.drain.finished():
                raise
            # cut off at the drain's timeout: expected, so one line instead of a traceback
            log.warning("%s %s cut off at the shutdown timeout", scope["method"], scope["path"])
            if not started:
                message = "the server shut down before the request finished; retry it"
                await send_error(scope, send, 503, message, "service_unavailable")
        finally:
            self.drain.in_flight -= 1


class DrainingServer(uvicorn.Server):
    """uvicorn's server, with a drain before its shutdown and exit status 0 after it."""

    def __init__(
        self, config: uvicorn.Config, drain: Drain, on_started: Callable[[], None] | None = None
    ) -> None:
        super().__init__(config)
        self.drain = drain
        self.on_started = on_started
        """Called once the sockets are bound."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self.on_started is not None:
            self.on_started()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not recorded in _captured_signals: uvicorn would raise it again after shutdown,
        # and the process would end with 128 + 15 instead of 0.
        if self.drain.draining:
            log.warning("second stop signal: stopping now")
            self.drain.stop_now()
            self.force_exit = self.should_exit  # already shutting down: skip what is left
            return
        log.info(
            "stop signal: draining %d running request(s) for up to %.0fs; "
            "not ready meanwhile (a second signal stops at once)",
            self.drain.in_flight,
            self.drain.timeout,
        )
        self.drain.start()

    async def on_tick(self, counter: int) -> bool:
        if self.drain.finished() and not self.should_exit:
            if self.drain.in_flight:
                log.warning("drain over: cancelling %d request(s)", self.drain.in_flight)
            self.config.timeout_graceful_shutdown = CANCEL_AFTER_S
            self.should_exit = True
        return await super().on_tick(counter)
