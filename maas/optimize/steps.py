"""The steps, as transforms of a built-in torch model (``Candidate``): the architecture's
own code is never changed, only its module tree and how its weights are stored."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune

from maas.optimize import tuning
from maas.optimize.data import Examples
from maas.optimize.recipe import Step
from maas.optimize.tuning import Progress
from maas.runtime.int8_linear import linear_paths, lstm_paths, quantized_state


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
    exported: Path | None = None
    """The ONNX file an ``export onnx`` step wrote (the version is then that graph)."""


@dataclass
class Materials:
    """What the learning steps learn from."""

    examples: Examples | None
    """The job's training file, read as the parent reads its inputs (None: no step learns)."""
    teacher: nn.Module
    """The distil step's teacher: the model it names, or the parent."""
    seed: int
    progress: Progress | None = None
    task: str = "tensor"
    """The parent's task, which an exported graph records."""
    workdir: Path = Path(".")
    """Where a step writes files (the job's folder)."""


def apply(step: Step, candidate: Candidate, materials: Materials) -> Candidate:
    if step.kind == "prune":
        if step.options["structure"] == "structured":
            candidate = prune_structured(candidate, step.options["amount"])
        else:
            candidate = prune_unstructured(candidate, step.options["amount"])
        if step.options.get("fine_tune_steps"):
            candidate = _fine_tuned(candidate, step, materials)
        return candidate
    if step.kind == "distil":
        return distil(candidate, step, materials)
    if step.kind == "quantize" and step.variant == "int8-static":
        note = "static int8: ONNX Runtime quantizes the graph at export, calibrated on the data"
        return replace(candidate, quantization="int8-static", notes=[*candidate.notes, note])
    if step.kind == "quantize":
        return quantize_int8_dynamic(candidate)
    if step.kind == "export":
        return export_onnx(candidate, materials)
    if step.kind == "share":
        return share_weights(candidate, step.options["bits"])
    raise ValueError(f"no transform for {step}")  # recipe.check refuses it first


def export_onnx(candidate: Candidate, materials: Materials) -> Candidate:
    """The candidate's float module as an ONNX graph, quantized by ONNX Runtime when a
    quantize step came before (maas/optimize/onnx_export.py)."""
    from maas.optimize import onnx_export

    target = materials.workdir / "onnx" / onnx_export.MODEL_FILE
    note = onnx_export.export(
        candidate.module,
        candidate.description,
        materials.task,
        candidate.quantization,
        materials.examples,
        target,
    )
    return replace(candidate, exported=target, notes=[*candidate.notes, note])


def _fine_tuned(candidate: Candidate, step: Step, materials: Materials) -> Candidate:
    examples, steps = materials.examples, step.options["fine_tune_steps"]
    assert examples is not None  # job.check_parent refuses the step without a training file
    loss = tuning.fine_tune(
        candidate.module,
        examples,
        steps,
        step.setting("learning_rate"),
        materials.seed,
        materials.progress,
    )
    note = f"fine-tuned {steps} steps on {len(examples)} examples (last loss {loss:.4f})"
    return replace(candidate, notes=[*candidate.notes, note])


