"""``merge``, the fan-in of a completion request's prompts: items as they come, the first error
raised, and every stream stopped when the caller leaves or one fails."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from maas.api.openai.generation import merge


async def ticking(name: str, count: int, every: float, closed: list[str]) -> AsyncIterator[str]:
    try:
        for i in range(count):
            await asyncio.sleep(every)
            yield f"{name}{i}"
    finally:
        closed.append(name)


async def failing_after(items: int) -> AsyncIterator[str]:
    for i in range(items):
        yield f"x{i}"
    raise ValueError("the engine failed")


def test_items_come_as_they_are_made_each_with_its_stream():
    async def run() -> list[tuple[int, str]]:
        closed: list[str] = []
        streams = [ticking("slow", 2, 0.03, closed), ticking("fast", 3, 0.01, closed)]
        return [item async for item in merge(streams)]

    merged = asyncio.run(run())
    assert sorted(merged) == [(0, "slow0"), (0, "slow1"), (1, "fast0"), (1, "fast1"), (1, "fast2")]
    assert merged.index((1, "fast2")) < merged.index((0, "slow1"))


def test_the_first_error_raises_and_stops_the_other_streams():
    closed: list[str] = []

    async def run() -> None:
        with pytest.raises(ValueError, match="engine failed"):
            async for _ in merge([ticking("long", 100, 0.01, closed), failing_after(1)]):
                pass
        await asyncio.sleep(0.05)  # the cancelled stream finishes its cleanup

    asyncio.run(run())
    assert closed == ["long"]


def test_leaving_early_stops_every_stream():
    closed: list[str] = []

    async def run() -> None:
        merged = merge([ticking("a", 100, 0.01, closed), ticking("b", 100, 0.01, closed)])
        await anext(merged)
        await merged.aclose()
        await asyncio.sleep(0.05)

    asyncio.run(run())
    assert sorted(closed) == ["a", "b"]
