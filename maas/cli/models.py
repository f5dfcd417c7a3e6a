"""``maas models ...``: import, list, show, alias, remove and verify models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from maas.cli.context import open_access, open_registry
from maas.cli.output import console, progress_bar
from maas.cli.remote import ServerClient
from maas.errors import InvalidReference, InvalidRequest
from maas.registry import TASKS, ModelRecord, VersionRecord, parse_reference
from maas.registry.manifest import GENERATION_TASKS
from maas.registry.service import ANY_OWNER
from maas.tasks.sampling import (
    checked,
    effective_defaults,
    parse_assignments,
)

app = typer.Typer(help="Import, list, show, alias and remove models.", no_args_is_help=True)

DefaultsArgument = Annotated[
    list[str] | None,
    typer.Argument(
        metavar="[FIELD=VALUE]...",
        help="temperature, top_p, top_k, min_p, presence_penalty, frequency_penalty, "
        "repetition_penalty or max_tokens; FIELD= unsets one.",
        show_default=False,
    ),
]

TaskOption = Annotated[
    str | None,
    typer.Option(
        "--task", "-t", help=f"What the model does: {', '.join(TASKS)}. Detected when left out."
    ),
]


@app.command("import")
def import_(
    path: Annotated[
        Path,
        typer.Argument(
            help="A Hugging Face folder, a .gguf or .onnx file, or a .tar.gz/.zip of one."
        ),
    ],
    name: Annotated[
        str,
        typer.Option("--name", "-n", help="Model name: lowercase letters, digits, '-', '_', '.'."),
    ],
    task: TaskOption = None,
    alias: Annotated[
        str | None,
        typer.Option(
            "--alias", "-a", help="Point this alias (e.g. production) at the new version."
        ),
    ] = None,
    description: Annotated[
        str | None, typer.Option("--description", "-d", help="What the model is, for people.")
    ] = None,
    tenant: Annotated[
        str | None,
        typer.Option(help="Tenant that owns a new model (left out: shared with all tenants)."),
    ] = None,
    default: Annotated[
        list[str] | None,
        typer.Option(
            "--default",
            help="A default sampling parameter of a text-generation model, FIELD=VALUE "
            "(e.g. temperature=0.2); repeat for more. Requests override them.",
        ),
    ] = None,
) -> None:
    """Import model files as the next version of NAME (atomic: all or nothing)."""
    sampling = checked(parse_assignments(default or [])) or None
    with open_access() as access, progress_bar() as progress:
        owner = access.tenants.get_id(tenant) if tenant else ANY_OWNER
        record = access.registry.import_model(
            path,
            name,
            task=task,
            alias=alias,
            description=description,
            progress=progress,
            owner=owner,
            sampling=sampling,
        )
    console.print(
        f"imported [bold]{record.reference}[/] ({record.task}, {record.format}, "
        f"{_size(record.size_bytes)})" + (f" as @{alias}" if alias else "")
    )


@app.command("list")
def list_() -> None:
    """List models with their latest version and aliases."""
    with open_registry() as registry:
        models = registry.list_models()
    if not models:
        console.print("no models yet; import one with: maas models import PATH --name NAME")
        return
    table = Table("name", "task", "latest", "aliases", "versions", "size")
    for model in models:
        latest = model.latest
        table.add_row(
            model.name,
            model.task,
            str(latest.version) if latest else "-",
            ", ".join(f"{a}->{v}" for a, v in sorted(model.aliases.items())) or "-",
            str(len(model.versions)),
            _size(latest.size_bytes) if latest else "-",
        )
    console.print(table)


@app.command("show")
def show(
    reference: Annotated[
        str, typer.Argument(help="NAME for the model, NAME:V or NAME@ALIAS for one version.")
    ],
    as_json: Annotated[
        bool, typer.Option("--json", help="Print JSON (the manifest, for a version).")
    ] = False,
) -> None:
    """Show a model and its versions, or one version's manifest."""
    ref = parse_reference(reference)
    with open_registry() as registry:
        if ref.version is None and ref.alias is None:
            _show_model(registry.get_model(ref.name), as_json)
            return
        record = registry.resolve(ref)
        manifest = registry.read_manifest(record)
    if as_json:
        console.print_json(manifest.model_dump_json())
        return
    _show_version(record)
    console.print(f"architecture  {manifest.architecture or '-'}")
    console.print(f"context       {manifest.context_length or '-'}")
    console.print(f"chat template {'yes' if manifest.chat_template else 'no'}")
    files = Table("file", "size", "sha256")
    for entry in manifest.files:
        files.add_row(entry.path, _size(entry.size), entry.sha256[:16] + "…")
    console.print(files)


