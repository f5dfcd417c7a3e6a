"""The ``fine-tune`` job: LoRA fine-tuning of a Llama-family chat model of the registry, the
job behind OpenAI's ``/v1/fine_tuning/jobs``.

The base model (a Hugging Face folder, or GGUF dequantised to float32 by ``transformers``) is
wrapped by ``peft``'s LoRA on its attention and MLP projections and trained on a ``fine-tune``
file's chats, with the loss on the assistant's tokens only (``chat_data``). Each epoch ends
with a validation pass (when a validation file is given) and a checkpoint of the adapter, the
optimiser and the sample order (a new attempt resumes after the last one). The last epoch's
adapter is merged into the base weights and registered as the model ``fine_tuned_model``
(``ft:<base>:<suffix>:<id>``), which the engine serves at once; the adapter is kept beside it
in ``adapter/``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from maas.errors import InvalidRequest, ModelNotFound
from maas.files import FileStore
from maas.jobs.kinds import parse_params
from maas.registry import open_registry
from maas.registry.names import fine_tuned_name, is_fine_tuned_name, parse_reference
from maas.registry.records import OpenedVersion, VersionRecord
from maas.registry.rows import Made
from maas.runtime.llm.tokenizer import ChatTokenizer, load_tokenizer
from maas.runtime.llm.weights import read_config
from maas.training import checkpoint
from maas.training.chat_data import ChatData, encode_chats, read_chats
from maas.training.chat_steps import (
    EpochLoop,
    NothingToTrain,
    evaluate,
    evaluate_in_stages,
    longest,
)
from maas.training.checkpoint import TrainingState
from maas.training.distributed import Team, train_together
from maas.training.strategies import check_strategy, team_spec

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""Every linear layer of a Llama block: LoRA on all of them learns more per parameter than on
the attention's alone (QLoRA's finding)."""
BASE_LEARNING_RATE = 2e-4
"""What ``learning_rate_multiplier`` multiplies: a usual LoRA learning rate for AdamW."""
DEFAULT_EPOCHS = 3
MAX_AUTO_BATCH = 8
DEFAULT_MAX_LENGTH = 2048


class FineTuneParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=160)
    """The base model: a chat model the engine serves (Llama family)."""
    suffix: str = Field(default="", max_length=64)
    """Part of the result's name, ``ft:<base>:<suffix>:<job id>``."""
    training_file: str = Field(min_length=1, max_length=40)
    validation_file: str | None = Field(default=None, min_length=1, max_length=40)
    n_epochs: int | None = Field(default=None, ge=1, le=50)
    """None ("auto"): 3."""
    batch_size: int | None = Field(default=None, ge=1, le=256)
    """None ("auto"): a tenth of the training examples, from 1 to 8."""
    learning_rate_multiplier: float | None = Field(default=None, gt=0, le=100)
    """Times 2e-4. None ("auto"): 1."""
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    lora_rank: int = Field(default=16, ge=1, le=512)
    lora_alpha: float = Field(default=32.0, gt=0, le=4096)
    lora_dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default=list(LORA_TARGETS), min_length=1, max_length=64)
    max_length: int | None = Field(default=None, ge=8, le=1_048_576)
    """Tokens kept of each example (longer ones are cut). None: the model's context, at most
    2048."""
    log_every_steps: int = Field(default=1, ge=1, le=1_000_000)
    world_size: int = Field(default=1, ge=1, le=8)
    """Processes training together, as ``strategy`` says; the result equals one process's."""
    strategy: Literal["data", "pipeline", "hybrid", "parameter-server"] = "data"
    """``data``: each process loads the base model and takes its share of every batch;
    ``pipeline``: the model's layers (embeddings, blocks, norm and head) cut into
    ``world_size`` stages, each process holding its stage only; ``hybrid``:
    ``world_size / pipeline_stages`` such pipelines in data parallel; ``parameter-server``:
    process 0 holds the adapter and its optimiser, the others compute its gradients
    (``ps_mode``). As the ``train`` job's (maas/training/strategies.py)."""
    pipeline_stages: int | None = Field(default=None, ge=2, le=8)
    micro_batches: int = Field(default=4, ge=1, le=1024)
    pipeline_schedule: Literal["gpipe", "1f1b"] = "gpipe"
    ps_mode: Literal["sync", "async"] = "sync"
    max_staleness: int | None = Field(default=None, ge=0, le=1_000_000)
    metadata: dict[str, str] | None = None
    """Kept for the caller (OpenAI's ``metadata``); training ignores it."""


