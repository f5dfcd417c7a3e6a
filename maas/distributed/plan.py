"""Cutting a model into pipeline stages at layer boundaries, about 1/K of the bytes each.

A model is a sequence of *units* that run one after the other: for the Llama family, the
decoder blocks, with the token embedding riding on the first block and the final norm and LM
head on the last (so stage 0 takes the token ids and the last stage gives the logits); for a
classic module, the layers its architecture runs in order (see ``classic_units``). The cut is
contiguous and minimises the largest stage (a linear partition, solved exactly), so with a
tied LM head, which the last stage holds as a copy of the embedding, the blocks shift toward
stage 0 to even out the bytes.

The plan records, for each stage, its units, the parameter names it loads, their count and
bytes, and where it runs; ``maas models split-plan`` prints it and the engine loads each stage
from it.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from maas.errors import InvalidRequest
from maas.runtime.llm.config import LlamaConfig


@dataclass(frozen=True)
class Unit:
    """A piece of the model no cut goes through."""

    name: str
    parameters: tuple[str, ...]
    """Names in the model's state dict."""
    count: int
    """Number of parameters (elements)."""
    bytes: int


@dataclass(frozen=True)
class Stage:
    index: int
    units: tuple[str, ...]
    parameters: tuple[str, ...]
    count: int
    bytes: int
    node: str = "local"
    """Where the stage runs: "local" (a process on this machine) or a Ray node's address."""
    first_unit: int = 0
    """Index of the stage's first unit in the model's sequence."""

    @property
    def unit_range(self) -> range:
        return range(self.first_unit, self.first_unit + len(self.units))


@dataclass(frozen=True)
class SplitPlan:
    model: str
    dtype: str
    stages: tuple[Stage, ...]
    notes: tuple[str, ...] = field(default=())

    @property
    def bytes(self) -> int:
        return sum(stage.bytes for stage in self.stages)

    @property
    def imbalance(self) -> float:
        """The largest stage over the mean stage (1.0: perfectly even)."""
        return max(s.bytes for s in self.stages) * len(self.stages) / max(1, self.bytes)

    def placed(self, nodes: Sequence[str]) -> SplitPlan:
        """The same plan with each stage's node named (one per stage)."""
        if len(nodes) != len(self.stages):
            raise ValueError(f"{len(nodes)} nodes for {len(self.stages)} stages")
        pairs = zip(self.stages, nodes, strict=True)
        stages = tuple(_replace(stage, node=node) for stage, node in pairs)
        return SplitPlan(self.model, self.dtype, stages, self.notes)

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "dtype": self.dtype,
            "bytes": self.bytes,
            "imbalance": round(self.imbalance, 3),
            "notes": list(self.notes),
            "stages": [
                {**asdict(stage), "units": list(stage.units), "parameters": list(stage.parameters)}
                for stage in self.stages
            ],
        }


def _replace(stage: Stage, **changes) -> Stage:
    return Stage(**{**asdict(stage), **changes})


def split(units: Sequence[Unit], stages: int, *, model: str, dtype: str, notes=()) -> SplitPlan:
    """Cut ``units`` into ``stages`` contiguous non-empty runs with the smallest largest run."""
    if stages < 1:
        raise InvalidRequest("a model is split into at least 1 stage", param="stages")
    if stages > len(units):
        raise InvalidRequest(
            f"{model} has {len(units)} layers to split at; it cannot make {stages} stages",
            param="stages",
        )
    bounds = balanced_bounds([unit.bytes for unit in units], stages)
    result = []
    for index, (start, end) in enumerate(itertools.pairwise(bounds)):
        run = units[start:end]
        result.append(
            Stage(
                index=index,
                units=tuple(u.name for u in run),
                parameters=tuple(p for u in run for p in u.parameters),
                count=sum(u.count for u in run),
                bytes=sum(u.bytes for u in run),
                first_unit=start,
            )
        )
    return SplitPlan(model, dtype, tuple(result), tuple(notes))


def balanced_bounds(sizes: Sequence[int], parts: int) -> list[int]:
    """Boundaries 0 = b0 < b1 < ... < b_parts = len(sizes) whose largest run sum is the
    smallest possible (dynamic programming over prefix sums; ties go to earlier cuts)."""
    n = len(sizes)
    prefix = [0]
    for size in sizes:
        prefix.append(prefix[-1] + size)
    inf = float("inf")
    # best[k][i]: the smallest largest run for the first i units in k runs
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0
    for k in range(1, parts + 1):
        for i in range(k, n - (parts - k) + 1):
            for j in range(k - 1, i):
                cost = max(best[k - 1][j], prefix[i] - prefix[j])
                if cost < best[k][i]:
                    best[k][i], cut[k][i] = cost, j
    bounds = [n]
    for k in range(parts, 0, -1):
        bounds.append(cut[k][bounds[-1]])
    return bounds[::-1]


def llama_units(config: LlamaConfig, dtype: torch.dtype = torch.float32) -> list[Unit]:
    """One unit per decoder block; the embedding rides on the first, the final norm and the
    LM head (a copy of the embedding when tied) on the last."""
    from maas.runtime.llm.model import LlamaModel

    with torch.device("meta"):
        model = LlamaModel(config)
    element = torch.tensor([], dtype=dtype).element_size()
    shapes = {name: p.numel() for name, p in model.named_parameters(remove_duplicate=False)}
    units = []
    for layer in range(config.num_layers):
        names = [n for n in shapes if n.startswith(f"blocks.{layer}.")]
        if layer == 0:
            names = ["embed.weight", *names]
        if layer == config.num_layers - 1:
            names += ["norm.weight", "lm_head.weight"]
        count = sum(shapes[n] for n in names)
        units.append(Unit(f"blocks.{layer}", tuple(names), count, count * element))
    return units


def llama_plan(
    config: LlamaConfig, stages: int, *, model: str, dtype: str, stored: str = ""
) -> SplitPlan:
    """The stages of a Llama-family model for ``dtype`` (the bytes its weights take);
    ``stored``: how the version stores its weights quantized, if it does (the split is the
    same: every block shrinks alike)."""
    torch_dtype = torch.bfloat16 if dtype in ("bfloat16", "int8-weight") else torch.float32
    notes = []
    if config.tie_word_embeddings:
        notes.append("the LM head is tied to the embedding: the last stage holds a copy")
    if stored:
        notes.append(f"bytes are the weights' in {dtype}; the version stores them {stored}")
    elif dtype in ("int8", "int8-weight"):
        notes.append(f"bytes are before {dtype} quantisation (the weights load as float first)")
    units = llama_units(config, torch_dtype)
    notes.append("stage 0 holds the embedding, the last stage the final norm and the LM head")
    return split(units, stages, model=model, dtype=dtype, notes=notes)


def module_units(
    layers: Sequence[tuple[str, nn.Module]], model: nn.Module | None = None
) -> list[Unit]:
    """Units of a classic model from its layers in run order (name, module). With the whole
    ``model``, each tensor is named as in its state dict (layers that wrap its modules, such
    as the text classifiers' steps, then keep the model's names)."""
    full = {}
    if model is not None:
        full = {id(t): n for n, t in model.state_dict(keep_vars=True).items()}
    units = []
    for name, layer in layers:
        tensors = layer.state_dict(keep_vars=True).items()
        params = [(full.get(id(t), f"{name}.{n}"), t) for n, t in tensors]
        count = sum(p.numel() for _, p in params)
        size = sum(p.numel() * p.element_size() for _, p in params)
        units.append(Unit(name, tuple(n for n, _ in params), count, size))
    return units
