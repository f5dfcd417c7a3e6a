"""``EngineClient``: maas's engine on a thread of the server, as a ``GenerationEngine``.

The event loop never runs the model. Requests, aborts and the stop go to the engine thread
through an inbox, as the same messages the engine process gets over its pipe; each request's
deltas come back on its own stream (``maas/engine/streams.py``).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import AsyncIterator, Callable, Sequence

from maas.engine import driver
from maas.engine.llm_engine import LLMEngine
from maas.engine.streams import DeltaStreams
from maas.errors import Unavailable
from maas.messages import (
    ENGINE_STOPPED,
    MODEL_UNLOADED,
    EngineAbort,
    EngineMessage,
    EngineRequest,
    EngineStats,
    EngineStop,
    GenerationDelta,
    SamplingParams,
)


class EngineClient:
    def __init__(
        self,
        engine: LLMEngine,
        name: str = "llm",
        on_stats: Callable[[EngineStats], None] | None = None,
    ) -> None:
        """``on_stats(EngineStats)`` is called from the engine thread after each step. The
        engine gets a ``StatsObserver`` if it has no observer."""
        self.engine = engine
        ready = driver.engine_ready(engine)
        self.memory_bytes = ready.memory_bytes
        self.max_len = ready.max_len
        self.num_slots = ready.num_slots
        self.description = ready.description
        self.stats = EngineStats()
        self.on_dead: Callable[[], None] | None = None
        self._observer = driver.observed(engine)
        self._on_stats = on_stats
        self._inbox: queue.SimpleQueue[EngineMessage] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams = DeltaStreams()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"engine-{name}", daemon=True)
        self._thread.start()

    @property
    def dead(self) -> bool:
        """The engine thread ended without being closed."""
        return not self._thread.is_alive() and not self._stopping

    async def generate(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        *,
        n: int = 1,
        timeout: float | None = None,
        cache_salt: str = "",
    ) -> AsyncIterator[GenerationDelta]:
        stream = self._streams.open(prompt_ids, params, n=n, timeout=timeout, cache_salt=cache_salt)
        async for delta in stream.follow(self._submit, self._abort):
            yield delta

    def close(self) -> None:
        """Fail what is running and waiting ("the model was unloaded") and stop the thread."""
        self._stopping = True
        self._send(EngineStop())
        self._thread.join(timeout=30)

    def _submit(self, request: EngineRequest) -> None:
        if self._stopping:
            raise Unavailable("the model is being unloaded; retry the request")
        self._send(request)

    def _abort(self, request_id: str) -> None:
        self._send(EngineAbort(request_id))

    def _send(self, message: EngineMessage) -> None:
        self._inbox.put(message)
        self._wake.set()

    def _run(self) -> None:
        try:
            self._serve()
        finally:  # requests that raced with close(), or all of them if the thread broke
            self._streams.fail_all(MODEL_UNLOADED if self._stopping else ENGINE_STOPPED)
            if not self._stopping and self.on_dead is not None:
                self.on_dead()

    def _serve(self) -> None:
        while True:
            messages = self._take_messages()
            if not all(driver.apply(self.engine, m, self._streams.sink) for m in messages):
                self.engine.fail_all(MODEL_UNLOADED)
                return
            if self.engine.has_work():
                driver.step(self.engine)
                self._report(stepped=True)
            elif messages:
                self._report(stepped=False)
            else:
                self._wake.wait(timeout=1.0)
                self._wake.clear()

    def _take_messages(self) -> list[EngineMessage]:
        messages = []
        while True:
            try:
                messages.append(self._inbox.get_nowait())
            except queue.Empty:
                return messages

    def _report(self, *, stepped: bool) -> None:
        self.stats = driver.report(self.engine, self._observer, stepped=stepped)
        if self._on_stats:
            self._on_stats(self.stats)