def distil(candidate: Candidate, step: Step, materials: Materials) -> Candidate:
    """A student learns from the teacher's softened outputs and the labels. The student is
    the candidate itself when an earlier step made it smaller (or ``width`` is 1), else the
    candidate's architecture ``width`` as wide (0.5 unless set) and ``layers`` deep (as deep
    unless set), freshly initialised."""
    from maas.runtime.architectures import build

    examples, options = materials.examples, step.options
    assert examples is not None  # job.check_parent refuses the step without a training file
    width = options.get("width") or (1.0 if candidate.notes else 0.5)
    description = candidate.description
    if width == 1 and options.get("layers") is None:
        student = candidate.module
    else:
        arguments = tuning.student_arguments(
            description["architecture"], description["arguments"], width, options.get("layers")
        )
        torch.manual_seed(materials.seed)
        student = build(description["architecture"], arguments)
        description = {**description, "arguments": arguments}
    loss = tuning.distil(
        materials.teacher,
        student,
        examples,
        step.setting("steps"),
        step.setting("learning_rate"),
        step.setting("temperature"),
        step.setting("alpha"),
        materials.seed,
        materials.progress,
    )
    before = sum(p.numel() for p in materials.teacher.parameters())
    after = sum(p.numel() for p in student.parameters())
    note = (
        f"distilled a {before:,}-parameter teacher into a {after:,}-parameter student "
        f"({step.setting('steps')} steps, T={step.setting('temperature')}, "
        f"alpha={step.setting('alpha')}, "
        f"last loss {loss:.4f})"
    )
    return replace(
        candidate, module=student, description=description, notes=[*candidate.notes, note]
    )


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
    """Every linear layer that can run so, and every LSTM, stores int8 weights with one scale
    per output row and runs dynamically quantized (maas/runtime/int8_linear.py), its
    activations quantized to 7 or 8 bits, whichever is closer to the float model on sample
    inputs."""
    from maas.optimize.report import sample_inputs
    from maas.runtime.architectures.folder import load_module

    paths, lstms = linear_paths(candidate.module), lstm_paths(candidate.module)
    if not paths and not lstms:
        raise ValueError("the model has no linear or LSTM layer to quantize")
    state = quantized_state(candidate.module, paths + lstms)
    description = candidate.description
    inputs = sample_inputs(description["architecture"], description["arguments"], 64)

    def run(quantization: str) -> torch.Tensor:
        module = load_module(
            description["architecture"], description["arguments"], state, quantization
        )
        return module(**inputs)

    with torch.inference_mode():
        quantization, errors = closer_activations(candidate.module(**inputs), run)
    layers = f"{len(paths)} linear layers: {', '.join(paths)}"
    if lstms:
        layers += f", and LSTM {', '.join(lstms)}"
    note = f"int8 weights in {layers}; {errors}"
    return replace(
        candidate, quantization=quantization, state=state, notes=[*candidate.notes, note]
    )


def closer_activations(expected: torch.Tensor, run) -> tuple[str, str]:
    """The int8-dynamic variant (7- or 8-bit activations) whose outputs ``run(variant)`` are
    closer to ``expected`` (mean absolute error), and both errors for the note."""
    from maas.runtime.int8_linear import INT8_DYNAMIC

    errors = {name: float((run(name) - expected).abs().mean()) for name in INT8_DYNAMIC}
    best = min(errors, key=errors.get)
    shown = ", ".join(
        f"{8 if INT8_DYNAMIC[name] else 7}-bit activations {error:.3g}"
        for name, error in errors.items()
    )
    bits = 8 if INT8_DYNAMIC[best] else 7
    return best, f"{bits}-bit activations kept (mean error to float: {shown})"


def share_weights(candidate: Candidate, bits: int) -> Candidate:
    """Each weight matrix and kernel clustered into ``2^bits`` shared values (k-means on its
    values, scikit-learn, centroids started evenly between the smallest and largest weight,
    as Deep Compression found best); a layer with pruned zeros keeps an exact 0 as one of
    them. Stored as codebook and packed codes (maas/runtime/shared_weights.py)."""
    import numpy as np
    from sklearn.cluster import KMeans

    from maas.runtime.shared_weights import CODEBOOK, CODES, pack, shared_paths

    state = {k: v.detach().clone() for k, v in candidate.module.state_dict().items()}
    paths = shared_paths(state)
    for path in paths:
        values = state.pop(path).reshape(-1).numpy().astype(np.float64)
        zeros = values == 0
        clusters = 2**bits - (1 if zeros.any() else 0)
        free = values[~zeros]
        clusters = min(clusters, len(np.unique(free)))
        start = np.linspace(free.min(), free.max(), clusters)[:, None]
        fit = KMeans(clusters, init=start, n_init=1, max_iter=50, random_state=0)
        labels = fit.fit_predict(free[:, None])
        centroids = fit.cluster_centers_.reshape(-1)
        codebook = np.zeros(2**bits)
        codes = np.zeros(len(values), dtype=np.uint8)
        offset = 1 if zeros.any() else 0  # code 0 is the exact zero
        codebook[offset : offset + clusters] = centroids
        codes[~zeros] = labels + offset
        state[path + CODEBOOK] = torch.from_numpy(codebook.astype(np.float32))
        state[path + CODES] = torch.from_numpy(pack(codes, bits))
    note = f"{len(paths)} weight tensors share {2**bits} values each ({bits}-bit codes)"
    return replace(
        candidate,
        quantization="weight-sharing",
        state=state,
        notes=[*candidate.notes, note],
    )


