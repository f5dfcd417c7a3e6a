"""A training checkpoint as files that cannot run code: the model's and the optimiser's
tensors in safetensors, the random generator's state as a tensor, and the rest in JSON.
Processes that each hold a part of the model (pipeline stages) write a part each
(``write_part``) between ``begin`` and ``commit``.

Written into ``checkpoint.partial/`` and swapped in by renames, so a worker killed while
writing leaves the previous checkpoint whole (``load`` falls back to ``checkpoint.old/``)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

CURRENT, PARTIAL, OLD = "checkpoint", "checkpoint.partial", "checkpoint.old"


@dataclass
class TrainingState:
    """Where training stands after an epoch."""

    epoch: int = 0
    step: int = 0
    seconds: float = 0.0
    best_loss: float | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


def save(
    folder: Path,
    state: TrainingState,
    model: torch.nn.Module,
    best: dict[str, torch.Tensor] | None,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    generator: torch.Generator,
) -> None:
    """A checkpoint written by one process."""
    begin(folder)
    write_part(folder, "", model, best, optimizer, generator)
    commit(folder, state, scheduler)


def begin(folder: Path) -> None:
    """Start a checkpoint: an empty ``checkpoint.partial/`` for the parts."""
    partial = folder / PARTIAL
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)


def write_part(
    folder: Path,
    part: str,
    model: torch.nn.Module,
    best: dict[str, torch.Tensor] | None,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
) -> None:
    """One process's part (``""``: the whole) into the checkpoint ``begin`` started: the
    tensors the model holds (a pipeline stage's process holds only its stage's; the others
    are on the meta device), the best weights it keeps and its optimiser's state."""
    partial, suffix = folder / PARTIAL, _suffix(part)
    held = {k: v for k, v in model.state_dict().items() if not v.is_meta}
    save_file(_plain(held), partial / f"model{suffix}.safetensors")
    if best is not None:
        save_file(_plain(best), partial / f"best{suffix}.safetensors")
    tensors, groups = _optimizer_tensors(optimizer)
    tensors["generator"] = generator.get_state()
    save_file(tensors, partial / f"optimizer{suffix}.safetensors")
    (partial / f"optimizer{suffix}.json").write_text(json.dumps(groups))


def commit(folder: Path, state: TrainingState, scheduler: Any) -> None:
    """Finish the checkpoint once every part is written: ``state.json`` last, then the
    folder swapped in by renames."""
    partial = folder / PARTIAL
    meta = {
        "state": state.__dict__,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
    }
    (partial / "state.json").write_text(json.dumps(meta))
    current, old = folder / CURRENT, folder / OLD
    shutil.rmtree(old, ignore_errors=True)
    if current.exists():
        current.rename(old)
    partial.rename(current)
    shutil.rmtree(old, ignore_errors=True)


def load(
    folder: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    generator: torch.Generator,
    part: str = "",
) -> tuple[TrainingState, dict[str, torch.Tensor] | None] | None:
    """Restore the last checkpoint (its ``part``) into the given objects; None when there is
    none. ``model`` is anything with ``state_dict`` and ``load_state_dict`` (a LoRA adapter's
    view); tensors it holds on the meta device are another part's and stay so."""
    source = next(
        (folder / n for n in (CURRENT, OLD) if (folder / n / "state.json").exists()), None
    )
    if source is None:
        return None
    meta, suffix = json.loads((source / "state.json").read_text()), _suffix(part)
    _load_held(model, load_file(source / f"model{suffix}.safetensors"))
    tensors = load_file(source / f"optimizer{suffix}.safetensors")
    generator.set_state(tensors.pop("generator"))
    groups = source / f"optimizer{suffix}.json"
    saved = json.loads(groups.read_text()) if groups.exists() else meta["param_groups"]
    _restore_optimizer(optimizer, tensors, saved)
    if scheduler is not None and meta["scheduler"] is not None:
        scheduler.load_state_dict(meta["scheduler"])
    best = source / f"best{suffix}.safetensors"
    return TrainingState(**meta["state"]), load_file(best) if best.exists() else None


def _suffix(part: str) -> str:
    return f"-{part}" if part else ""


def _load_held(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Load every tensor the model holds, and nothing it does not."""
    state = model.state_dict()
    held = {k for k, v in state.items() if not v.is_meta}
    if held != set(tensors):
        missing, extra = sorted(held - set(tensors)), sorted(set(tensors) - held)
        raise ValueError(
            f"the checkpoint does not fit this process's model (missing {missing[:3]}, "
            f"unexpected {extra[:3]})"
        )
    if len(held) == len(state):
        model.load_state_dict(tensors)
    else:  # the meta tensors stay missing
        model.load_state_dict(tensors, strict=False)


def _plain(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list]:
    saved = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in saved["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value.detach().cpu().contiguous().clone()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, [saved["param_groups"], scalars]


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict, saved: list) -> None:
    groups, scalars = saved
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for index, values in scalars.items():
        state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": groups})
