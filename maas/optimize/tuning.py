"""The steps that learn: a short fine-tune after pruning, and distillation of a teacher into
a smaller student, both on labelled ``Examples`` (maas/optimize/data.py).

Distillation's loss is Hinton et al.'s: ``alpha * T^2 * KL(teacher || student at
temperature T) + (1 - alpha) * cross-entropy with the labels`` (the T^2 keeps the soft
targets' gradients at the scale of the hard ones').
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from maas.optimize.data import Examples

BATCH = 64
Progress = Callable[[int, int, float], None]
"""Called as (step, steps, loss) every few steps."""


def fine_tune(
    module: nn.Module,
    examples: Examples,
    steps: int,
    learning_rate: float,
    seed: int,
    progress: Progress | None = None,
) -> float:
    """``steps`` AdamW steps on the task loss. Weights that are exactly zero (pruned) stay
    zero. Returns the last step's loss."""
    masks = {
        p: p != 0
        for name, p in module.named_parameters()
        if name.endswith("weight") and p.dim() > 1
    }
    masks = {p: m for p, m in masks.items() if not bool(m.all())}

    def loss(batch: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(module(batch), labels)

    return _optimise(module, examples, steps, learning_rate, seed, loss, masks, progress)


def distil(
    teacher: nn.Module,
    student: nn.Module,
    examples: Examples,
    steps: int,
    learning_rate: float,
    temperature: float,
    alpha: float,
    seed: int,
    progress: Progress | None = None,
) -> float:
    """Train ``student`` on ``teacher``'s softened outputs and the labels. Returns the last
    step's loss."""
    teacher.eval()

    def loss(batch: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            soft = F.log_softmax(teacher(batch) / temperature, dim=-1)
        logits = student(batch)
        guided = F.kl_div(
            F.log_softmax(logits / temperature, dim=-1),
            soft,
            reduction="batchmean",
            log_target=True,
        )
        return alpha * temperature**2 * guided + (1 - alpha) * F.cross_entropy(logits, labels)

    return _optimise(student, examples, steps, learning_rate, seed, loss, {}, progress)


def student_arguments(
    architecture: str, arguments: dict[str, Any], width: float, layers: int | None = None
) -> dict[str, Any]:
    """The teacher's architecture ``width`` times as wide (channels and hidden units; for the
    text classifiers, embedding and hidden sizes), so about ``width^2`` of its parameters in
    the layers that dominate; with ``layers``, only that many of its conv blocks (the first)
    or recurrent or encoder layers."""

    def scaled(value: int, multiple: int = 1) -> int:
        return max(multiple, round(value * width / multiple) * multiple)

    student = dict(arguments)
    if architecture == "small-cnn":
        channels = list(arguments.get("channels", [16, 32]))[: layers or None]
        student["channels"] = [scaled(c) for c in channels]
        student["hidden"] = scaled(arguments.get("hidden", 64))
        return student
    if layers is not None:
        student["num_layers"] = layers
    if architecture == "lstm-classifier":
        student["embedding_dim"] = scaled(arguments.get("embedding_dim", 64))
        student["hidden_size"] = scaled(arguments.get("hidden_size", 64))
    elif architecture == "transformer-classifier":
        heads = arguments.get("nhead", 4)
        student["d_model"] = scaled(arguments.get("d_model", 64), heads)
        student["dim_feedforward"] = scaled(arguments.get("dim_feedforward", 128))
    else:
        raise ValueError(f"no smaller {architecture} to distil into")
    return student


def _optimise(module, examples, steps, learning_rate, seed, loss_of, masks, progress) -> float:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(module.parameters(), lr=learning_rate, weight_decay=0.0)
    module.train()
    order, position, last = torch.randperm(len(examples), generator=generator), 0, 0.0
    for step in range(1, steps + 1):
        if position >= len(order):
            order, position = torch.randperm(len(examples), generator=generator), 0
        chosen = order[position : position + BATCH]
        position += BATCH
        loss = loss_of(examples.inputs[chosen], examples.labels[chosen])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for parameter, mask in masks.items():
                parameter.mul_(mask)
        last = float(loss.detach())
        if progress is not None and (step % 10 == 0 or step == steps):
            progress(step, steps, last)
    module.eval()
    return last
