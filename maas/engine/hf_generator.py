"""``TransformersGenerator``: text generation for the architectures maas's engine does not run.

Any causal LM that ``transformers`` knows runs here, on a worker thread, one request at a time
in arrival order. There is no continuous batching, so it is slower under load, but a request
is sampled, stopped and streamed exactly as on the main engine: the same ``Sequence``,
sampler and detokenizer decide every token and every delta. A request's ``n`` sequences are
the rows of one batch and share one pass over the prompt.

It has ``EngineClient``'s surface: ``generate``, ``close``, ``dead`` and ``stats``. Leaving
``generate`` early (a client disconnect) stops the request before its next token.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from torch import Tensor

from maas.engine.detokenizer import Detokenizer
from maas.engine.sequence import Sequence, fail_unstarted
from maas.engine.stats import EngineStats, StatsObserver
from maas.errors import Unavailable
from maas.messages import (
    DEADLINE_PASSED,
    MODEL_FAILED,
    MODEL_UNLOADED,
    Failure,
    GenerationDelta,
    SamplingParams,
)
from maas.runtime.llm.sampler import sample
from maas.runtime.llm.transformers_lm import TransformersLM

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    n: int
    sink: Callable[[GenerationDelta], None]
    deadline: float | None
    arrival: float = field(default_factory=time.monotonic)
    cancelled: threading.Event = field(default_factory=threading.Event)
    """Set when the caller stopped listening: the request ends before its next token."""


class TransformersGenerator:
    def __init__(
        self,
        model: TransformersLM,
        tokenizer,
        *,
        name: str = "llm",
        on_stats: Callable[[EngineStats], None] | None = None,
    ) -> None:
        """``on_stats(EngineStats)`` is called after each step, as the engines do."""
        self.model = model
        self.tokenizer = tokenizer
        self.stats: EngineStats | None = None
        self._on_stats = on_stats
        self._observer = StatsObserver()
        self._inbox: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._ids = itertools.count()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"generator-{name}", daemon=True)
        self._thread.start()

    @property
    def dead(self) -> bool:
        """The worker ended without being closed (the pool then loads the model again)."""
        return not self._thread.is_alive() and not self._stopping

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
        request = _Request(
            f"req-{next(self._ids)}",
            list(prompt_ids),
            params,
            n,
            lambda delta: loop.call_soon_threadsafe(deltas.put_nowait, delta),
            deadline=time.monotonic() + timeout if timeout else None,
        )
        self._inbox.put(request)
        finished = 0
        try:
            while finished < n:
                delta = await deltas.get()
                finished += delta.finish_reason is not None
                yield delta
        finally:
            if finished < n:
                request.cancelled.set()

    def close(self) -> None:
        """Fail what is running and waiting ("the model was unloaded") and stop the worker."""
        self._stopping = True
        self._inbox.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while (request := self._inbox.get()) is not None:
            self._serve(request)
        while True:  # requests that raced with close()
            try:
                request = self._inbox.get_nowait()
            except queue.Empty:
                return
            if request is not None:
                _fail(self._sequences(request), MODEL_UNLOADED)

    def _serve(self, request: _Request) -> None:
        """Run one request to its end: the prompt once, then one token per live sequence."""
        try:
            live = self._sequences(request)
        except Exception:  # a request that cannot start fails alone
            log.exception("request %s could not start", request.request_id)
            fail_unstarted(request.sink, request.n, len(request.prompt_ids))
            return
        cache = None
        try:
            while live and not self._must_stop(request, live):
                if cache is None:
                    logits, cache = self.model.prefill(request.prompt_ids, len(live))
                else:
                    logits = self.model.decode([s.output_ids[-1] for s in live], cache)
                live = self._advance(live, logits, cache)
                self._report(len(live))
        except Exception:  # a broken model fails its request, not the server
            log.exception("generation failed")
            _fail(live, MODEL_FAILED)
        finally:
            self._report(0)

    def _sequences(self, request: _Request) -> list[Sequence]:
        return [
            Sequence(
                request.request_id,
                index,
                request.prompt_ids,
                request.params,
                request.sink,
                Detokenizer(self.tokenizer, request.params.stop),
                deadline=request.deadline,
                arrival=request.arrival,
            )
            for index in range(request.n)
        ]

    def _must_stop(self, request: _Request, live: list[Sequence]) -> bool:
        """Whether the request ends now; its sequences are failed when someone is listening."""
        if request.cancelled.is_set():
            return True
        if self._stopping:
            _fail(live, MODEL_UNLOADED)
            return True
        if request.deadline is not None and time.monotonic() > request.deadline:
            _fail(live, DEADLINE_PASSED)
            return True
        return False

    def _advance(self, live: list[Sequence], logits: Tensor, cache) -> list[Sequence]:
        """Sample a token for each live sequence; return those still going."""
        eos = self.tokenizer.eos_token_ids
        picks = sample(logits, [sequence.sample_row(eos) for sequence in live])
        for sequence, picked in zip(live, picks, strict=True):
            sequence.append(picked, eos, self.model.max_len)
            self._observer.on_token(sequence)
            if sequence.finish_reason is not None:
                self._observer.on_finish(sequence)
        going = [i for i, sequence in enumerate(live) if sequence.finish_reason is None]
        if going and len(going) < len(live):
            self.model.keep_rows(cache, going)
        return [live[i] for i in going]

    def _report(self, running: int) -> None:
        self._observer.stats.running = running
        self._observer.stats.waiting = self._inbox.qsize()
        self.stats = self._observer.take()
        if self._on_stats:
            self._on_stats(self.stats)


def _fail(sequences: list[Sequence], failure: Failure) -> None:
    for sequence in sequences:
        if sequence.finish_reason is None:
            sequence.fail(failure)
