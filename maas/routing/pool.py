"""The model pool: which versions are loaded.

A version loads on its first request (or at start when pinned), exactly once however many
requests arrive together, and the least recently used idle version is unloaded when the
memory budget would be exceeded. Loading reads and verifies the files off the event loop.

The pool keeps versions up: when a deployment's engine dies, the version leaves the pool at
once (not ready), and a supervisor loads it again in the background, backing off between
failed attempts; pinned versions are brought up the same way at start. A request that comes
while an attempt runs waits for it; one that comes during a back-off gets 503 with
``Retry-After``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable

from starlette.concurrency import run_in_threadpool

from maas.errors import Conflict, MaasError, Unavailable
from maas.registry import Registry, VersionRecord
from maas.registry.manifest import GENERATION_TASKS
from maas.routing.deployment import Deployment, ServingConfig, batch_stats_recorder
from maas.routing.metrics import ServingMetrics
from maas.runtime.base import RuntimeOptions
from maas.runtime.classic import runtime_for

log = logging.getLogger(__name__)

Key = tuple[str, int]

FIRST_BACKOFF_S = 1.0
MAX_BACKOFF_S = 60.0


def key_of(record: VersionRecord) -> Key:
    return record.name, record.version


class ModelPool:
    def __init__(
        self,
        registry: Registry,
        *,
        memory_budget: int,
        serving: Callable[[VersionRecord], ServingConfig],
        metrics: ServingMetrics,
        options: RuntimeOptions,
        pinned: frozenset[Key] = frozenset(),
    ) -> None:
        self._registry = registry
        self.memory_budget = memory_budget
        self._serving = serving
        self._metrics = metrics
        self._options = options
        self.pinned = pinned
        self._deployments: OrderedDict[Key, Deployment] = OrderedDict()
        self.generators = None
        """Builds the deployment of a chat or text-generation version (set by Serving)."""
        self._loading: dict[Key, asyncio.Task[Deployment]] = {}
        self._supervisors: dict[Key, asyncio.Task[None]] = {}
        """Versions being brought up in the background (pinned at start, or restarting)."""
        self._backoff_until: dict[Key, float] = {}
        self._lock = asyncio.Lock()
        self._closed = False

    def deployments(self) -> list[Deployment]:
        return list(self._deployments.values())

    def is_ready(self, record: VersionRecord) -> bool:
        deployment = self._deployments.get(key_of(record))
        return deployment is not None and not deployment.dead

    def not_ready_pinned(self) -> list[Key]:
        """Pinned versions not loaded now (still loading at start, or restarting)."""
        return [
            key
            for key in sorted(self.pinned)
            if key not in self._deployments or self._deployments[key].dead
        ]

    async def get(self, record: VersionRecord) -> Deployment:
        """The deployment of a version, loading it if needed (once, however many callers)."""
        key = key_of(record)
        deployment = self._deployments.get(key)
        if deployment is not None and deployment.dead:
            self._on_dead(key, deployment)  # noticed here before its watcher said so
            deployment = None
        if deployment is not None:
            self._deployments.move_to_end(key)
            return deployment
        wait = self._backoff_until.get(key, 0.0) - time.monotonic()
        if wait > 0 and key not in self._loading:
            raise Unavailable(
                f"model {record.reference} failed to load; the next attempt is in {wait:.0f}s",
                retry_after=wait,
            )
        return await self._load_once(record)

    def keep_up(self, record: VersionRecord) -> None:
        """Load a version in the background, trying again with back-off until it is up."""
        key = key_of(record)
        if key not in self._supervisors:
            task = asyncio.get_running_loop().create_task(self._supervise(record))
            self._supervisors[key] = task
            task.add_done_callback(lambda _: self._supervisors.pop(key, None))

    async def _supervise(self, record: VersionRecord) -> None:
        key, delay = key_of(record), FIRST_BACKOFF_S
        while not self.is_ready(record):
            try:
                await self._load_once(record)
            except MaasError as err:
                log.error("%s: %s; trying again in %.0fs", record.reference, err.message, delay)
                self._backoff_until[key] = time.monotonic() + delay
                await asyncio.sleep(delay)
                delay = min(2 * delay, MAX_BACKOFF_S)
                continue
        self._backoff_until.pop(key, None)

    def _on_dead(self, key: Key, deployment: Deployment) -> None:
        """A deployment's engine died: out of the pool now (not ready), and up again soon."""
        if self._deployments.get(key) is not deployment:
            return  # unloaded or replaced meanwhile
        log.error("the engine of %s stopped; restarting it", deployment.record.reference)
        del self._deployments[key]
        closing = asyncio.get_running_loop().create_task(deployment.close())
        closing.add_done_callback(lambda _: self._closed or self.keep_up(deployment.record))

    def _watch(self, key: Key, deployment: Deployment) -> None:
        """Be told, on the event loop, when the deployment's engine dies."""
        loop = asyncio.get_running_loop()
        deployment.watch(lambda: loop.call_soon_threadsafe(self._on_dead, key, deployment))

    async def _load_once(self, record: VersionRecord) -> Deployment:
        key = key_of(record)
        task = self._loading.get(key)
        if task is None:
            task = self._loading[key] = asyncio.get_running_loop().create_task(self._load(record))
            task.add_done_callback(lambda _: self._loading.pop(key, None))
        return await asyncio.shield(task)

    async def unload(self, record: VersionRecord, *, force: bool = False) -> bool:
        """Unload a version once its running requests finish; False if it was not loaded.
        A pinned version stays loaded unless ``force`` is given."""
        if key_of(record) in self.pinned and not force:
            raise Conflict(
                f"{record.reference} is pinned (MAAS_PIN_MODELS) and stays loaded; "
                "an admin can unload it with force=true"
            )
        supervisor = self._supervisors.pop(key_of(record), None)
        if supervisor is not None:  # it was restarting: stop trying
            supervisor.cancel()
        self._backoff_until.pop(key_of(record), None)
        deployment = self._deployments.pop(key_of(record), None)
        if deployment is None:
            return supervisor is not None
        await self._drain_and_close(deployment)
        return True

    def configure(self, name: str) -> None:
        """Re-read the serving config of every loaded version of a model (blocking)."""
        for deployment in list(self._deployments.values()):
            if deployment.record.name == name:
                deployment.configure(self._serving(deployment.record))

    async def close(self) -> None:
        self._closed = True
        for task in [*self._supervisors.values(), *self._loading.values()]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, MaasError):
                await task
        while self._deployments:
            _, deployment = self._deployments.popitem()
            await deployment.close()

    async def _load(self, record: VersionRecord) -> Deployment:
        started = time.perf_counter()
        opened = await run_in_threadpool(self._registry.open_version, record.reference)
        async with self._lock:
            await self._make_room(opened.manifest.size_bytes, record)
            try:
                if opened.manifest.task in GENERATION_TASKS:
                    deployment = await run_in_threadpool(self._generator, opened)
                else:
                    deployment = await self._classic(opened)
            except MaasError:
                raise
            except Exception as err:
                log.exception("loading %s failed", record.reference)
                raise Unavailable(f"model {record.reference} failed to load: {err}") from None
            self._deployments[key_of(record)] = deployment
            self._watch(key_of(record), deployment)
        seconds = time.perf_counter() - started
        self._metrics.load_seconds.labels(record.name, str(record.version)).observe(seconds)
        log.info("loaded %s in %.2fs", record.reference, seconds)
        return deployment

    async def _classic(self, opened) -> Deployment:
        config = await run_in_threadpool(self._serving, opened.record)
        if (config.pipeline_stages or 1) > 1:
            from maas.distributed.classic import PipelinedTorchRuntime

            runtime = PipelinedTorchRuntime(opened, self._options, config.pipeline_stages)
        else:
            runtime = runtime_for(opened, self._options)
        await run_in_threadpool(runtime.load)
        on_batch = batch_stats_recorder(self._metrics, opened.record)
        return Deployment(opened.record, opened.manifest, runtime, config, on_batch=on_batch)

    def _generator(self, opened):
        if self.generators is None:
            raise Unavailable("text generation is not set up in this server")
        return self.generators(opened)

    async def _make_room(self, needed: int, record: VersionRecord) -> None:
        """Unload least-recently-used idle versions until ``needed`` bytes fit the budget."""
        if needed > self.memory_budget:
            raise Unavailable(
                f"model {record.reference} needs about {needed} bytes, more than the whole "
                f"model memory budget ({self.memory_budget}, MAAS_MODEL_MEMORY_BYTES)"
            )
        while self._used() + needed > self.memory_budget:
            victim = next(
                (
                    key
                    for key, d in self._deployments.items()
                    if d.in_flight == 0 and key not in self.pinned
                ),
                None,
            )
            if victim is None:
                raise Unavailable(
                    f"no room to load {record.reference}: the loaded models are busy or pinned",
                )
            deployment = self._deployments.pop(victim)
            log.info(
                "unloading %s to make room for %s", deployment.record.reference, record.reference
            )
            await deployment.close()

    def _used(self) -> int:
        return sum(d.memory_bytes for d in self._deployments.values())

    @staticmethod
    async def _drain_and_close(deployment: Deployment) -> None:
        while deployment.in_flight > 0:
            await asyncio.sleep(0.01)
        await deployment.close()
