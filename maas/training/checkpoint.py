"""A training checkpoint as files that cannot run code: the model's and the optimiser's
tensors in safetensors, the random generator's state as a tensor, and the rest in JSON.

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
    partial = folder / PARTIAL
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_file(_plain(model.state_dict()), partial / "model.safetensors")
    if best is not None:
        save_file(_plain(best), partial / "best.safetensors")
    tensors, groups = _optimizer_tensors(optimizer)
    tensors["generator"] = generator.get_state()
    save_file(tensors, partial / "optimizer.safetensors")
    meta = {
        "state": state.__dict__,
        "param_groups": groups,
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
) -> tuple[TrainingState, dict[str, torch.Tensor] | None] | None:
    """Restore the last checkpoint into the given objects; None when there is none. ``model``
    is anything with ``state_dict`` and ``load_state_dict`` (a LoRA adapter's view)."""
    source = next(
        (folder / n for n in (CURRENT, OLD) if (folder / n / "state.json").exists()), None
    )
    if source is None:
        return None
    meta = json.loads((source / "state.json").read_text())
    model.load_state_dict(load_file(source / "model.safetensors"))
    tensors = load_file(source / "optimizer.safetensors")
    generator.set_state(tensors.pop("generator"))
    _restore_optimizer(optimizer, tensors, meta["param_groups"])
    if scheduler is not None and meta["scheduler"] is not None:
        scheduler.load_state_dict(meta["scheduler"])
    best = source / "best.safetensors"
    return TrainingState(**meta["state"]), load_file(best) if best.exists() else None


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
