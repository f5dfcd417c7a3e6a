"""The ``optimize`` job: a registered version through a recipe's steps into a new version of
the same model (or of a new model, ``name``), whose manifest records its ``parent``, the
recipe and what each step did, and the report measured on parent and child in this run."""

from __future__ import annotations

import copy
import json
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from maas.errors import InvalidRequest, ModelNotFound, NotFound
from maas.files import FileStore
from maas.jobs.kinds import parse_params
from maas.optimize import data, report
from maas.optimize.recipe import check, parse
from maas.optimize.steps import Candidate, Materials, apply
from maas.optimize.versions import folder_bytes, opened_folder
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
    """The sample inputs the report measures both models on, and the order and start of
    what the learning steps learn."""
    training_file: str | None = Field(default=None, min_length=1, max_length=40)
    """A ``dataset`` file the learning steps learn from (a fine-tune after pruning,
    distillation): image folders for small-cnn, a CSV or JSON Lines of ``text`` and
    ``label`` for the text classifiers (maas/optimize/data.py), of ``text`` for an LLM (whose
    structured pruning is calibrated on it too)."""
    evaluation_file: str | None = Field(default=None, min_length=1, max_length=40)
    """A dataset of the same kind on which the report measures both models' accuracy."""


def validate(params: dict[str, Any]) -> dict[str, Any]:
    parsed = parse_params(OptimizeParams, params)
    steps = parse(parsed.recipe)
    if parsed.name is not None:
        validate_model_name(parsed.name)
    return {**parsed.model_dump(), "recipe": [{"step": s.kind, **s.options} for s in steps]}


def check_parent(
    registry, files, opened: OpenedVersion, params: dict[str, Any], tenant: int | None
) -> None:
    """Refuse a recipe that does not fit the parent (InvalidRequest naming the step), a
    learning step without data to learn from, a teacher that does not fit, a dataset the
    model cannot read, and a result without a model of its tenant to go to."""
    steps = parse(params["recipe"])
    check(steps, opened.manifest)
    if opened.record.tenant_id is None and not params.get("name"):
        raise InvalidRequest(
            f"{opened.record.name} is shared by every tenant: name the model the optimized "
            "version becomes (name)",
            param="name",
        )
    llm = opened.manifest.runtime == "llm"
    texts_only = llm or opened.manifest.runtime == "transformers"
    learns = [s.needs_data or (llm and s.kind == "prune") for s in steps]
    if texts_only and params.get("training_file") and not any(learns):
        raise InvalidRequest(
            f"these steps for a model of the {opened.manifest.runtime} runtime learn nothing: "
            "give an evaluation_file (texts) alone",
            param="training_file",
        )
    description = {"architecture": "texts"} if texts_only else _description(opened)
    for index, step in enumerate(steps):
        if learns[index] and not params.get("training_file"):
            data_kind = (
                "texts: a dataset with a 'text' column, or a fine-tune file of chats"
                if llm
                else "a dataset"
            )
            raise InvalidRequest(
                f"step {index + 1} ({step}) learns or calibrates from data: give a "
                f"training_file ({data_kind})",
                param="training_file",
            )
        if step.options.get("teacher"):
            _teacher(registry, opened, step.options["teacher"], tenant, f"step {index + 1}")
    for name in ("training_file", "evaluation_file"):
        if params.get(name):
            try:
                record = files.get(params[name], tenant)
            except NotFound:
                raise InvalidRequest(
                    f"no file {params[name]!r} in your tenant", param=name
                ) from None
            chats = llm and name == "training_file"
            data.check_file(record, description | {"chats": chats}, name)


