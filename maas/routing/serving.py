"""From a model reference to a running deployment, for the inference routes.

Moving an alias through the management API first loads the new target (if the model is
being served), so new requests switch to it only once it is ready, while requests already
running on the old version finish there. A new version that fails to load leaves the alias
where it was and the move reports the error. If an alias is moved elsewhere (another
process, the CLI) to a version that then fails to load, the version that last served that
reference keeps serving it.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import replace

from maas.config import Settings
from maas.errors import Conflict, InvalidRequest, MaasError, UnsupportedFormat
from maas.messages import EngineDescription
from maas.registry import Registry, VersionRecord
from maas.registry.manifest import GENERATION_TASKS
from maas.registry.service import ANY_OWNER, Owner
from maas.routing.deployment import Deployment, ServingConfig
from maas.routing.llm_deployment import EngineOptions, LLMDeployment, runs_on_engine
from maas.routing.metrics import GenerationMetrics, ServingMetrics
from maas.routing.pool import ModelPool, key_of
from maas.runtime.base import RuntimeOptions
from maas.runtime.llm.options import RunnerOptions

log = logging.getLogger(__name__)

SERVING_FIELDS = ("max_batch_size", "max_delay_ms", "max_queue_rows", "pipeline_stages")


class Serving:
    def __init__(self, registry: Registry, settings: Settings, metrics: ServingMetrics) -> None:
        self.registry = registry
        self.metrics = metrics
        self.defaults = ServingConfig(
            max_batch_size=settings.max_batch_size,
            max_delay_ms=settings.max_delay_ms,
            max_queue_rows=settings.max_queue_rows,
        )
        self.pool = ModelPool(
            registry,
            memory_budget=settings.model_memory_bytes,
            serving=self.config_for,
            metrics=metrics,
            options=RuntimeOptions(threads=settings.inference_threads),
        )
        generation = GenerationMetrics(metrics.registry)
        engine_options = EngineOptions(
            runner=RunnerOptions(
                dtype=settings.llm_dtype,
                kv_cache_dtype=settings.llm_kv_cache_dtype,
                max_sequences=settings.llm_max_sequences,
                max_model_len=settings.llm_max_model_len,
                kv_cache_bytes=settings.llm_kv_cache_bytes,
                block_size=settings.llm_kv_block_size,
                commit_kv_cache=settings.llm_kv_cache_commit,
                compile=settings.llm_compile,
                paged_attention=settings.llm_paged_attention,
                draft=settings.llm_draft,
                speculative_tokens=settings.llm_speculative_tokens,
                draft_min_confidence=settings.llm_draft_min_confidence,
                threads=settings.inference_threads,
            ),
            max_batch_tokens=settings.llm_max_batch_tokens,
            separate_process=settings.llm_engine_process,
            max_waiting=settings.llm_max_waiting_sequences,
            pipeline_stages=settings.llm_pipeline_stages,
            ray_address=settings.ray_address,
        )
        self.pool.generators = lambda opened: LLMDeployment(
            opened,
            replace(
                engine_options,
                pipeline_stages=self.config_for(opened.record).pipeline_stages
                or settings.llm_pipeline_stages,
            ),
            generation.recorder(opened.record.reference),
        )
        self.request_timeout = settings.request_timeout_s
        self.max_request_sequences = settings.llm_max_request_sequences
        self._last_served: dict[str, VersionRecord] = {}

    def start(self, pinned: list[str]) -> None:
        """Start loading the pinned models in the background (the server answers meanwhile,
        and is ready once they are up); they are never unloaded for room. A reference that
        does not resolve raises here."""
        records = [self.registry.resolve(reference) for reference in pinned]
        self.pool.pinned = frozenset(key_of(record) for record in records)
        for record in records:
            self.pool.keep_up(record)

    def check_splittable(self, name: str) -> None:
        """Refuse pipeline stages for a model whose default version cannot run in them."""
        model = self.registry.get_model(name)
        record = model.default
        if record is None:
            return
        manifest = self.registry.read_manifest(record)
        if manifest.task in GENERATION_TASKS:
            if not runs_on_engine(manifest):
                raise InvalidRequest(
                    f"{record.reference} runs on the transformers fallback, which cannot be "
                    "split into pipeline stages",
                    param="serving.pipeline_stages",
                )
            return
        from maas.distributed.classic import check_splittable

        try:
            check_splittable(manifest)
        except UnsupportedFormat as err:
            raise InvalidRequest(str(err), param="serving.pipeline_stages") from None

    def config_for(self, record: VersionRecord) -> ServingConfig:
        """Settings defaults, then the manifest's, then the model's own settings."""
        config = self.defaults
        manifest_serving = self.registry.read_manifest(record).task_options.get("serving", {})
        for layer in (manifest_serving, self.registry.get_model(record.name).serving):
            config = replace(config, **{k: v for k, v in layer.items() if k in SERVING_FIELDS})
        return config

    async def deployment(self, record: VersionRecord, reference: str) -> Deployment:
        """The loaded deployment for a resolved reference (loading it if needed)."""
        try:
            deployment = await self.pool.get(record)
        except MaasError:
            fallback = self._last_served.get(reference)
            if fallback is None or fallback == record or not self.pool.is_ready(fallback):
                raise
            log.error(
                "%s resolved to %s, which failed to load; %s keeps serving it",
                reference,
                record.reference,
                fallback.reference,
            )
            return await self.pool.get(fallback)
        self._last_served[reference] = record
        return deployment

    async def move_alias(
        self, name: str, alias: str, version: int, owner: Owner = ANY_OWNER
    ) -> VersionRecord:
        """Point an alias at a version; if the model is being served, load that version
        first, and leave the alias alone if it fails to load."""
        target = self.registry.resolve(f"{name}:{version}")
        serving = any(d.record.name == name for d in self.pool.deployments())
        if serving and not self.pool.is_ready(target):
            try:
                await self.pool.get(target)
            except MaasError as err:
                raise Conflict(
                    f"{target.reference} failed to load, so {name}@{alias} was not moved: "
                    f"{err.message}"
                ) from None
        record = self.registry.set_alias(name, alias, version, owner=owner)
        for reference in (f"{name}@{alias}", name):
            self._last_served.pop(reference, None)
        return record

    def loaded(self) -> list[dict]:
        return [
            {
                "model": d.record.name,
                "version": d.record.version,
                "memory_bytes": d.memory_bytes,
                "in_flight": d.in_flight,
                "queued_rows": d.queued_rows,
                "pinned": key_of(d.record) in self.pool.pinned,
                "engine": _described(getattr(d, "description", None)),
            }
            for d in self.pool.deployments()
        ]


def _described(description: EngineDescription | None) -> dict | None:
    return None if description is None else dataclasses.asdict(description)
