"""The dynamic batcher on its own: batches form, lone requests do not wait, failures stay put."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from maas.engine.batcher import Batcher, BatchStats
from maas.errors import Overloaded, Unavailable


def doubling(chunks: list[list[int]]) -> list[list[int]]:
    return [[2 * x for x in chunk] for chunk in chunks]


def batcher(run=doubling, **options) -> tuple[Batcher, list[BatchStats]]:
    seen: list[BatchStats] = []
    settings = {"max_batch_size": 8, "max_delay": 0.05, "max_queue_rows": 1000, **options}
    return Batcher(run, on_batch=seen.append, **settings), seen


def test_concurrent_requests_share_batches():
    async def main():
        b, seen = batcher(max_batch_size=16, max_delay=0.05)
        results = await asyncio.gather(*(b.submit([i], 1) for i in range(32)))
        await b.close()
        return results, seen

    results, seen = asyncio.run(main())
    assert results == [[2 * i] for i in range(32)]
    assert max(s.rows for s in seen) > 1
    assert sum(s.rows for s in seen) == 32
    assert all(s.rows <= 16 for s in seen)


def test_a_lone_request_waits_at_most_max_delay():
    async def main():
        b, seen = batcher(max_batch_size=64, max_delay=0.05)
        started = time.perf_counter()
        result = await b.submit([1], 1)
        elapsed = time.perf_counter() - started
        await b.close()
        return result, elapsed, seen

    result, elapsed, seen = asyncio.run(main())
    assert result == [2]
    assert 0.04 <= elapsed < 0.05 + 0.1  # waited for company, then went alone
    assert [s.rows for s in seen] == [1]


def test_a_full_batch_does_not_wait_for_the_delay():
    async def main():
        b, _ = batcher(max_batch_size=4, max_delay=5.0)
        started = time.perf_counter()
        await asyncio.gather(*(b.submit([i], 1) for i in range(4)))
        elapsed = time.perf_counter() - started
        await b.close()
        return elapsed

    assert asyncio.run(main()) < 1.0


def test_a_bad_item_fails_only_its_own_request():
    def picky(chunks):
        if any(chunk == ["bad"] for chunk in chunks):
            raise ValueError("cannot do 'bad'")
        return [[x.upper() for x in chunk] for chunk in chunks]

    async def main():
        b, seen = batcher(run=picky, max_batch_size=8, max_delay=0.05)
        results = await asyncio.gather(
            b.submit(["a"], 1), b.submit(["bad"], 1), b.submit(["c"], 1), return_exceptions=True
        )
        await b.close()
        return results, seen

    results, seen = asyncio.run(main())
    assert results[0] == ["A"] and results[2] == ["C"]
    assert isinstance(results[1], ValueError)
    assert seen[0].chunks == 3  # they were batched together, then run one by one


def test_a_full_queue_is_overloaded():
    release = threading.Event()

    def slow(chunks):
        release.wait(5)
        return chunks

    async def main():
        b, _ = batcher(run=slow, max_batch_size=1, max_delay=0, max_queue_rows=3)
        first = asyncio.ensure_future(b.submit([0], 1))
        await asyncio.sleep(0.05)  # the first runs (and blocks); three more fill the queue
        queued = [asyncio.ensure_future(b.submit([i], 1)) for i in range(3)]
        await asyncio.sleep(0)
        with pytest.raises(Overloaded) as caught:
            await b.submit([9], 1)
        release.set()
        await asyncio.gather(first, *queued)
        await b.close()
        return caught.value

    error = asyncio.run(main())
    assert error.retry_after >= 1 and "queue is full" in error.message


def test_a_request_larger_than_a_batch_runs_alone():
    async def main():
        b, seen = batcher(max_batch_size=4, max_delay=0.01)
        result = await b.submit(list(range(10)), 10)
        await b.close()
        return result, seen

    result, seen = asyncio.run(main())
    assert result == [2 * i for i in range(10)] and seen[0].rows == 10


def test_cancelled_requests_are_skipped():
    calls: list[list] = []

    def record(chunks):
        calls.append(chunks)
        return chunks

    async def main():
        b, _ = batcher(run=record, max_batch_size=8, max_delay=0.1)
        gone = asyncio.ensure_future(b.submit(["gone"], 1))
        await asyncio.sleep(0)
        gone.cancel()
        kept = await b.submit(["kept"], 1)
        await b.close()
        return kept

    assert asyncio.run(main()) == ["kept"]
    assert calls == [[["kept"]]]


def test_closing_while_a_batch_runs_fails_its_requests_instead_of_leaving_them_waiting():
    """A model that dies under a batch is closed while the batch runs (the pool's restart):
    its requests get Unavailable (503), and so do the ones queued behind it."""
    started, release = threading.Event(), threading.Event()

    def stuck(chunks):
        started.set()
        release.wait(5)
        return chunks

    async def main():
        b, _ = batcher(run=stuck, max_batch_size=1, max_delay=0)
        running = asyncio.ensure_future(b.submit([0], 1))
        while not started.is_set():
            await asyncio.sleep(0.01)
        queued = asyncio.ensure_future(b.submit([1], 1))
        await asyncio.sleep(0)
        closing = asyncio.ensure_future(b.close())
        await asyncio.sleep(0.05)
        release.set()  # the worker thread returns; close() waits for it
        await closing
        return await asyncio.gather(running, queued, return_exceptions=True)

    running, queued = asyncio.run(main())
    assert isinstance(running, Unavailable) and "stopped during this request" in running.message
    assert isinstance(queued, Unavailable)
