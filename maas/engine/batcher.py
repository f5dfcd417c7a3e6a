"""Dynamic batching for classic models.

Requests arrive as *chunks* (a request's rows: one per image, sentence or tensor row). The
batcher gathers chunks until a batch holds ``max_batch_size`` rows or the oldest chunk has
waited ``max_delay`` for company, runs the batch as one forward pass in a worker thread, and
hands each chunk its own slice of the result. One batch runs at a time per model; what
arrives meanwhile forms the next batch, so under load batches fill up on their own.

If a batch fails, each of its chunks is run again on its own, so one bad request fails alone.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from maas.errors import Overloaded, Unavailable

Chunk = TypeVar("Chunk")
Result = TypeVar("Result")


@dataclass
class _Pending(Generic[Chunk, Result]):
    chunk: Chunk
    rows: int
    future: asyncio.Future[Result]
    enqueued: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class BatchStats:
    """What one batch looked like, for metrics."""

    rows: int
    chunks: int
    seconds: float


class Batcher(Generic[Chunk, Result]):
    def __init__(
        self,
        run: Callable[[list[Chunk]], list[Result]],
        *,
        max_batch_size: int,
        max_delay: float,
        max_queue_rows: int,
        name: str = "model",
        on_batch: Callable[[BatchStats], None] | None = None,
    ) -> None:
        """``run(chunks)`` returns one result per chunk, in order (called in a worker thread)."""
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self._run = run
        self.max_batch_size = max_batch_size
        self.max_delay = max_delay
        self.max_queue_rows = max_queue_rows
        self._on_batch = on_batch
        self._queue: deque[_Pending[Chunk, Result]] = deque()
        self._queued_rows = 0
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"batch-{name}")
        self._task: asyncio.Task[None] | None = None

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    async def submit(self, chunk: Chunk, rows: int) -> Result:
        """Queue a chunk of ``rows`` rows and wait for its result (503 when the queue is full)."""
        if self._queued_rows + rows > self.max_queue_rows and self._queued_rows > 0:
            raise Overloaded(
                f"the model's queue is full ({self._queued_rows} rows waiting); try again shortly",
                retry_after=1.0,
            )
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())
        pending = _Pending(chunk, rows, asyncio.get_running_loop().create_future())
        self._queue.append(pending)
        self._queued_rows += rows
        self._arrived.set()
        return await pending.future

    async def close(self) -> None:
        """Stop the loop; chunks still queued fail as unavailable, and so do those of a batch
        still running (closed while it runs: its model died under it)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        while self._queue:
            pending = self._take()
            if not pending.future.done():
                pending.future.set_exception(Overloaded("the model was unloaded", retry_after=1.0))
        self._executor.shutdown(wait=True)

    async def _loop(self) -> None:
        while True:
            while not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            batch = await self._gather()
            if batch:
                await self._execute(batch)

    async def _gather(self) -> list[_Pending[Chunk, Result]]:
        """Take chunks until the batch is full or the oldest has waited max_delay."""
        batch: list[_Pending[Chunk, Result]] = []
        rows = 0
        deadline = self._queue[0].enqueued + self.max_delay
        while True:
            while self._queue and (not batch or rows + self._queue[0].rows <= self.max_batch_size):
                pending = self._take()
                if pending.future.cancelled():  # the client went away while it waited
                    continue
                batch.append(pending)
                rows += pending.rows
            remaining = deadline - time.monotonic()
            if rows >= self.max_batch_size or remaining <= 0 or self._queue:
                return batch
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                return batch

    def _take(self) -> _Pending[Chunk, Result]:
        pending = self._queue.popleft()
        self._queued_rows -= pending.rows
        return pending

    async def _execute(self, batch: list[_Pending[Chunk, Result]]) -> None:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        chunks = [p.chunk for p in batch]
        try:
            results = await loop.run_in_executor(self._executor, self._run, chunks)
        except asyncio.CancelledError:  # closed while it ran: its model died under it
            for pending in batch:
                _settle(pending, error=Unavailable("the model stopped during this request"))
            raise
        except Exception as err:
            if len(batch) == 1:
                _settle(batch[0], error=err)
            else:
                await self._isolate(batch)  # find which chunk broke the batch
            return
        finally:
            if self._on_batch:
                self._on_batch(
                    BatchStats(
                        sum(p.rows for p in batch), len(batch), time.perf_counter() - started
                    )
                )
        for pending, result in zip(batch, results, strict=True):
            _settle(pending, result=result)

    async def _isolate(self, batch: list[_Pending[Chunk, Result]]) -> None:
        loop = asyncio.get_running_loop()
        for pending in batch:
            try:
                [result] = await loop.run_in_executor(self._executor, self._run, [pending.chunk])
            except Exception as err:
                _settle(pending, error=err)
            else:
                _settle(pending, result=result)


def _settle(
    pending: _Pending, *, result: object = None, error: BaseException | None = None
) -> None:
    if pending.future.done():
        return
    if error is not None:
        pending.future.set_exception(error)
    else:
        pending.future.set_result(result)