def prune_structured(candidate: Candidate, amount: float) -> Candidate:
    """Remove ``amount`` of each layer's units, and the weights that read them, so that the
    tensors really shrink: a small-cnn's filters and hidden units, a transformer-classifier's
    feed-forward units, an lstm-classifier's hidden units."""
    architecture = candidate.description["architecture"]
    if architecture == "transformer-classifier":
        return _prune_feedforward(candidate, amount)
    if architecture == "lstm-classifier":
        return _prune_hidden_units(candidate, amount)
    return _prune_channels(candidate, amount)


def _prune_channels(candidate: Candidate, amount: float) -> Candidate:
    """Remove the ``amount`` of each conv layer's filters and of the head's hidden units
    with the smallest L1 norms, and the weights that read them: a small-cnn with fewer
    ``channels`` and a smaller ``hidden``."""
    from maas.runtime.architectures import build

    old = candidate.module
    arguments = dict(candidate.description["arguments"])
    convs = [m for m in old.features if isinstance(m, nn.Conv2d)]
    first, last = old.classifier[1], old.classifier[4]
    state, kept_before = {}, torch.arange(convs[0].in_channels)
    channels = []
    for index, conv in zip(_conv_indices(old), convs, strict=True):
        keep = _strongest(conv.weight.detach().abs().sum(dim=(1, 2, 3)), amount)
        state[f"features.{index}.weight"] = conv.weight.detach()[keep][:, kept_before]
        state[f"features.{index}.bias"] = conv.bias.detach()[keep]
        kept_before = keep
        channels.append(len(keep))
    side = arguments["image_size"] // 2 ** len(convs)
    hidden = _strongest(first.weight.detach().abs().sum(dim=1), amount)
    columns = first.weight.detach().reshape(first.out_features, -1, side, side)
    state["classifier.1.weight"] = columns[hidden][:, kept_before].reshape(len(hidden), -1)
    state["classifier.1.bias"] = first.bias.detach()[hidden]
    state["classifier.4.weight"] = last.weight.detach()[:, hidden]
    state["classifier.4.bias"] = last.bias.detach()
    arguments.update(channels=channels, hidden=len(hidden))
    module = build("small-cnn", arguments)
    module.load_state_dict({k: v.clone() for k, v in state.items()}, strict=True)
    before = sum(p.numel() for p in old.parameters())
    after = sum(p.numel() for p in module.parameters())
    note = (
        f"structured: channels {[c.out_channels for c in convs]} -> {channels}, hidden "
        f"{first.out_features} -> {len(hidden)}; {before:,} -> {after:,} parameters"
    )
    description = {**candidate.description, "arguments": arguments}
    return replace(
        candidate, module=module, description=description, notes=[*candidate.notes, note]
    )


def _prune_feedforward(candidate: Candidate, amount: float) -> Candidate:
    """Remove ``amount`` of every encoder layer's feed-forward units, those whose input row
    and output column have the smallest product of L2 norms (what a unit can add to the
    residual stream). Attention heads stay: ``nn.MultiheadAttention`` splits ``d_model``
    evenly among its heads, so a head cannot go without narrowing the whole model."""
    old = candidate.module
    arguments = dict(candidate.description["arguments"])
    state = {k: v.detach().clone() for k, v in old.state_dict().items()}
    width = old.encoder.layers[0].linear1.out_features
    for index, layer in enumerate(old.encoder.layers):
        scores = layer.linear1.weight.detach().norm(dim=1) * layer.linear2.weight.detach().norm(
            dim=0
        )
        keep = _strongest(scores, amount)
        prefix = f"encoder.layers.{index}."
        for name in ("linear1.weight", "linear1.bias"):
            state[prefix + name] = state[prefix + name][keep]
        state[prefix + "linear2.weight"] = state[prefix + "linear2.weight"][:, keep]
    kept = len(keep)
    arguments["dim_feedforward"] = kept
    note = (
        f"structured: feed-forward units {width} -> {kept} in each of {len(old.encoder.layers)} "
        "layers (attention heads stay: they split d_model evenly)"
    )
    return _rebuilt(candidate, arguments, state, note)


