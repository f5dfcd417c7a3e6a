"""What enters and what leaves the management API; separate classes, so nothing internal leaks."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from maas.registry import Manifest, ModelRecord, VersionRecord
from maas.registry.manifest import Task
from maas.tasks.sampling import SamplingDefaults


class ModelImport(BaseModel):
    """Import files that are already on the server's disk."""

    model_config = ConfigDict(extra="forbid")

    name: str
    path: str
    """Path on the server: a folder, a .gguf or .onnx file, or an archive."""
    task: Task | None = None
    alias: str | None = None
    description: str | None = None
    tenant: str | None = None
    """Owning tenant of a new model; empty means shared with every tenant."""
    sampling: SamplingDefaults | None = None
    """Default sampling parameters of a text-generation model (requests override them)."""


class AliasUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=1)


class VersionPublic(BaseModel):
    name: str
    version: int
    task: str
    format: str
    runtime: str
    size_bytes: int
    num_files: int
    aliases: list[str]
    created_at: datetime

    @classmethod
    def of(cls, record: VersionRecord) -> VersionPublic:
        return cls(**record.model_dump(exclude={"path", "manifest_sha256", "tenant_id"}))


class VersionReport(BaseModel):
    """What an optimization measured, parent and child in one run (docs/optimize.md)."""

    object: str = "version.report"
    model: str
    version: int
    parent: str
    steps: list[dict[str, Any]]
    notes: list[str]
    parent_figures: dict[str, float]
    figures: dict[str, float]
    ratios: dict[str, float]
    parity: dict[str, float]

    @classmethod
    def of_manifest(cls, manifest: Manifest) -> VersionReport:
        from maas.optimize.report import split_figures

        recipe = manifest.recipe or {}
        parent = manifest.parent
        return cls(
            model=manifest.name,
            version=manifest.version,
            parent=f"{parent.name}:{parent.version}" if parent else "",
            steps=recipe.get("steps", []),
            notes=recipe.get("notes", []),
            parent_figures=recipe.get("parent_figures", {}),
            **split_figures(manifest.metrics),
        )


class VersionDetail(VersionPublic):
    manifest: dict[str, Any]
    """The version's manifest, without where it was imported from."""

    @classmethod
    def of_manifest(cls, record: VersionRecord, manifest: Manifest) -> VersionDetail:
        public = VersionPublic.of(record).model_dump()
        return cls(**public, manifest=manifest.model_dump(mode="json", exclude={"source"}))


class VersionsPublic(BaseModel):
    data: list[VersionPublic]
    count: int


class ModelPublic(BaseModel):
    name: str
    serving: dict[str, Any]
    """Batching settings set for this model (defaults apply to the rest)."""
    sampling: dict[str, Any]
    """Default sampling parameters set for this model (a text-generation model's
    generation_config.json, then OpenAI's defaults, apply to the rest)."""
    tenant: str | None
    """The owning tenant; null for a model shared with every tenant."""
    task: str
    description: str
    latest_version: int | None
    aliases: dict[str, int]
    versions: list[VersionPublic]
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, record: ModelRecord) -> ModelPublic:
        return cls(
            name=record.name,
            serving=record.serving,
            sampling=record.sampling,
            tenant=record.tenant,
            task=record.task,
            description=record.description,
            latest_version=record.latest.version if record.latest else None,
            aliases=record.aliases,
            versions=[VersionPublic.of(v) for v in record.versions],
            created_at=record.created_at,
            updated_at=record.updated_at,
        )


class ModelsPublic(BaseModel):
    data: list[ModelPublic]
    count: int


class ServingUpdate(BaseModel):
    """Batching settings of one model; fields left out keep the defaults."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int | None = Field(default=None, ge=1, le=4096)
    """Rows in one forward pass at most; 1 turns batching off."""
    max_delay_ms: float | None = Field(default=None, ge=0, le=10_000)
    """How long the oldest request may wait for others to join its batch."""
    max_queue_rows: int | None = Field(default=None, ge=1, le=10**7)
    """Rows that may wait; past it, requests get 503 with Retry-After."""
    pipeline_stages: int | None = Field(default=None, ge=1, le=64)
    """Processes the model is split across (pipeline stages), from its next load on: a
    Llama-family LLM (``MAAS_LLM_PIPELINE_STAGES`` by default) or a built-in torch
    architecture that runs as a sequence of layers (the small CNN)."""


class ModelUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    serving: ServingUpdate | None = None
    sampling: SamplingDefaults | None = None
    """Replaces the model's default sampling parameters ({} clears them)."""


class DtypeTrialPublic(BaseModel):
    dtype: str
    one_ms: float
    """Median decode step of one sequence."""
    batch_ms: float
    """Median decode step of ``batch`` sequences."""
    batch: int
    agreement: float
    """Share of a probe text's next-token choices equal to float32's."""
    same_answer: bool = True
    """Fed float32's answer to the probe question, it kept float32's token wherever float32
    was sure of it."""
    kv_cache: str = ""
    """The KV cache's dtype in this trial, if not the activations'."""


class PipelineStagePublic(BaseModel):
    """One pipeline stage of a split model."""

    stage: int
    layers: str
    """Its decoder blocks, first-last (stage 0 also holds the embedding, the last stage the
    final norm and LM head)."""
    weights_bytes: int
    memory_bytes: int
    """Its weights and the KV cache of its layers."""
    node: str
    """Where it runs: ``local`` (a process on this machine)."""


class EngineDescriptionPublic(BaseModel):
    """How a text-generation model runs."""

    runtime: str
    """``maas`` (maas's engine) or ``transformers`` (the fallback)."""
    dtype: str
    """What the model computes in; with ``weights``, the activations."""
    weights: str = ""
    """How the version stores its weights quantized (``int4, group 32``), or empty."""
    dtype_trials: list[DtypeTrialPublic]
    """With ``MAAS_LLM_DTYPE=auto``: what was measured to choose ``dtype``, at this load or
    an earlier one of the same model on this machine (the choice is kept)."""
    kv_cache_dtype: str = ""
    """What the KV cache keeps keys and values in."""
    compiled: bool
    """Decode steps run compiled (else eagerly)."""
    compiled_rows: int
    """Compiled for batches of at most this many sequences (measured faster there)."""
    kv_blocks: int
    kv_block_size: int
    draft: str = ""
    """Speculative decoding's draft model: the dtype it runs the model in (``int8``), or
    empty (none; ``MAAS_LLM_DRAFT``)."""
    speculative_tokens: int = 0
    """Most tokens the draft proposes each round (``MAAS_LLM_SPECULATIVE_TOKENS``)."""
    draft_min_confidence: float = 0.0
    """A round's proposal ends after a token the draft gives less probability than this
    (``MAAS_LLM_DRAFT_MIN_CONFIDENCE``)."""
    pipeline_stages: list[PipelineStagePublic] = []
    """With the model split into pipeline stages (``MAAS_LLM_PIPELINE_STAGES``)."""


class DeploymentPublic(BaseModel):
    model: str
    version: int
    memory_bytes: int
    in_flight: int
    queued_rows: int
    pinned: bool
    engine: EngineDescriptionPublic | None = None
    """Text-generation models only."""


class DeploymentsPublic(BaseModel):
    data: list[DeploymentPublic]
    count: int