@app.command("split-plan")
def split_plan(
    reference: Annotated[str, typer.Argument(help="NAME, NAME:V or NAME@ALIAS.")],
    stages: Annotated[int, typer.Option("--stages", "-k", min=1, help="Pipeline stages.")] = 2,
    dtype: Annotated[
        str,
        typer.Option(help="The dtype the weights run in: float32, bfloat16, int8-weight, int8."),
    ] = "float32",
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
) -> None:
    """Show how a model is cut into pipeline stages (MAAS_LLM_PIPELINE_STAGES): each stage's
    layers, parameters and bytes, about 1/K of the model each."""
    from maas.distributed.stages import plan_for
    from maas.routing.llm_deployment import runs_on_engine

    with open_registry() as registry, progress_bar() as progress:
        opened = registry.open_version(reference, progress)
    if opened.record.task not in GENERATION_TASKS or not runs_on_engine(opened.manifest):
        raise InvalidRequest(
            f"{opened.record.reference} is not a Llama-family LLM: pipeline stages split "
            "models that maas's engine runs"
        )
    if dtype not in ("float32", "bfloat16", "int8-weight", "int8"):
        raise InvalidRequest(f"unknown dtype {dtype!r}", param="dtype")
    plan = plan_for(opened, stages, dtype)
    if as_json:
        console.print_json(json.dumps(plan.to_dict()))
        return
    table = Table("stage", "layers", "parameters", "size", "node", title=plan.model)
    for stage in plan.stages:
        first, last = stage.unit_range.start, stage.unit_range.stop - 1
        table.add_row(
            str(stage.index),
            f"blocks {first}-{last}",
            f"{stage.count:,}",
            _size(stage.bytes),
            stage.node,
        )
    console.print(table)
    console.print(f"{_size(plan.bytes)} in {dtype}; largest stage {plan.imbalance:.2f}x the mean")
    for note in plan.notes:
        console.print(f"note: {note}")


@app.command("defaults")
def defaults(
    name: Annotated[str, typer.Argument(help="Model name.")], assignments: DefaultsArgument = None
) -> None:
    """Show or change a text-generation model's default sampling parameters.

    With no FIELD=VALUE, shows them: the model's own, then those of its latest version's
    generation_config.json. Requests override every one; the running server uses a change
    within 2 seconds.
    """
    with open_registry() as registry:
        model = registry.get_model(name)
        if model.task not in GENERATION_TASKS:
            raise InvalidRequest(f"{name} is a {model.task} model; only text generation samples")
        if assignments:
            wanted = {**model.sampling, **parse_assignments(assignments)}
            model = registry.set_sampling(name, checked(wanted))
        manifest = registry.read_manifest(model.latest) if model.latest else None
    generation_config = manifest.generation_config if manifest else None
    table = Table("field", "default", "from")
    for field, value in sorted(effective_defaults(generation_config, model.sampling).items()):
        source = "model" if field in model.sampling else "generation_config.json"
        table.add_row(field, str(value), source)
    if not table.rows:
        console.print(f"{name} has no default sampling parameters: OpenAI's defaults apply")
        return
    console.print(table)


@app.command("alias")
def alias(
    name: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[
        int, typer.Argument(help="Version number the alias should point at.", min=1)
    ],
    alias_name: Annotated[
        str, typer.Argument(metavar="ALIAS", help="Alias, e.g. production or staging.")
    ],
) -> None:
    """Point ALIAS of model NAME at VERSION (creates or moves it)."""
    with open_registry() as registry:
        record = registry.set_alias(name, alias_name, version)
    console.print(f"{name}@{alias_name} -> {record.reference}")


@app.command("unalias")
def unalias(
    name: Annotated[str, typer.Argument(help="Model name.")],
    alias_name: Annotated[str, typer.Argument(metavar="ALIAS", help="Alias to remove.")],
) -> None:
    """Remove ALIAS from model NAME (the version stays)."""
    with open_registry() as registry:
        registry.delete_alias(name, alias_name)
    console.print(f"removed {name}@{alias_name}")


@app.command("rm")
def rm(
    reference: Annotated[
        str, typer.Argument(help="NAME to remove the model, NAME:V to remove one version.")
    ],
    force: Annotated[
        bool, typer.Option("--force", help="Also drop aliases that point at the version.")
    ] = False,
) -> None:
    """Remove a model with all its versions, or one version."""
    ref = parse_reference(reference)
    if ref.alias is not None:
        raise InvalidReference("rm takes NAME or NAME:VERSION, not an alias", param="reference")
    with open_registry() as registry:
        if ref.version is None:
            registry.delete_model(ref.name)
        else:
            registry.delete_version(ref.name, ref.version, force=force)
    console.print(f"removed {ref}")


@app.command("verify")
def verify(
    reference: Annotated[str, typer.Argument(help="NAME, NAME:V or NAME@ALIAS.")],
) -> None:
    """Check every file of a version against the sha256 recorded at import."""
    with open_registry() as registry, progress_bar() as progress:
        opened = registry.open_version(reference, progress)
    console.print(
        f"{opened.record.reference}: {len(opened.manifest.files)} files match their sha256"
    )


def _show_model(model: ModelRecord, as_json: bool) -> None:
    if as_json:
        console.print_json(
            json.dumps(
                model.model_dump(
                    mode="json", exclude={"versions": {"__all__": {"path", "manifest_sha256"}}}
                )
            )
        )
        return
    console.print(f"[bold]{model.name}[/]  {model.task}  {model.description}")
    table = Table("version", "format", "runtime", "size", "aliases", "created")
    for v in model.versions:
        table.add_row(
            str(v.version),
            v.format,
            v.runtime,
            _size(v.size_bytes),
            ", ".join(v.aliases) or "-",
            v.created_at.strftime("%Y-%m-%d %H:%M"),
        )
    console.print(table)


