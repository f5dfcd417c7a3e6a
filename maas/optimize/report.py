"""The report of an optimized version: parent and child measured by one harness, in one run,
on the same sample inputs. Nothing in it is estimated.

- ``artifact_bytes``: the version folder's files; ``parameters``: tensors' elements;
  ``sparsity``: the share of zeros in the weight matrices and kernels;
- ``latency_ms_p50``: median time of a batch of 1; ``throughput_per_s``: samples a second
  in batches of 32; both through the module the runtime serves (built by ``load_module``,
  run under ``torch.inference_mode``);
- ``parity``: the child's largest absolute difference from the parent's outputs, and the
  share of samples whose top class is the parent's;
- ``accuracy``, with an evaluation file: the share of its examples each model labels right
  (``accuracy_change``: the child's minus the parent's).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import nn

from maas.runtime.architectures import signature

SAMPLES = 64
TIMED_BATCH = 32
MIN_RUNS, MAX_RUNS, MAX_SECONDS = 5, 50, 2.0


def sample_inputs(architecture: str, arguments: dict[str, Any], count: int, seed: int = 0):
    """Inputs the architecture takes, drawn at random (token ids within its vocabulary)."""
    generator = torch.Generator().manual_seed(seed)
    inputs, _ = signature(architecture, arguments)
    tensors = {}
    for spec in inputs:
        if spec["datatype"] == "INT64":
            length = 32
            if spec["name"] == "attention_mask":
                tensors[spec["name"]] = torch.ones(count, length, dtype=torch.long)
            else:
                vocab = arguments.get("vocab_size", 2)
                tensors[spec["name"]] = torch.randint(
                    1, vocab, (count, length), generator=generator
                )
        else:
            shape = [count, *spec["shape"][1:]]
            tensors[spec["name"]] = torch.randn(shape, generator=generator)
    return tensors


def measure(
    module: nn.Module, artifact_bytes: int, inputs: dict[str, torch.Tensor]
) -> dict[str, float]:
    """Parameters, sparsity, latency and throughput of ``module``, whose files hold
    ``artifact_bytes``."""
    weights = [t for name, t in _tensors(module) if name.endswith("weight") and t.dim() > 1]
    zeros = sum(int((w == 0).sum()) for w in weights)
    return {
        "artifact_bytes": float(artifact_bytes),
        "parameters": float(sum(t.numel() for _, t in _tensors(module))),
        "sparsity": zeros / max(1, sum(w.numel() for w in weights)),
        "latency_ms_p50": 1000 * _median_seconds(module, _rows(inputs, 0, 1)),
        "throughput_per_s": TIMED_BATCH / _median_seconds(module, _rows(inputs, 0, TIMED_BATCH)),
    }


def parity(parent: nn.Module, child: nn.Module, inputs: dict[str, torch.Tensor]) -> dict:
    with torch.inference_mode():
        expected, got = parent(**inputs), child(**inputs)
    return {
        "max_abs_diff": float((got - expected).abs().max()),
        "top1_agreement": float((got.argmax(-1) == expected.argmax(-1)).float().mean()),
    }


def accuracy(module: nn.Module, name: str, inputs: torch.Tensor, labels: torch.Tensor) -> float:
    """The share of examples whose top class is their label (``inputs`` fed as ``name``),
    in batches of 256."""
    right = 0
    with torch.inference_mode():
        for start in range(0, len(labels), 256):
            logits = module(**{name: inputs[start : start + 256]})
            right += int((logits.argmax(-1) == labels[start : start + 256]).sum())
    return right / max(1, len(labels))


def compare(parent: dict[str, float], child: dict[str, float]) -> dict[str, float]:
    """Child over parent for each figure where a ratio means something, and the change in
    accuracy (in its own unit: a share of examples)."""
    keys = ("artifact_bytes", "parameters", "latency_ms_p50", "throughput_per_s")
    ratios = {f"{k}_ratio": child[k] / parent[k] for k in keys if parent.get(k)}
    if "accuracy" in parent and "accuracy" in child:
        ratios["accuracy_change"] = child["accuracy"] - parent["accuracy"]
    return ratios


PARITY = ("max_abs_diff", "top1_agreement")


def split_figures(metrics: dict[str, float]) -> dict[str, dict[str, float]]:
    """An optimized version's metrics as its own figures, its ratios to its parent's, and
    its parity with the parent."""
    ratios = {k: v for k, v in metrics.items() if k.endswith(("_ratio", "_change"))}
    parity = {k: v for k, v in metrics.items() if k in PARITY}
    own = {k: v for k, v in metrics.items() if k not in ratios and k not in parity}
    return {"figures": own, "ratios": ratios, "parity": parity}


def _tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every parameter and buffer, int8 weights of dynamically quantized layers included."""
    found = list(module.state_dict().items())
    packed = {n.split("._packed_params")[0] for n, _ in found if "._packed_params" in n}
    unused = {f"{p}.{q}" for p in packed for q in ("scale", "zero_point")}  # output qparams
    tensors = []
    for name, value in found:
        if name in unused:
            continue
        if isinstance(value, torch.Tensor) and not value.is_quantized:
            tensors.append((name, value))
        elif isinstance(value, torch.Tensor):
            tensors.append((name, value.int_repr()))
        elif isinstance(value, tuple):  # a dynamic linear's packed (weight, bias)
            weight, bias = value
            tensors.append(
                (name.replace("_packed_params._packed_params", "weight"), weight.int_repr())
            )
            if bias is not None:
                tensors.append((name.replace("_packed_params._packed_params", "bias"), bias))
    return tensors


def _rows(inputs: dict[str, torch.Tensor], start: int, count: int) -> dict[str, torch.Tensor]:
    return {k: v[start : start + count] for k, v in inputs.items()}


def _median_seconds(module: nn.Module, batch: dict[str, torch.Tensor]) -> float:
    times: list[float] = []
    with torch.inference_mode():
        for _ in range(2):
            module(**batch)  # warm-up
        began = time.perf_counter()
        while len(times) < MIN_RUNS or (
            len(times) < MAX_RUNS and time.perf_counter() - began < MAX_SECONDS
        ):
            started = time.perf_counter()
            module(**batch)
            times.append(time.perf_counter() - started)
    return statistics.median(times)
