"""``TransformersGenerator``: text generation for the architectures maas's engine does not run.

Any causal LM that ``transformers`` knows runs here, on a worker thread, one request at a time
in arrival order. There is no continuous batching, so it is slower under load, but a request
is sampled, stopped and streamed exactly as on the main engine: the same ``Sequence``,
sampler and detokenizer decide every token and every delta. A request's ``n`` sequences are
the rows of one batch and share one pass over the prompt.

It is a ``GenerationEngine`` (``maas/engine/protocol.py``), like ``EngineClient``. Leaving
``generate`` early (a client disconnect) stops the request before its next token.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import abc
from collections.abc import AsyncIterator, Callable

from torch import Tensor

from maas.engine.detokenizer import Detokenizer
from maas.engine.sequence import Sequence, fail_unstarted
from maas.engine.stats import StatsObserver
from maas.engine.streams import DeltaStream, DeltaStreams
from maas.errors import Unavailable
from maas.messages import (
    DEADLINE_PASSED,
    ENGINE_STOPPED,
    MODEL_FAILED,
    MODEL_UNLOADED,
    EngineDescription,
    EngineRequest,
    EngineStats,
    EngineStop,
    Failure,
    GenerationDelta,
    SamplingParams,
)
from maas.runtime.llm.sampler import sample
from maas.runtime.llm.transformers_lm import TransformersLM

log = logging.getLogger(__name__)


class TransformersGenerator:
    def __init__(
        self,
        model: TransformersLM,
        tokenizer,
        *,
        name: str = "llm",
        on_stats: Callable[[EngineStats], None] | None = None,
    ) -> None:
        """``on_stats(EngineStats)`` is called from the worker after each step, as the
        engines do."""
        self.model = model
        self.tokenizer = tokenizer
        self.memory_bytes = model.memory_bytes
        self.max_len = model.max_len
        self.num_slots = 1
        """One request at a time (its ``n`` sequences run together)."""
        self.description = EngineDescription(runtime="transformers", dtype=model.dtype_name)
        self.stats = EngineStats()
        self.on_dead: Callable[[], None] | None = None
        self._on_stats = on_stats
        self._observer = StatsObserver()
        self._inbox: queue.SimpleQueue[EngineRequest | EngineStop] = queue.SimpleQueue()
        self._streams = DeltaStreams()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"generator-{name}", daemon=True)
        self._thread.start()

    @property
    def dead(self) -> bool:
        """The worker ended without being closed (the pool then loads the model again)."""
        return not self._thread.is_alive() and not self._stopping

    async def generate(
        self,
        prompt_ids: abc.Sequence[int],
        params: SamplingParams,
        *,
        n: int = 1,
        timeout: float | None = None,
        cache_salt: str = "",
    ) -> AsyncIterator[GenerationDelta]:
        # No abort message: the worker sees the stream's ``left`` before each token.
        stream = self._streams.open(prompt_ids, params, n=n, timeout=timeout, cache_salt=cache_salt)
        async for delta in stream.follow(self._submit):
            yield delta

    def close(self) -> None:
        """Fail what is running and waiting ("the model was unloaded") and stop the worker."""
        self._stopping = True
        self._inbox.put(EngineStop())
        self._thread.join(timeout=30)

    def _submit(self, request: EngineRequest) -> None:
        if self._stopping:
            raise Unavailable("the model is being unloaded; retry the request")
        self._inbox.put(request)

    def _run(self) -> None:
        try:
            while isinstance(request := self._inbox.get(), EngineRequest):
                stream = self._streams.get(request.request_id)
                if stream is not None:  # else its caller left before it started
                    self._serve(stream)
        finally:  # requests that raced with close(), or all of them if the worker broke
            self._streams.fail_all(MODEL_UNLOADED if self._stopping else ENGINE_STOPPED)
            if not self._stopping and self.on_dead is not None:
                self.on_dead()

    def _serve(self, stream: DeltaStream) -> None:
        """Run one request to its end: the prompt once, then one token per live sequence."""
        request = stream.request
        try:
            live = self._sequences(stream)
        except Exception:  # a request that cannot start fails alone
            log.exception("request %s could not start", request.request_id)
            fail_unstarted(stream.put, request.n, len(request.prompt_ids))
            return
        cache = None
        try:
            while live and not self._must_stop(stream, live):
                if cache is None:
                    logits, cache = self.model.prefill(list(request.prompt_ids), len(live))
                else:
                    logits = self.model.decode([s.output_ids[-1] for s in live], cache)
                live = self._advance(live, logits, cache)
                self._report(len(live))
        except Exception:  # a broken model fails its request, not the server
            log.exception("generation failed")
            _fail(live, MODEL_FAILED)
        finally:
            self._report(0)

    def _sequences(self, stream: DeltaStream) -> list[Sequence]:
        request = stream.request
        return [
            Sequence(
                request.request_id,
                index,
                list(request.prompt_ids),
                request.params,
                stream.put,
                Detokenizer(self.tokenizer, request.params.stop),
                deadline=request.deadline,
                arrival=stream.arrival,
            )
            for index in range(request.n)
        ]

    def _must_stop(self, stream: DeltaStream, live: list[Sequence]) -> bool:
        """Whether the request ends now; its sequences are failed when someone is listening."""
        if stream.left:
            return True
        if self._stopping:
            _fail(live, MODEL_UNLOADED)
            return True
        deadline = stream.request.deadline
        if deadline is not None and time.monotonic() > deadline:
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
        self._observer.running = running
        self._observer.waiting = self._inbox.qsize()
        self.stats = self._observer.take()
        if self._on_stats:
            self._on_stats(self.stats)


def _fail(sequences: list[Sequence], failure: Failure) -> None:
    for sequence in sequences:
        if sequence.finish_reason is None:
            sequence.fail(failure)
