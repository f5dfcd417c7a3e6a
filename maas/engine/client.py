"""``EngineClient``: the engine on its own thread, and async generators for the API.

The event loop never runs the model. Requests and aborts go to the engine thread through an
inbox; each request's output comes back on its own asyncio queue. Leaving the generator early
(a client disconnect, a cancelled task) aborts the request, which frees its KV slot at once.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator

from maas.engine.llm_engine import LLMEngine
from maas.errors import Unavailable
from maas.messages import (
    MODEL_FAILED,
    MODEL_UNLOADED,
    EngineRequest,
    GenerationDelta,
    SamplingParams,
)

log = logging.getLogger(__name__)


class EngineClient:
    def __init__(self, engine: LLMEngine, name: str = "llm", on_stats=None) -> None:
        """``on_stats(EngineStats)`` is called after each step when the engine's observer is
        a ``StatsObserver``."""
        self.engine = engine
        self._on_stats = on_stats
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopping = False
        self._ids = itertools.count()
        self.dead = False
        self.stats = None
        self._thread = threading.Thread(target=self._run, name=f"engine-{name}", daemon=True)
        self._thread.start()

    async def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        *,
        n: int = 1,
        timeout: float | None = None,
    ) -> AsyncIterator[GenerationDelta]:
        """Deltas of all ``n`` sequences as they come, until each has finished."""
        if self._stopping:
            raise Unavailable("the model is being unloaded")
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue[GenerationDelta] = asyncio.Queue()
        request_id = f"req-{next(self._ids)}"
        request = EngineRequest(
            request_id,
            tuple(prompt_ids),
            params,
            n,
            deadline=time.monotonic() + timeout if timeout else None,
        )
        sink = lambda delta: loop.call_soon_threadsafe(deltas.put_nowait, delta)  # noqa: E731
        self._send(("add", (request, sink)))
        finished = 0
        try:
            while finished < n:
                delta = await deltas.get()
                finished += delta.finish_reason is not None
                yield delta
        finally:
            if finished < n:
                self._send(("abort", request_id))

    def close(self) -> None:
        self._stopping = True
        self._send(("stop", None))
        self._thread.join(timeout=30)

    def _send(self, message: tuple) -> None:
        self._inbox.put(message)
        self._wake.set()

    def _run(self) -> None:
        while True:
            if not self._drain():
                return
            if not self.engine.has_work():
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            try:
                self.engine.step()
            except Exception:  # a broken step fails its requests, not the server
                log.exception("engine step failed")
                self.engine.fail_all(MODEL_FAILED)
            if self.engine.observer is not None:
                self.stats = self.engine.observer.take()
                if self._on_stats:
                    self._on_stats(self.stats)

    def _drain(self) -> bool:
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                return True
            if kind == "add":
                self.engine.add_request(*payload)
            elif kind == "abort":
                self.engine.abort(payload)
            elif kind == "stop":
                self.engine.fail_all(MODEL_UNLOADED)
                return False