def _teacher(registry, opened: OpenedVersion, reference: str, tenant, where: str):
    """The teacher a distil step names: a float built-in model of the parent's task that
    gives the parent's labels."""
    try:
        record = registry.resolve(reference)
    except ModelNotFound:
        record = None
    if record is None or record.tenant_id not in (None, tenant):
        raise InvalidRequest(f"{where}: no teacher model {reference!r}", param="recipe")
    teacher = registry.open_version(record.reference)
    mine, theirs = opened.manifest, teacher.manifest
    if theirs.task != mine.task:
        raise InvalidRequest(
            f"{where}: the teacher {record.reference} is a {theirs.task} model; the student "
            f"is {mine.task}",
            param="recipe",
        )
    if theirs.runtime != "torch" or "architecture" not in theirs.config:
        raise InvalidRequest(
            f"{where}: the teacher {record.reference} is not one of maas's built-in torch "
            "architectures",
            param="recipe",
        )
    if theirs.config.get("quantization"):
        raise InvalidRequest(
            f"{where}: the teacher {record.reference} is {theirs.config['quantization']}; "
            "teach with a float version",
            param="recipe",
        )
    if theirs.labels != mine.labels:
        raise InvalidRequest(
            f"{where}: the teacher {record.reference} gives other labels than the student",
            param="recipe",
        )
    return teacher


def run(context) -> dict[str, Any]:
    params = OptimizeParams(**context.params)
    tenant = context.lease.job.tenant_id
    registry = open_registry(context.settings)
    try:
        record = registry.resolve(params.model)
        if record.tenant_id not in (None, tenant):
            raise ModelNotFound(f"model {parse_reference(params.model).name!r} not found")
        opened = registry.open_version(record.reference)
        files = FileStore.of_registry(registry, context.settings)
        check_parent(registry, files, opened, context.params, tenant)
        steps = parse(params.recipe)
        if opened.manifest.runtime == "llm":
            from maas.optimize import llm_job

            return llm_job.run(context, registry, files, params, opened, steps, tenant)
        if opened.manifest.runtime == "transformers":
            return _run_encoder(context, registry, files, params, opened, steps, tenant)
        parent, description = _load(opened)
        candidate = Candidate(copy.deepcopy(parent), description)  # steps change their copy
        share = 1 / (len(steps) + 1)
        examples = (
            _examples(context, files, registry, opened, params.training_file, "training")
            if any(step.needs_data for step in steps)
            else None
        )
        for index, step in enumerate(steps):

            def progress(done: int, total: int, loss: float, index=index) -> None:
                context.report(
                    (index + done / total) * share, message=f"training step {done}: loss {loss:.4f}"
                )

            context.report(index * share, message=f"step {index + 1}: {step}")
            materials = Materials(
                examples,
                _teacher_module(registry, opened, step, tenant) or parent,
                params.seed,
                progress,
                task=opened.manifest.task,
                workdir=context.workdir,
            )
            candidate = apply(step, candidate, materials)
            context.report(message=candidate.notes[-1])
        context.report(len(steps) / (len(steps) + 1), message="measuring parent and child")
        folder = _write(candidate, opened, context.workdir / "model")
        evaluation = (
            _examples(context, files, registry, opened, params.evaluation_file, "evaluation")
            if params.evaluation_file
            else None
        )
        return _register(
            context, registry, params, opened, folder, parent, candidate, tenant, evaluation
        )
    finally:
        registry.close()


def _run_encoder(context, registry, files, params, opened, steps, tenant) -> dict[str, Any]:
    """A Hugging Face encoder's recipe (quantize int8-dynamic, export onnx after a quantize
    step or not), measured as it serves."""
    from maas.optimize import encoder

    context.report(0.0, message=" -> ".join(map(str, steps)))
    folder = context.workdir / "model"
    if folder.exists():  # what an attempt that died left
        import shutil

        shutil.rmtree(folder)
    texts = evaluation_texts(context, files, params, tenant)
    if steps[-1].kind == "export":  # recipe.check: export onnx, after a quantize step or not
        quantization = steps[0].variant if len(steps) == 2 else None
        calibration = None
        if quantization == "int8-static":
            from maas.training import text_data

            path = text_data.fetch(files, params.training_file, tenant, context.workdir)
            calibration = data.read_evaluation_texts(path, "training")
        note = encoder.export_onnx(opened, folder, quantization, calibration)
    else:
        note = encoder.quantize_int8_dynamic(opened, folder, texts)
    context.report(0.5, message=note)
    context.report(0.6, message="measuring parent and child")
    parent_figures, figures = encoder.measure(
        opened, opened_folder(opened, folder), folder_bytes(folder), texts
    )
    return import_child(
        context, registry, params, opened, folder, figures, parent_figures, [note], tenant
    )


