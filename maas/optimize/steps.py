"""The steps, as transforms of a built-in torch model (``Candidate``): the architecture's
own code is never changed, only its module tree and how its weights are stored."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune

from maas.optimize.recipe import Step
from maas.runtime.int8_linear import linear_paths, quantized_state


@dataclass
class Candidate:
    """A model on its way through a recipe: its float module, its folder's description
    (maas-architecture.json), and how its weights will be stored."""

    module: nn.Module
    description: dict[str, Any]
    quantization: str | None = None
    state: dict[str, torch.Tensor] | None = None
    """The weights as stored, when they are not the module's float state."""
    notes: list[str] = field(default_factory=list)
    """What each step did, for the report."""


def apply(step: Step, candidate: Candidate) -> Candidate:
    if step.kind == "prune":
        return prune_unstructured(candidate, step.options["amount"])
    if step.kind == "quantize":
        return quantize_int8_dynamic(candidate)
    raise ValueError(f"no transform for {step}")  # recipe.check refuses it first


def prunable(module: nn.Module) -> list[tuple[nn.Module, str]]:
    """The weight matrices and kernels pruning thins: every Linear's and Conv's weight."""
    return [
        (layer, "weight")
        for layer in module.modules()
        if isinstance(layer, nn.Linear | nn.Conv1d | nn.Conv2d)
    ]


def prune_unstructured(candidate: Candidate, amount: float) -> Candidate:
    """Remove the ``amount`` of the prunable weights with the smallest magnitude, over all
    layers together (``torch.nn.utils.prune.global_unstructured``, L1), made permanent: the
    zeros are plain zeros in the weights."""
    targets = prunable(candidate.module)
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=amount)
    for layer, name in targets:
        prune.remove(layer, name)
    total = sum(getattr(layer, name).numel() for layer, name in targets)
    zeros = sum(int((getattr(layer, name) == 0).sum()) for layer, name in targets)
    note = f"pruned {zeros:,} of {total:,} weights in {len(targets)} layers (L1, global)"
    return replace(candidate, notes=[*candidate.notes, note])


def quantize_int8_dynamic(candidate: Candidate) -> Candidate:
    """Every linear layer that can run so stores int8 weights with one scale per output row
    and runs dynamically quantized (maas/runtime/int8_linear.py)."""
    paths = linear_paths(candidate.module)
    if not paths:
        raise ValueError("the model has no linear layer to quantize")
    note = f"int8 weights in {len(paths)} linear layers: {', '.join(paths)}"
    return replace(
        candidate,
        quantization="int8-dynamic",
        state=quantized_state(candidate.module, paths),
        notes=[*candidate.notes, note],
    )