def _show_version(record: VersionRecord) -> None:
    console.print(f"[bold]{record.reference}[/]  {record.task}")
    console.print(f"format        {record.format} (runtime {record.runtime})")
    console.print(f"size          {_size(record.size_bytes)} in {record.num_files} files")
    console.print(f"aliases       {', '.join(record.aliases) or '-'}")


def _size(num_bytes: int) -> str:
    size = float(num_bytes)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


@app.command("load")
def load(reference: Annotated[str, typer.Argument(help="NAME, NAME:V or NAME@ALIAS.")]) -> None:
    """Load a version into the running server now (it would load on its first request)."""
    ServerClient().request("POST", f"/v2/repository/models/{reference}/load")
    console.print(f"loaded {reference}")


@app.command("unload")
def unload(
    reference: Annotated[str, typer.Argument(help="NAME, NAME:V or NAME@ALIAS.")],
    force: Annotated[
        bool, typer.Option("--force", help="Unload a pinned model too (admin keys only).")
    ] = False,
) -> None:
    """Unload a version from the running server once its requests finish."""
    params = {"force": "true"} if force else None
    ServerClient().request("POST", f"/v2/repository/models/{reference}/unload", params=params)
    console.print(f"unloaded {reference}")


@app.command("loaded")
def loaded() -> None:
    """List what the running server has loaded."""
    deployments = ServerClient().request("GET", "/api/v1/deployments")["data"]
    table = Table("model", "version", "memory", "running", "queued rows", "pinned")
    for d in deployments:
        table.add_row(
            d["model"],
            str(d["version"]),
            _size(d["memory_bytes"]),
            str(d["in_flight"]),
            str(d["queued_rows"]),
            "yes" if d["pinned"] else "",
        )
    console.print(table)


@app.command("configure")
def configure(
    name: Annotated[str, typer.Argument(help="Model name.")],
    max_batch_size: Annotated[
        int | None, typer.Option(help="Rows per forward pass (1: no batching).", min=1, max=4096)
    ] = None,
    max_delay_ms: Annotated[
        float | None,
        typer.Option(help="How long a request may wait for company.", min=0, max=10000),
    ] = None,
    max_queue_rows: Annotated[
        int | None, typer.Option(help="Rows that may wait before 503.", min=1)
    ] = None,
    pipeline_stages: Annotated[
        int | None,
        typer.Option(
            help="Split an LLM across this many processes from its next load on.", min=1, max=64
        ),
    ] = None,
) -> None:
    """Change a model's serving settings on the running server (batching applies to the next
    batch, pipeline stages to the next load)."""
    serving = {
        key: value
        for key, value in {
            "max_batch_size": max_batch_size,
            "max_delay_ms": max_delay_ms,
            "max_queue_rows": max_queue_rows,
            "pipeline_stages": pipeline_stages,
        }.items()
        if value is not None
    }
    model = ServerClient().request("PATCH", f"/api/v1/models/{name}", json={"serving": serving})
    console.print(f"{name}: {model['serving'] or 'default batching'}")


@app.command("compare")
def compare(
    first: Annotated[str, typer.Argument(help="A version: NAME:V or NAME@ALIAS.")],
    second: Annotated[str, typer.Argument(help="Another version.")],
) -> None:
    """Two versions' figures side by side. When one was optimized from the other, both
    columns come from its report, measured in the same run; otherwise each version's own
    metrics (from different runs: read them with care)."""
    with open_registry() as registry:
        records = [registry.resolve(first), registry.resolve(second)]
        manifests = [registry.read_manifest(r) for r in records]
    columns, note = report_columns(records, manifests)
    table = Table("figure", *(r.reference for r in records), "second / first")
    for name in sorted(set(columns[0]) | set(columns[1])):
        a, b = columns[0].get(name), columns[1].get(name)
        ratio = f"{b / a:.3g}x" if a and b is not None else "-"
        table.add_row(name, _figure(a), _figure(b), ratio)
    console.print(table)
    console.print(note, highlight=False)


def report_columns(records, manifests) -> tuple[list[dict[str, float]], str]:
    """Each version's figures, from one report when one version is the other's parent."""
    for child in (0, 1):
        parent = 1 - child
        ref = manifests[child].parent
        recipe = manifests[child].recipe or {}
        mine = (records[parent].name, records[parent].version)
        if ref is not None and (ref.name, ref.version) == mine and "parent_figures" in recipe:
            from maas.optimize.report import split_figures

            columns = [{}, {}]
            columns[parent] = recipe["parent_figures"]
            columns[child] = split_figures(manifests[child].metrics)["figures"]
            return columns, f"measured together by {records[child].reference}'s job"
    return [m.metrics for m in manifests], "each version's own metrics, from different runs"


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"