def evaluation_texts(context, files, params, tenant) -> list[str] | None:
    """The evaluation file's texts, for the models that read texts."""
    if not params.evaluation_file:
        return None
    from maas.training import text_data

    path = text_data.fetch(files, params.evaluation_file, tenant, context.workdir)
    return data.read_evaluation_texts(path)


def _examples(context, files, registry, opened: OpenedVersion, file_id: str, purpose: str):
    """A dataset file's examples, read as the parent reads its inputs."""
    from maas.training import text_data
    from maas.training.image_data import extract

    description = _description(opened)
    tenant = context.lease.job.tenant_id
    folder = context.workdir / purpose
    folder.mkdir(parents=True, exist_ok=True)
    if description["architecture"] == "small-cnn":
        path = extract(files, file_id, tenant, folder, registry.limits)
    else:
        path = text_data.fetch(files, file_id, tenant, folder)
    tokenizer = (
        opened.read_bytes("tokenizer.json").decode()
        if any(f.path == "tokenizer.json" for f in opened.manifest.files)
        else None
    )
    return data.load(path, description, tokenizer)


def _teacher_module(registry, opened: OpenedVersion, step, tenant) -> torch.nn.Module | None:
    if not step.options.get("teacher"):
        return None
    where = "the distil step"
    return _load(_teacher(registry, opened, step.options["teacher"], tenant, where))[0]


def _load(opened: OpenedVersion) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The parent's float module, as its runtime builds it, and its folder's description."""
    from safetensors.torch import load

    from maas.runtime.architectures.folder import load_module

    config = opened.manifest.config
    state = load(opened.read_bytes(config.get("weights", "model.safetensors")))
    module = load_module(config["architecture"], config.get("arguments", {}), state)
    return module, _description(opened)


def _description(opened: OpenedVersion) -> dict[str, Any]:
    """The version's maas-architecture.json: architecture, arguments, labels, preprocessing."""
    from maas.runtime.architectures.folder import ARCHITECTURE_FILE

    return json.loads(opened.read_bytes(ARCHITECTURE_FILE))


def _write(candidate: Candidate, opened: OpenedVersion, folder):
    """The child's folder: its weights and description, and the parent's other files (a
    text model's tokenizer)."""
    from maas.runtime.architectures.folder import save_folder

    description = candidate.description
    folder.mkdir(parents=True, exist_ok=True)
    if candidate.exported is not None:
        candidate.exported.replace(folder / candidate.exported.name)
        _copy_others(opened, folder)
        return folder
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
    _copy_others(opened, folder)
    return folder


def _copy_others(opened: OpenedVersion, folder) -> None:
    """The parent's files beside its weights and description (a text model's tokenizer)."""
    from maas.runtime.architectures.folder import ARCHITECTURE_FILE, WEIGHTS_FILE

    for entry in opened.manifest.files:
        if entry.path not in (ARCHITECTURE_FILE, WEIGHTS_FILE, "manifest.json"):
            target = folder / entry.path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(opened.read_bytes(entry.path))


def _register(context, registry, params, opened, folder, parent, candidate, tenant, evaluation):
    from maas.runtime.architectures import signature
    from maas.runtime.architectures.folder import load_folder

    if candidate.exported is not None:
        from maas.optimize.onnx_export import OnnxModule

        child = OnnxModule(folder / candidate.exported.name)
    else:
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
    if evaluation is not None:
        first = signature(description["architecture"], description["arguments"])[0][0]["name"]
        for side, module in (("parent", parent), ("child", child)):
            measured[side]["accuracy"] = report.accuracy(
                module, first, evaluation.inputs, evaluation.labels
            )
            measured[side]["evaluation_examples"] = float(len(evaluation))
    figures = {
        **measured["child"],
        **report.compare(measured["parent"], measured["child"]),
        **report.parity(parent, child, inputs),
    }
    return import_child(
        context,
        registry,
        params,
        opened,
        folder,
        figures,
        measured["parent"],
        candidate.notes,
        tenant,
    )


def import_child(context, registry, params, opened, folder, figures, parent_figures, notes, tenant):
    """The child folder as a new version, with its parent, recipe and report, in the same
    transaction as the job's end."""
    base = opened.record
    name = params.name or base.name
    recipe = {
        "job": context.job_id,
        "kind": KIND,
        "steps": params.recipe,
        "notes": notes,
        "parent_figures": parent_figures,
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
