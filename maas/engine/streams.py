"""Each request's deltas, from the thread that produces them to the event loop that awaits them.

Every back-end streams the same way. ``generate`` opens a ``DeltaStream`` in the back-end's
``DeltaStreams``; the thread that runs the model (or reads the engine process's pipe) hands
deltas to it; ``DeltaStream.follow`` submits the request and yields its deltas until all
``n`` sequences have finished. A caller that leaves early (a client gone, a cancelled task)
has the request aborted, so the engine frees its work before its next step. When an engine
stops, ``DeltaStreams.fail_all`` ends what is still open, so no caller waits forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from functools import partial

from maas.messages import EngineRequest, Failure, GenerationDelta, SamplingParams


class DeltaStream:
    """One request's deltas; ``put`` and ``fail`` may be called from any one thread."""

    def __init__(self, request: EngineRequest, on_end: Callable[[str], None]) -> None:
        self.request = request
        self.arrival = time.monotonic()
        self.left = False
        """Set once the caller stopped following, early or not: nobody reads more deltas."""
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[GenerationDelta] = asyncio.Queue()
        self._unfinished = set(range(request.n))
        """Sequences no delta has finished yet, as the producing thread has seen them."""
        self._on_end = on_end

    def put(self, delta: GenerationDelta) -> None:
        if delta.finish_reason is not None:
            self._unfinished.discard(delta.index)
        with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody listens
            self._loop.call_soon_threadsafe(self._queue.put_nowait, delta)

    def fail(self, failure: Failure) -> None:
        """End every sequence that has not finished with an error delta."""
        for index in sorted(self._unfinished):
            self.put(
                GenerationDelta(
                    index=index,
                    finish_reason="abort",
                    prompt_tokens=len(self.request.prompt_ids),
                    error=failure.message,
                    error_kind=failure.kind,
                )
            )

    async def follow(
        self,
        submit: Callable[[EngineRequest], None],
        abort: Callable[[str], None] | None = None,
    ) -> AsyncIterator[GenerationDelta]:
        """``submit`` the request, then yield its deltas until all its sequences finished.
        Leaving early calls ``abort(request_id)``; a back-end that gives none watches
        ``left`` instead."""
        finished, submitted = 0, False
        try:
            submit(self.request)
            submitted = True
            while finished < self.request.n:
                delta = await self._queue.get()
                finished += delta.finish_reason is not None
                yield delta
        finally:
            self.left = True
            self._on_end(self.request.request_id)
            if submitted and finished < self.request.n and abort is not None:
                abort(self.request.request_id)


class DeltaStreams:
    """The open streams of one engine, by request id."""

    def __init__(self) -> None:
        self._streams: dict[str, DeltaStream] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()

    def open(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        *,
        n: int,
        timeout: float | None,
        cache_salt: str = "",
    ) -> DeltaStream:
        """A new request and its stream (on the caller's event loop), open until followed to
        its end. ``timeout`` seconds from now is its deadline."""
        deadline = time.monotonic() + timeout if timeout else None
        request = EngineRequest(
            f"req-{next(self._ids)}", tuple(prompt_ids), params, n, deadline, cache_salt
        )
        stream = DeltaStream(request, self._end)
        with self._lock:
            self._streams[request.request_id] = stream
        return stream

    def get(self, request_id: str) -> DeltaStream | None:
        with self._lock:
            return self._streams.get(request_id)

    def deliver(self, request_id: str, delta: GenerationDelta) -> None:
        """Hand a delta to its stream; dropped when its caller has left."""
        stream = self.get(request_id)
        if stream is not None:
            stream.put(delta)

    def sink(self, request_id: str) -> Callable[[GenerationDelta], None]:
        """What the engine calls with each of this request's deltas."""
        return partial(self.deliver, request_id)

    def fail_all(self, failure: Failure) -> None:
        """End every open stream's unfinished sequences with ``failure``."""
        with self._lock:
            streams = list(self._streams.values())
        for stream in streams:
            stream.fail(failure)

    def _end(self, request_id: str) -> None:
        with self._lock:
            self._streams.pop(request_id, None)
