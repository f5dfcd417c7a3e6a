"""The ``train`` job: a built-in architecture trained from scratch on an uploaded dataset.

``small-cnn`` learns from an archive of image folders; ``lstm-classifier`` and
``transformer-classifier`` from a CSV or JSON Lines of texts and labels, with a word-level
tokenizer learnt from the training texts (``purpose: dataset`` files all). Each epoch ends
with a validation pass and a checkpoint (a new attempt resumes after the last one, same
sample order); the best epoch's weights (lowest validation loss) become a new version of
``model`` in the registry, with its labels, preprocessing, metrics and recipe, servable at
once through ``:predict`` and v2.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from maas.errors import InvalidRequest
from maas.files import FileStore
from maas.jobs.kinds import parse_params
from maas.registry import open_registry
from maas.registry.names import validate_model_name
from maas.registry.rows import Made
from maas.runtime.architectures import build, resolve_arguments
from maas.runtime.architectures.folder import save_folder
from maas.tasks.images import ImagePreprocessing
from maas.training import checkpoint, text_data
from maas.training.checkpoint import TrainingState
from maas.training.distributed import Team, train_together
from maas.training.image_data import extract, load_split
from maas.training.strategies import check_strategy, team_spec

MEAN, STD = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]


class TrainParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    training_file: str = Field(min_length=1, max_length=40)
    """A ``dataset`` file: an archive of image folders, one folder per class (small-cnn), or
    a CSV with a text column and a label column, or JSON Lines with such fields (the text
    classifiers)."""
    model: str
    """The model the result becomes a new version of (created if new, in the job's tenant)."""
    architecture: Literal["small-cnn", "lstm-classifier", "transformer-classifier"] = "small-cnn"
    arguments: dict[str, Any] = Field(default_factory=dict)
    """The architecture's arguments, but for those the data sets (see ``FROM_DATA``)."""
    image_size: int = Field(default=16, ge=4, le=512)
    """small-cnn: images are resized to this square."""
    text_column: str = Field(default="text", min_length=1, max_length=255)
    """Text classifiers: the column (CSV) or field (JSON Lines) of the texts; ``label_column``
    that of their labels."""
    label_column: str = Field(default="label", min_length=1, max_length=255)
    max_length: int = Field(default=128, ge=1, le=4096)
    """Text classifiers: tokens kept of each text (as serving will keep)."""
    max_vocab: int = Field(default=20_000, ge=10, le=1_000_000)
    """Text classifiers: the learnt vocabulary's size, at most."""
    validation_fraction: float = Field(default=0.2, ge=0.0, lt=1.0)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    epochs: int = Field(default=10, ge=1, le=10_000)
    batch_size: int = Field(default=64, ge=1, le=65_536)
    learning_rate: float = Field(default=1e-3, gt=0, le=10)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float = Field(default=0.01, ge=0, le=1)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    schedule: Literal["constant", "cosine"] = "cosine"
    early_stopping_patience: int | None = Field(default=None, ge=1, le=10_000)
    """Stop after this many epochs without a lower validation loss."""
    max_runtime_seconds: float | None = Field(default=None, gt=0)
    log_every_steps: int = Field(default=10, ge=1, le=1_000_000)
    world_size: int = Field(default=1, ge=1, le=8)
    """Processes training together (``torch.distributed`` with gloo on loopback), as
    ``strategy`` says."""
    strategy: Literal["data", "pipeline", "hybrid", "parameter-server"] = "data"
    """With ``world_size`` > 1: ``data`` (``DistributedDataParallel``: each global batch split
    across the processes and their gradients summed, so the result equals one process's);
    ``pipeline`` (the model's layers in ``world_size`` stages, ``torch.distributed.pipelining``
    over ``micro_batches``); ``hybrid`` (``world_size / pipeline_stages`` data-parallel
    pipelines); ``parameter-server`` (rank 0 holds the parameters and the optimizer, the
    others compute gradients: ``ps_mode`` sync or async). See maas/training/strategies.py."""
    pipeline_stages: int | None = Field(default=None, ge=2, le=8)
    """``hybrid``: stages per pipeline (``pipeline``: all of ``world_size``)."""
    micro_batches: int = Field(default=4, ge=1, le=1024)
    """``pipeline`` and ``hybrid``: micro-batches each batch (share) is cut into."""
    pipeline_schedule: Literal["gpipe", "1f1b"] = "gpipe"
    ps_mode: Literal["sync", "async"] = "sync"
    """``parameter-server``: sync (every worker's gradient for each batch, then one update:
    data parallel's) or async (each gradient applied as it arrives)."""
    max_staleness: int | None = Field(default=None, ge=0, le=1_000_000)
    """``parameter-server`` async: a gradient computed on parameters more than this many
    updates old is refused and computed again (None: any is applied; staleness is
    measured and reported either way)."""
    checkpoint_every_seconds: float = Field(default=10.0, ge=0, le=86_400)
    """A checkpoint after an epoch once this long has passed since the last one (0: after
    every epoch): a crash loses at most this much work, and short epochs do not spend their
    time writing checkpoints."""


FROM_DATA = {
    "small-cnn": ("num_classes", "image_size", "in_channels"),
    "lstm-classifier": ("num_classes", "vocab_size", "padding_idx"),
    "transformer-classifier": ("num_classes", "vocab_size", "padding_idx", "max_length"),
}
"""Arguments the data (or another parameter) decides, refused in ``arguments``."""


def validate(params: dict[str, Any]) -> dict[str, Any]:
    parsed = parse_params(TrainParams, params)
    try:
        validate_model_name(parsed.model)
    except InvalidRequest as err:
        raise InvalidRequest(str(err), param="params.model") from None
    decided = [name for name in FROM_DATA[parsed.architecture] if name in parsed.arguments]
    if decided:
        raise InvalidRequest(
            f"{decided[0]} is set from the dataset and the job's parameters, not in arguments",
            param="params.arguments",
        )
    try:
        resolve_arguments(parsed.architecture, _arguments(parsed, classes=2, vocab=100))
    except Exception as err:  # UnsupportedFormat names the argument
        raise InvalidRequest(str(err), param="params.arguments") from None
    _check_strategy(parsed)
    return parsed.model_dump()


def _check_strategy(params: TrainParams) -> None:
    """Refuse a strategy the world size or the architecture cannot run."""
    layers = _layer_count(params) if params.strategy in ("pipeline", "hybrid") else None
    check_strategy(params, params.batch_size, layers, params.architecture)


def _layer_count(params: TrainParams) -> int:
    """The units a pipeline can cut the architecture into (see its ``pipeline_layers``)."""
    from maas.distributed.classic import pipeline_layers

    with torch.device("meta"):
        model = build(params.architecture, _arguments(params, classes=2, vocab=100))
    return len(pipeline_layers(model))


def _arguments(params: TrainParams, *, classes: int, vocab: int) -> dict[str, Any]:
    if params.architecture == "small-cnn":
        extra = {"image_size": params.image_size, "in_channels": 3}
    else:
        extra = {"vocab_size": vocab, "padding_idx": 0}
        if params.architecture == "transformer-classifier":
            extra["max_length"] = params.max_length
    return {**params.arguments, **extra, "num_classes": classes}


def run(context) -> dict[str, Any]:
    params = TrainParams(**context.params)
    registry = open_registry(context.settings)
    try:
        files = FileStore.of_registry(registry, context.settings)
        tenant = context.lease.job.tenant_id
        data = _load(files, registry.limits, params, tenant, context.workdir)
        context.report(
            0.0,
            message=f"{len(data.train[1])} training and {len(data.validation[1])} validation "
            f"examples, {len(data.classes)} classes",
        )
        arguments = _arguments(params, classes=len(data.classes), vocab=data.vocab_size)
        if params.world_size > 1:
            state, best = train_together(
                context,
                params.world_size,
                f"{__name__}:train_rank",
                (params, arguments, data),
                team=team_spec(params),
            )
        else:
            state, best = _train(context, params, arguments, data)
        model = build(params.architecture, arguments)
        model.load_state_dict(best)
        folder = save_folder(
            model,
            context.workdir / "model",
            architecture=params.architecture,
            arguments=arguments,
            labels=data.classes,
            preprocessing=data.preprocessing,
        )
        for name, text in data.files.items():
            (folder / name).write_text(text)
        best_row = state.history[state.best_epoch - 1] if state.best_epoch else state.history[-1]
        metrics = {k: float(v) for k, v in best_row.items()}
        recipe = {"job": context.job_id, "kind": "train", "params": context.params}
        result = {
            "model": params.model,
            "best_epoch": state.best_epoch,
            "epochs": state.epoch,
            **metrics,
            "usage": {"samples": len(data.train[1]) * state.epoch},
        }
        context.flush()  # the epochs' events on record before the import takes the write lock
        version = registry.import_model(
            folder,
            params.model,
            task=data.task,
            owner=tenant,
            source_label=f"job {context.job_id}",
            made=Made(metrics, recipe),
            before_commit=lambda session, number: context.finish_in(
                session, {**result, "version": number, "reference": f"{params.model}:{number}"}
            ),
        )
        return {**result, "version": version.version}
    finally:
        registry.close()


@dataclass(frozen=True)
class Data:
    task: str
    classes: list[str]
    train: tuple[torch.Tensor, torch.Tensor]
    validation: tuple[torch.Tensor, torch.Tensor]
    preprocessing: dict[str, Any]
    files: dict[str, str]
    """Files the model's folder needs beside its weights (a text model's tokenizer.json)."""
    vocab_size: int = 0


def _load(files: FileStore, limits, params: TrainParams, tenant: int, folder) -> Data:
    if params.architecture == "small-cnn":
        root = extract(files, params.training_file, tenant, folder, limits)
        spec = ImagePreprocessing(params.image_size, params.image_size, tuple(MEAN), tuple(STD))
        images = load_split(root, spec, params.validation_fraction, params.seed)
        preprocessing = {"image_size": [params.image_size] * 2, "mean": MEAN, "std": STD}
        return Data(
            "image-classification",
            images.classes,
            images.train,
            images.validation,
            preprocessing,
            {},
        )
    path = text_data.fetch(files, params.training_file, tenant, folder)
    texts = text_data.load_split(
        path,
        params.text_column,
        params.label_column,
        params.validation_fraction,
        params.seed,
        params.max_length,
        params.max_vocab,
    )
    return Data(
        "text-classification",
        texts.classes,
        texts.train,
        texts.validation,
        {"max_length": params.max_length},
        {"tokenizer.json": texts.tokenizer_json},
        texts.vocab_size,
    )


def train_rank(reporter, team: Team, params: TrainParams, arguments: dict, data):
    """One rank of a data-parallel ``train`` job (``distributed.train_together``)."""
    return _train(reporter, params, arguments, data, team)


def _train(
    context, params: TrainParams, arguments: dict, data, team: Team | None = None
) -> tuple[TrainingState, dict]:
    """The training loop. ``team`` is this process's place among ``world_size`` (None: alone);
    only its rank 0 reports and writes checkpoints, and ``context`` is then a reporter."""
    team = team or Team()
    torch.manual_seed(params.seed)
    model = build(params.architecture, arguments)
    holding = team.keep_own_part(model)
    if holding:
        context.report(message=holding)
    optimizer, scheduler = _optimizer(params, model)
    generator = torch.Generator().manual_seed(params.seed)
    restored = checkpoint.load(
        context.workdir, model, optimizer, scheduler, generator, part=team.checkpoint_part
    )
    state, best = restored if restored else (TrainingState(), _copy(model))
    if restored and team.rank == 0:
        context.report(message=f"resumed after epoch {state.epoch} from its checkpoint")
    trained = model
    model = team.wrap(model)
    count = len(data.train[1])
    total_steps = math.ceil(count / params.batch_size) * params.epochs
    loss_fn = nn.CrossEntropyLoss()
    started = time.monotonic() - state.seconds
    last_saved = time.monotonic()
    while state.epoch < params.epochs:
        epoch_started = time.monotonic()
        order = torch.randperm(count, generator=generator)
        loss_sum, correct, seen = _epoch(
            context, params, model, optimizer, data.train, order, state, team, total_steps
        )
        if scheduler is not None:
            scheduler.step()
        state.epoch += 1
        loss_sum, correct, seen = team.sum([loss_sum, correct, seen])
        row = {
            "train_loss": loss_sum / max(seen, 1),
            "train_accuracy": correct / max(seen, 1),
            "samples_per_s": seen / max(time.monotonic() - epoch_started, 1e-9),
            **team.epoch_metrics(),
        }
        row.update(team.validate(trained, data.validation, loss_fn))  # the same on every rank
        state.history.append(row)
        watched = row.get("val_loss", row["train_loss"])
        if team.agree(state.best_loss is None or watched < state.best_loss):
            state.best_loss, state.best_epoch, state.bad_epochs = watched, state.epoch, 0
            best = _copy(trained)
        else:
            state.bad_epochs += 1
        state.seconds = time.monotonic() - started
        saved = None
        if team.agree(time.monotonic() - last_saved >= params.checkpoint_every_seconds):
            team.save_checkpoint(
                context.workdir, state, trained, best, optimizer, scheduler, generator
            )
            last_saved = time.monotonic()
            saved = {"epoch": state.epoch, "step": state.step, "best_epoch": state.best_epoch}
        shown = ", ".join(f"{k} {v:.4g}" for k, v in row.items())
        team.report(
            context,
            state.epoch / params.epochs,
            message=f"epoch {state.epoch}/{params.epochs}: {shown}",
            step=state.step,
            metrics=row,
            checkpoint=saved,
        )
        patience = params.early_stopping_patience
        if team.agree(bool(patience) and state.bad_epochs >= (patience or 0)):
            team.report(
                context,
                message=f"early stop: no better validation loss in {state.bad_epochs} epochs",
            )
            break
        if team.agree(
            bool(params.max_runtime_seconds) and state.seconds >= (params.max_runtime_seconds or 0)
        ):
            team.report(
                context,
                message=f"stopped: the maximum runtime ({params.max_runtime_seconds:g} s) passed",
            )
            break
    return state, best


def _epoch(context, params, model, optimizer, train, order, state, team, total_steps):
    """One pass over the training samples in ``order``; returns this process's (loss sum,
    correct predictions, samples seen). Each process takes its share of every batch."""
    started = time.monotonic()

    def on_step(loss: float | None, seen: int) -> None:
        """Count a step; every ``log_every_steps``, the reporting rank's loss as an event."""
        state.step += 1
        if loss is not None and state.step % params.log_every_steps == 0:
            rate = seen / max(time.monotonic() - started, 1e-9)
            context.report(
                state.step / total_steps,
                message=f"step {state.step}",
                step=state.step,
                metrics={"loss": loss, "samples_per_s": rate},
            )

    if hasattr(team, "epoch"):  # a strategy that runs its own steps (strategies.py)
        return team.epoch(model, optimizer, train, order, params.batch_size, on_step)
    inputs, labels = train
    model.train()
    seen = correct = 0
    loss_sum = 0.0
    for start in range(0, len(order), params.batch_size):
        batch = order[start : start + params.batch_size]
        if len(batch) < team.world:
            continue  # too few to give every process one; skipped by all alike
        team.check()
        shard = batch[team.rank :: team.world] if team.world > 1 else batch
        target = labels[shard]
        logits = model(inputs[shard])
        loss = nn.functional.cross_entropy(logits, target)  # the shard's mean
        if team.world > 1:  # summed over the team: the batch's mean
            loss = loss * (len(shard) * team.world / len(batch))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += len(shard)
        mean = float(loss.detach()) * len(batch) / (len(shard) * team.world)
        loss_sum += mean * len(shard)
        correct += int((logits.detach().argmax(-1) == target).sum())
        on_step(mean if team.rank == team.reporting_rank else None, seen)
    return loss_sum, correct, seen


def _optimizer(params: TrainParams, model: nn.Module):
    """The optimiser and its learning-rate schedule (None: constant), as ``params`` say."""
    held = [p for p in model.parameters() if not p.is_meta]  # a pipeline stage's own
    if params.optimizer == "adamw":
        optimizer = torch.optim.AdamW(
            held, lr=params.learning_rate, weight_decay=params.weight_decay
        )
    else:
        optimizer = torch.optim.SGD(
            held,
            lr=params.learning_rate,
            momentum=params.momentum,
            weight_decay=params.weight_decay,
        )
    if params.schedule == "cosine":
        return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=params.epochs)
    return optimizer, None


def _copy(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights this process holds (a pipeline stage's process: its stage's)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not v.is_meta}