@dataclass(frozen=True)
class Hyperparameters:
    """The hyperparameters as they ran, "auto" resolved."""

    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float

    @property
    def learning_rate(self) -> float:
        return BASE_LEARNING_RATE * self.learning_rate_multiplier


def validate(params: dict[str, Any]) -> dict[str, Any]:
    parsed = parse_params(FineTuneParams, params)
    check_strategy(parsed, parsed.batch_size, None, parsed.model)  # the layers: at the start
    fine_tuned_model_name(parsed.model, parsed.suffix, "job-" + "0" * 16)  # fits, or says why
    return parsed.model_dump()


def fine_tuned_model_name(base: str, suffix: str, job_id: str) -> str:
    """``ft:<base>:<suffix>:<id>``, where ``<base>`` is the base model's name (a fine-tuned
    base's own base: a name holds one ``ft:``)."""
    name = parse_reference(base).name
    if is_fine_tuned_name(name):
        name = name.split(":")[1]
    return fine_tuned_name(name, suffix, job_id.removeprefix("job-"))


def check_base(record: VersionRecord) -> None:
    """Refuse a base model this job cannot fine-tune, naming why."""
    if record.runtime != "llm" or record.task not in ("chat", "text-generation"):
        raise InvalidRequest(
            f"{record.reference} cannot be fine-tuned: fine-tuning takes a Llama-family "
            f"language model that maas's engine serves (this one is a {record.task} model "
            f"on the {record.runtime} runtime)",
            param="model",
        )


