"""The model pool: one load for many first requests, LRU eviction under the memory budget."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

import maas.routing.pool as pool_module
from maas.errors import Unavailable
from maas.routing.deployment import ServingConfig
from maas.routing.metrics import ServingMetrics
from maas.routing.pool import ModelPool
from maas.runtime.base import Runtime, RuntimeOptions
from tests.fixtures import make_onnx


class FakeRuntime(Runtime):
    """Counts loads; weighs what its files weigh; returns the input plus its version."""

    loads: list[str] = []
    gate: threading.Event | None = None

    def load(self) -> None:
        if FakeRuntime.gate is not None:
            FakeRuntime.gate.wait(5)
        FakeRuntime.loads.append(self.opened.record.reference)

    def predict(self, inputs):
        return {"y": inputs["x"] + self.opened.record.version}

    def unload(self) -> None:
        pass


@pytest.fixture
def fake_runtime(monkeypatch):
    FakeRuntime.loads = []
    FakeRuntime.gate = None
    monkeypatch.setattr(
        pool_module, "runtime_for", lambda opened, options: FakeRuntime(opened, options)
    )
    return FakeRuntime


@pytest.fixture
def models(registry, tmp_path):
    onnx = make_onnx(tmp_path / "linear.onnx")
    return [registry.import_model(onnx, name) for name in ("a", "b", "c")]


def make_pool(registry, budget: int) -> ModelPool:
    return ModelPool(
        registry,
        memory_budget=budget,
        serving=lambda record: ServingConfig(max_batch_size=4, max_delay_ms=1),
        metrics=ServingMetrics(CollectorRegistry()),
        options=RuntimeOptions(threads=1),
    )


def test_many_first_requests_load_once(registry, models, fake_runtime):
    fake_runtime.gate = threading.Event()

    async def main():
        pool = make_pool(registry, budget=10_000)
        waiting = [asyncio.ensure_future(pool.get(models[0])) for _ in range(25)]
        await asyncio.sleep(0.1)
        fake_runtime.gate.set()
        deployments = await asyncio.gather(*waiting)
        await pool.close()
        return deployments

    deployments = asyncio.run(main())
    assert fake_runtime.loads == ["a:1"]
    assert len({id(d) for d in deployments}) == 1


def test_least_recently_used_idle_model_is_evicted(registry, models, fake_runtime):
    async def main():
        pool = make_pool(registry, budget=int(2.5 * models[0].size_bytes))  # room for two
        a, b, c = models
        await pool.get(a)
        await pool.get(b)
        await pool.get(a)  # a is now the most recently used
        await pool.get(c)  # b goes
        loaded = {d.record.name for d in pool.deployments()}
        await pool.close()
        return loaded

    assert asyncio.run(main()) == {"a", "c"}
    assert fake_runtime.loads == ["a:1", "b:1", "c:1"]


def test_busy_and_pinned_models_are_not_evicted(registry, models, fake_runtime):
    async def main():
        pool = make_pool(registry, budget=int(2.5 * models[0].size_bytes))
        a, b, c = models
        pool.pinned = frozenset({("a", 1)})
        await pool.get(a)
        busy = await pool.get(b)
        async with busy.use():
            with pytest.raises(Unavailable, match="busy or pinned"):
                await pool.get(c)
        await pool.get(c)  # b is idle again, so it can go
        loaded = {d.record.name for d in pool.deployments()}
        await pool.close()
        return loaded

    assert asyncio.run(main()) == {"a", "c"}


def test_a_model_bigger_than_the_budget_is_refused_clearly(registry, models, fake_runtime):
    async def main():
        pool = make_pool(registry, budget=10)
        with pytest.raises(Unavailable, match="MAAS_MODEL_MEMORY_BYTES"):
            await pool.get(models[0])
        await pool.close()

    asyncio.run(main())


def test_unload_waits_for_running_requests(registry, models, fake_runtime):
    async def main():
        pool = make_pool(registry, budget=10_000)
        deployment = await pool.get(models[0])
        order = []

        async def request():
            async with deployment.use():
                await asyncio.sleep(0.1)
                result = await deployment.infer({"x": np.zeros((1, 4), np.float32)})
                order.append("request done")
                return result

        running = asyncio.ensure_future(request())
        await asyncio.sleep(0.01)
        await pool.unload(models[0])
        order.append("unloaded")
        result = await running
        await pool.close()
        return order, result

    order, result = asyncio.run(main())
    assert order == ["request done", "unloaded"]
    assert result["y"].tolist() == [[1, 1, 1, 1]]
