"""The ``optimize`` job: a registered version through a recipe's steps into a new version of
the same model (or of a new model, ``name``), whose manifest records its ``parent``, the
recipe and what each step did, and the report measured on parent and child in this run."""

from __future__ import annotations

import json
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from maas.errors import InvalidRequest, ModelNotFound
from maas.jobs.kinds import parse_params
from maas.optimize import report
from maas.optimize.recipe import check, parse
from maas.optimize.steps import Candidate, apply
from maas.registry import open_registry
from maas.registry.names import parse_reference, validate_model_name
from maas.registry.records import OpenedVersion
from maas.registry.rows import Made

KIND = "optimize"


class OptimizeParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=160)
    """The parent: ``name``, ``name:version`` or ``name@alias`` (fixed to a version when the
    job is created)."""
    recipe: str | list[dict[str, Any]]
    """Steps in order: ``prune 0.5 -> quantize int8-dynamic``, or a list of step objects."""
    name: str | None = Field(default=None, max_length=128)
    """The model the result becomes a version of; by default the parent's."""
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    """The sample inputs the report measures both models on."""


def validate(params: dict[str, Any]) -> dict[str, Any]:
    parsed = parse_params(OptimizeParams, params)
    steps = parse(parsed.recipe)
    if parsed.name is not None:
        validate_model_name(parsed.name)
    return {**parsed.model_dump(), "recipe": [{"step": s.kind, **s.options} for s in steps]}


def check_parent(opened: OpenedVersion, params: dict[str, Any]) -> None:
    """Refuse a recipe that does not fit the parent (InvalidRequest naming the step), and a
    result without a model of its tenant to go to."""
    check(parse(params["recipe"]), opened.manifest)
    if opened.record.tenant_id is None and not params.get("name"):
        raise InvalidRequest(
            f"{opened.record.name} is shared by every tenant: name the model the optimized "
            "version becomes (name)",
            param="name",
        )


def run(context) -> dict[str, Any]:
    params = OptimizeParams(**context.params)
    tenant = context.lease.job.tenant_id
    registry = open_registry(context.settings)
    try:
        record = registry.resolve(params.model)
        if record.tenant_id not in (None, tenant):
            raise ModelNotFound(f"model {parse_reference(params.model).name!r} not found")
        opened = registry.open_version(record.reference)
        check_parent(opened, context.params)
        steps = parse(params.recipe)
        parent, description = _load(opened)
        candidate = Candidate(_load(opened)[0], description)  # its own copy: steps change it
        for index, step in enumerate(steps):
            context.report(index / (len(steps) + 1), message=f"step {index + 1}: {step}")
            candidate = apply(step, candidate)
            context.report(message=candidate.notes[-1])
        context.report(len(steps) / (len(steps) + 1), message="measuring parent and child")
        folder = _write(candidate, opened, context.workdir / "model")
        return _register(context, registry, params, opened, folder, parent, candidate, tenant)
    finally:
        registry.close()


def _load(opened: OpenedVersion) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The parent's float module, as its runtime builds it, and its folder's description."""
    from safetensors.torch import load

    from maas.runtime.architectures.folder import ARCHITECTURE_FILE, load_module

    config = opened.manifest.config
    state = load(opened.read_bytes(config.get("weights", "model.safetensors")))
    module = load_module(config["architecture"], config.get("arguments", {}), state)
    description = json.loads(opened.read_bytes(ARCHITECTURE_FILE))
    return module, description


def _write(candidate: Candidate, opened: OpenedVersion, folder):
    """The child's folder: its weights and description, and the parent's other files (a
    text model's tokenizer)."""
    from maas.runtime.architectures.folder import ARCHITECTURE_FILE, WEIGHTS_FILE, save_folder

    description = candidate.description
    save_folder(
        candidate.module,
        folder,
        architecture=description["architecture"],
        arguments=description.get("arguments", {}),
        labels=description.get("labels"),
        preprocessing=description.get("preprocessing"),
        quantization=candidate.quantization,
        state=candidate.state,
    )
    for entry in opened.manifest.files:
        if entry.path not in (ARCHITECTURE_FILE, WEIGHTS_FILE, "manifest.json"):
            target = folder / entry.path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(opened.read_bytes(entry.path))
    return folder


def _register(context, registry, params, opened, folder, parent, candidate, tenant):
    from maas.runtime.architectures.folder import load_folder

    child, _ = load_folder(folder)
    description = candidate.description
    inputs = report.sample_inputs(
        description["architecture"], description.get("arguments", {}), report.SAMPLES, params.seed
    )
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    measured = {
        "parent": report.measure(parent, opened.manifest.size_bytes, inputs),
        "child": report.measure(child, size, inputs),
    }
    figures = {
        **measured["child"],
        **report.compare(measured["parent"], measured["child"]),
        **report.parity(parent, child, inputs),
    }
    base = opened.record
    name = params.name or base.name
    recipe = {
        "job": context.job_id,
        "kind": KIND,
        "steps": params.recipe,
        "notes": candidate.notes,
        "parent_figures": measured["parent"],
    }
    result = {"model": name, "parent": base.reference, **figures}
    context.flush()
    version = registry.import_model(
        folder,
        name,
        task=opened.manifest.task,
        owner=tenant,
        source_label=f"job {context.job_id}",
        made=Made(figures, recipe, parent=(base.name, base.version)),
        consume=True,
        before_commit=lambda session, number: context.finish_in(
            session, {**result, "version": number, "reference": f"{name}:{number}"}
        ),
    )
    return {**result, "version": version.version}