def _prune_hidden_units(candidate: Candidate, amount: float) -> Candidate:
    """Remove ``amount`` of each LSTM layer's (and direction's) hidden units, those whose
    four gate rows have the smallest L1 norms, with the recurrent columns, the next layer's
    input columns and the head's columns that read them."""
    old: nn.LSTM = candidate.module.lstm
    arguments = dict(candidate.description["arguments"])
    state = {k: v.detach().clone() for k, v in candidate.module.state_dict().items()}
    size = old.hidden_size
    suffixes = ["", "_reverse"] if old.bidirectional else [""]
    kept: dict[tuple[int, int], torch.Tensor] = {}
    for layer in range(old.num_layers):
        for direction, suffix in enumerate(suffixes):
            rows = state[f"lstm.weight_ih_l{layer}{suffix}"].abs().sum(dim=1) + state[
                f"lstm.weight_hh_l{layer}{suffix}"
            ].abs().sum(dim=1)
            kept[layer, direction] = _strongest(rows.view(4, size).sum(dim=0), amount)

    def read(layer: int) -> torch.Tensor:
        """The columns of layer ``layer``'s output (both directions) that stay."""
        return torch.cat([kept[layer, d] + d * size for d in range(len(suffixes))])

    for layer in range(old.num_layers):
        for direction, suffix in enumerate(suffixes):
            keep = kept[layer, direction]
            rows = torch.cat([gate * size + keep for gate in range(4)])
            ih, hh = f"lstm.weight_ih_l{layer}{suffix}", f"lstm.weight_hh_l{layer}{suffix}"
            state[ih] = state[ih][rows] if layer == 0 else state[ih][rows][:, read(layer - 1)]
            state[hh] = state[hh][rows][:, keep]
            for bias in (f"lstm.bias_ih_l{layer}{suffix}", f"lstm.bias_hh_l{layer}{suffix}"):
                state[bias] = state[bias][rows]
    state["classifier.weight"] = state["classifier.weight"][:, read(old.num_layers - 1)]
    count = len(kept[0, 0])
    arguments["hidden_size"] = count
    note = f"structured: LSTM hidden units {size} -> {count} in each of {old.num_layers} layers"
    return _rebuilt(candidate, arguments, state, note)


def _rebuilt(candidate: Candidate, arguments: dict, state: dict, note: str) -> Candidate:
    """The candidate's architecture built with ``arguments`` and loaded with ``state``."""
    from maas.runtime.architectures import build

    architecture = candidate.description["architecture"]
    module = build(architecture, arguments)
    module.load_state_dict({k: v.contiguous() for k, v in state.items()}, strict=True)
    before = sum(p.numel() for p in candidate.module.parameters())
    after = sum(p.numel() for p in module.parameters())
    description = {**candidate.description, "arguments": arguments}
    return replace(
        candidate,
        module=module.eval(),
        description=description,
        notes=[*candidate.notes, f"{note}; {before:,} -> {after:,} parameters"],
    )


def _conv_indices(module: nn.Module) -> list[int]:
    return [i for i, m in enumerate(module.features) if isinstance(m, nn.Conv2d)]


def _strongest(norms: torch.Tensor, amount: float) -> torch.Tensor:
    """Indices of the ``1 - amount`` largest ``norms`` (at least one), in their order."""
    keep = max(1, round(len(norms) * (1 - amount)))
    return torch.sort(torch.topk(norms, keep).indices).values