def resolve_hyperparameters(params: FineTuneParams, examples: int) -> Hyperparameters:
    return Hyperparameters(
        n_epochs=params.n_epochs or DEFAULT_EPOCHS,
        batch_size=params.batch_size or max(1, min(MAX_AUTO_BATCH, examples // 10)),
        learning_rate_multiplier=params.learning_rate_multiplier or 1.0,
    )


def run(context) -> dict[str, Any]:
    params = FineTuneParams(**context.params)
    registry = open_registry(context.settings)
    try:
        data = _validate_files(context, registry, params)
        pad = data.tokenizer.pad_token_id
        saved = (context.resume_point() or {}).get("checkpoints") or []
        if params.world_size > 1:
            state, adapter = train_together(
                context,
                params.world_size,
                f"{__name__}:train_rank",
                (context.settings, params, data.hyper, data.train, data.valid, pad, saved),
                team=team_spec(params),
            )
            peft_model = _with_adapter(_load_base(data.opened), params)
            _AdapterView(peft_model).load_state_dict(adapter)
        else:
            peft_model = _with_adapter(_loaded(context, data.opened, Team()), params)
            state = _train(
                context, params, data.hyper, peft_model, data.train, data.valid, pad, saved, Team()
            )
        return _register(context, registry, params, data, peft_model, state)
    finally:
        registry.close()


@dataclass(frozen=True)
class _Files:
    """What the ``validating_files`` stage found."""

    opened: OpenedVersion
    tokenizer: ChatTokenizer
    train: ChatData
    valid: ChatData | None
    hyper: Hyperparameters


def _validate_files(context, registry, params: FineTuneParams) -> _Files:
    tenant = context.lease.job.tenant_id
    context.report(0.0, stage="validating_files", message="Validating training files")
    opened = _open_base(registry, params.model, tenant)
    tokenizer = load_tokenizer(opened)
    context_length = opened.manifest.context_length or DEFAULT_MAX_LENGTH
    max_length = params.max_length or min(context_length, DEFAULT_MAX_LENGTH)
    files = FileStore.of_registry(registry, context.settings)
    train = _chats(files, params.training_file, tenant, context, tokenizer, max_length)
    valid = (
        _chats(files, params.validation_file, tenant, context, tokenizer, max_length)
        if params.validation_file
        else None
    )
    hyper = resolve_hyperparameters(params, len(train.examples))
    if params.strategy in ("pipeline", "hybrid"):  # the embeddings, each block, norm and head
        check_strategy(params, hyper.batch_size, read_config(opened).num_layers + 2, params.model)
    context.report(
        stage="training",
        message=f"Files validated: {len(train.examples)} training examples "
        f"({train.tokens} tokens)"
        + (f", {len(valid.examples)} validation examples" if valid else "")
        + f"; n_epochs {hyper.n_epochs}, batch_size {hyper.batch_size}, "
        f"learning_rate_multiplier {hyper.learning_rate_multiplier:g}",
    )
    return _Files(opened, tokenizer, train, valid, hyper)


def _register(context, registry, params, data: _Files, peft_model, state) -> dict[str, Any]:
    """Merge, save and import the model; the job's success commits with the import."""
    name = fine_tuned_model_name(params.model, params.suffix, context.job_id)
    context.report(stage="registering", message="Merging the adapter and registering the model")
    folder = _save(context.workdir / "model", peft_model, data.tokenizer, data.opened)
    trained_tokens = data.hyper.n_epochs * data.train.tokens
    metrics = {k: float(v) for k, v in state.history[-1].items()}
    hyper = asdict(data.hyper)
    result = {
        "fine_tuned_model": name,
        "trained_tokens": trained_tokens,
        "hyperparameters": hyper,
        "base": data.opened.record.reference,
        **metrics,
        "usage": {"tokens": trained_tokens},
    }
    context.flush()  # the epochs' events on record before the import takes the write lock
    base = data.opened.record
    recipe = {
        "job": context.job_id,
        "kind": "fine-tune",
        "method": "lora",
        "params": context.params,
        "hyperparameters": hyper,
    }
    version = registry.import_model(
        folder,
        name,
        task="chat",
        owner=context.lease.job.tenant_id,
        source_label=f"job {context.job_id}",
        sampling=registry.get_model(base.name).sampling or None,
        made=Made(metrics, recipe, parent=(base.name, base.version)),
        fine_tuned=True,
        consume=True,
        before_commit=lambda session, number: context.finish_in(
            session, {**result, "version": number}
        ),
    )
    return {**result, "version": version.version}


def _open_base(registry, reference: str, tenant: int) -> OpenedVersion:
    record = registry.resolve(reference)
    if record.tenant_id not in (None, tenant):  # another tenant's model is not there for it
        raise ModelNotFound(f"model {parse_reference(reference).name!r} not found", param="model")
    check_base(record)
    return registry.open_version(record.reference)


def _chats(files: FileStore, file_id, tenant, context, tokenizer, max_length) -> ChatData:
    record = files.get(file_id, tenant)
    if record.purpose != "fine-tune":
        raise InvalidRequest(f"{file_id} has purpose {record.purpose!r}, not 'fine-tune'")
    path = files.copy_to(file_id, tenant, context.workdir / f"{file_id}.jsonl")
    data = encode_chats(read_chats(path), tokenizer, max_length)
    for reason in data.dropped[:20]:
        context.report(message=f"{file_id} {reason}: left out", level="warning")
    if data.truncated:
        context.report(
            message=f"{file_id}: {data.truncated} examples were cut to {max_length} tokens",
            level="warning",
        )
    if not data.examples:
        raise InvalidRequest(f"{file_id} has no example left to learn from")
    return data


def _load_base(opened: OpenedVersion) -> torch.nn.Module:
    """The base model in float32 as ``transformers`` builds it (never the model's own code);
    a GGUF's weights through maas's own reader, several times faster than ``transformers``'
    GGUF loader and the same bit for bit (maas/runtime/llm/hf_model.py)."""
    import transformers
    from transformers import AutoModelForCausalLM

    from maas.runtime.classic.transformers_task import load_pretrained

    transformers.utils.logging.disable_progress_bar()
    if opened.manifest.format == "gguf":
        from maas.runtime.llm.hf_model import load_hf_model

        return load_hf_model(opened)
    return load_pretrained(opened, AutoModelForCausalLM, torch.float32)


class _AdapterView:
    """The LoRA weights alone, as a checkpoint saves and restores a model's."""

    def __init__(self, model) -> None:
        self.model = model

    def state_dict(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self.model, save_embedding_layers=False)

    def load_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Load the adapter's tensors; ``peft`` loads the ones given (``strict`` is for the
        checkpoint's calls: a pipeline stage's part)."""
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.model, state)


def _loaded(reporter, opened: OpenedVersion, team: Team) -> torch.nn.Module:
    started = time.monotonic()
    model = _load_base(opened)
    team.report(
        reporter, message=f"Loaded {opened.record.reference} in {time.monotonic() - started:.1f} s"
    )
    return model


def _with_adapter(model: torch.nn.Module, params: FineTuneParams):
    """``model`` wrapped by ``peft`` with fresh LoRA matrices (the seed decides them)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(params.seed)
    return get_peft_model(
        model,
        LoraConfig(
            r=params.lora_rank,
            lora_alpha=params.lora_alpha,
            lora_dropout=params.lora_dropout,
            target_modules=list(params.target_modules),
            task_type="CAUSAL_LM",
        ),
    )


def train_rank(reporter, team: Team, settings, params, hyper, train, valid, pad, saved):
    """One rank of a data-parallel fine-tuning job (``distributed.train_together``): it loads
    the base model itself and returns where training stands and the adapter's weights."""
    registry = open_registry(settings)
    try:
        opened = registry.open_version(params.model)
    finally:
        registry.close()
    peft_model = _with_adapter(_loaded(reporter, opened, team), params)
    if params.strategy in ("pipeline", "hybrid"):
        from maas.training.llm_stages import llama_layers

        reporter.report(message=team.keep_own_part(peft_model, llama_layers(peft_model)))
    state = _train(reporter, params, hyper, peft_model, train, valid, pad, saved, team)
    adapter = _AdapterView(peft_model).state_dict()
    return state, {k: v for k, v in adapter.items() if not v.is_meta}  # a stage's: its own


def _train(context, params, hyper: Hyperparameters, peft_model, train, valid, pad, saved, team):
    """The loop. ``team`` is this process's place among ``world_size`` (``Team()``: alone):
    each process takes its share of every batch (or a pipeline stage's part of it), its loss
    scaled so that the gradients summed over the team are those of the batch's mean loss
    over its learnt tokens; only rank 0 reports."""
    adapter = _AdapterView(peft_model)
    trainable = [p for p in peft_model.parameters() if p.requires_grad and not p.is_meta]
    optimizer = (
        torch.optim.AdamW(trainable, lr=hyper.learning_rate, weight_decay=0.0)
        if trainable
        else NothingToTrain()
    )
    generator = torch.Generator().manual_seed(params.seed)
    restored = checkpoint.load(
        context.workdir, adapter, optimizer, None, generator, part=team.checkpoint_part
    )
    state = restored[0] if restored else TrainingState()
    if restored:
        team.report(context, message=f"Resumed after epoch {state.epoch} from its checkpoint")
    loop = EpochLoop(context, params, hyper, team, team.wrap(peft_model), optimizer, train, pad)
    loop.length = longest(train, valid)  # a pipeline's stages need one shape for every batch
    loop.total_steps = math.ceil(len(train.examples) / hyper.batch_size) * hyper.n_epochs
    saved = list(saved[: state.epoch])
    while state.epoch < hyper.n_epochs:
        started = time.monotonic()
        order = torch.randperm(len(train.examples), generator=generator).tolist()
        peft_model.train()
        batches = [
            [train.examples[i] for i in order[start : start + hyper.batch_size]]
            for start in range(0, len(order), hyper.batch_size)
        ]
        sums = loop.epoch(state, batches, started)
        state.epoch += 1
        row = {
            "step": state.step,
            "train_loss": sums[0] / sums[2],
            "train_mean_token_accuracy": sums[1] / sums[2],
            "tokens_per_s": sums[3] / max(time.monotonic() - started, 1e-9),
            **team.epoch_metrics(),
        }
        if valid is not None and loop.pipelined:
            row.update(evaluate_in_stages(team, valid, hyper.batch_size, pad, loop.length))
        elif valid is not None and team.rank == 0:
            row.update(evaluate(peft_model, valid, hyper.batch_size, pad))
        state.history.append(row)
        state.seconds += time.monotonic() - started
        team.save_checkpoint(context.workdir, state, adapter, None, optimizer, None, generator)
        saved.append(
            {"epoch": state.epoch, "step": state.step, "metrics": row, "at": int(time.time())}
        )
        shown = ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "step")
        team.report(
            context,
            state.epoch / hyper.n_epochs,
            message=f"Epoch {state.epoch}/{hyper.n_epochs}: {shown}",
            step=state.step,
            metrics=row,
            checkpoint={
                "epoch": state.epoch,
                "step": state.step,
                "trained_tokens": state.epoch * train.tokens,
                "hyperparameters": asdict(hyper),
                "checkpoints": saved,
            },
        )
    return state


def _save(folder: Path, peft_model, tokenizer: ChatTokenizer, opened: OpenedVersion) -> Path:
    """The merged model as a Hugging Face folder the engine serves, with the adapter in
    ``adapter/``, the base's tokenizer and its chat template."""
    folder.mkdir(parents=True, exist_ok=True)
    for config in peft_model.peft_config.values():
        config.base_model_name_or_path = opened.record.reference  # not a temporary path
    peft_model.save_pretrained(
        folder / "adapter", safe_serialization=True, save_embedding_layers=False
    )
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(folder, safe_serialization=True)
    tokenizer.save(folder)  # with the chat template and end-of-sequence ids
    return folder
