"""Optimizing a Hugging Face encoder (runtime ``transformers``: embeddings such as MiniLM, or
a BERT-like text classifier): ``export onnx`` traces it into an ONNX graph that ONNX Runtime
serves (after ``quantize int8-dynamic`` or ``int8-static``, quantized by ONNX Runtime's
quantizer); ``quantize int8-dynamic`` alone stores every linear layer's weights
as int8 with one scale per output row (maas/runtime/int8_linear.py) and marks config.json
``"maas_quantization": "int8-dynamic"`` (7-bit activations) or ``"int8-dynamic-a8"`` (8-bit),
whichever is closer to the parent on the evaluation texts, so the transformers runtime
builds the model and runs those layers dynamically quantized.

The report measures parent and child as the runtime loads them (``load_pretrained``), on
texts tokenised with the parent's tokenizer: the evaluation file's ``text`` column, or a
few built-in sentences. For embeddings, quality is the mean cosine similarity of the
child's sentence embeddings (pooled and normalised as the version serves them) to the
parent's (``cosine_to_parent``); for classifiers, the share of texts given the parent's
label (``top1_agreement``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from maas.optimize import report
from maas.registry.records import OpenedVersion

SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "To make a cup of tea, boil the water, add the leaves and wait three minutes.",
    "The model registry keeps every version of a model, with its lineage and metrics.",
    "Invoices are due thirty days after the date of delivery.",
    "A heavy storm closed the mountain roads for most of the week.",
    "She learned to play the violin when she was seven years old.",
)
"""Texts the report embeds when no evaluation file is given."""


def auto_class(task: str):
    import transformers

    return {
        "embeddings": transformers.AutoModel,
        "text-classification": transformers.AutoModelForSequenceClassification,
    }[task]


def load(opened: OpenedVersion) -> nn.Module:
    from maas.runtime.classic.transformers_task import load_pretrained

    return load_pretrained(opened, auto_class(opened.manifest.task)).eval()


def quantize_int8_dynamic(opened: OpenedVersion, folder: Path, texts: list[str] | None) -> str:
    """The child folder: int8 linear weights, the parent's other files; returns the note.
    Activations are quantized to 7 or 8 bits, whichever gives outputs closer to the
    parent's on the texts."""
    from safetensors.torch import save_file

    from maas.optimize.steps import closer_activations
    from maas.runtime.classic.transformers_task import QUANTIZATION_KEY
    from maas.runtime.int8_linear import INT8_DYNAMIC, dynamic_int8, linear_paths, quantized_state

    model = load(opened)
    paths = linear_paths(model)
    if not paths:
        raise ValueError("the model has no linear layer to quantize")
    state = {k: v.contiguous() for k, v in quantized_state(model, paths).items()}
    name = _output_name(opened.manifest.task)
    inputs = _inputs(opened, model, list(texts or SENTENCES))
    fresh = auto_class(opened.manifest.task).from_config

    def run(variant: str) -> torch.Tensor:
        quantized = dynamic_int8(fresh(model.config), state, INT8_DYNAMIC[variant]).eval()
        return getattr(quantized(**inputs), name)

    with torch.inference_mode():
        variant, errors = closer_activations(getattr(model(**inputs), name), run)
    folder.mkdir(parents=True, exist_ok=True)
    for entry in opened.manifest.files:
        name = entry.path
        if name.endswith(".safetensors") or name in ("config.json", "manifest.json"):
            continue
        if name.endswith(".safetensors.index.json"):
            continue
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(opened.read_bytes(name))
    config = json.loads(opened.read_bytes("config.json"))
    (folder / "config.json").write_text(json.dumps({**config, QUANTIZATION_KEY: variant}))
    save_file(state, str(folder / "model.safetensors"))
    return f"int8 weights in {len(paths)} linear layers; {errors}"


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)
CALIBRATION_TEXTS = 256
CALIBRATION_BATCH = 16


def export_onnx(
    opened: OpenedVersion, folder: Path, quantization: str | None, calibration: list[str] | None
) -> str:
    """The child folder: the parent's float model traced to ONNX (``model.onnx``, with a
    dynamic batch and sequence), its graph quantized in ONNX Runtime as ``quantization`` says
    (static int8 calibrated on the first ``calibration`` texts), and its tokenizer; the
    graph's metadata carries the task, labels and task options (pooling, normalisation,
    longest input) so that the version serves through its parent's routes."""
    from maas.optimize import onnx_export

    task = opened.manifest.task
    model = load(opened)
    name = _output_name(task)
    inputs = _inputs(opened, model, list(SENTENCES))
    feeds = None
    if calibration is not None:
        texts = _inputs(opened, model, calibration[:CALIBRATION_TEXTS])
        count = min(CALIBRATION_TEXTS, len(texts["input_ids"]))
        feeds = [
            {k: v[start : start + CALIBRATION_BATCH].numpy() for k, v in texts.items()}
            for start in range(0, count, CALIBRATION_BATCH)
        ]
    options = dict(opened.manifest.task_options)
    options.setdefault("max_seq_length", opened.manifest.context_length or 512)
    description = {"labels": opened.manifest.labels, "task_options": options}
    folder.mkdir(parents=True, exist_ok=True)
    note = onnx_export.write(
        _Traced(model, name), inputs, name, task, description, quantization, feeds,
        folder / onnx_export.MODEL_FILE,
    )  # fmt: skip
    for file in TOKENIZER_FILES:
        if any(entry.path == file for entry in opened.manifest.files):
            (folder / file).write_bytes(opened.read_bytes(file))
    return note


def _output_name(task: str) -> str:
    return "last_hidden_state" if task == "embeddings" else "logits"


class _Traced(nn.Module):
    """A transformers encoder with the runtime's text inputs as named arguments (what
    ``torch.export`` traces: it cannot name the entries of ``**inputs``)."""

    def __init__(self, model: nn.Module, name: str) -> None:
        super().__init__()
        self.model, self.name = model, name

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        return getattr(self.model(input_ids, attention_mask=attention_mask, **extra), self.name)


class _Output(nn.Module):
    """A transformers model as a module that returns the tensor the runtime serves."""

    def __init__(self, model: nn.Module, name: str) -> None:
        super().__init__()
        self.model, self.name = model, name

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        return getattr(self.model(**inputs), self.name)


def measure(
    parent: OpenedVersion,
    child: OpenedVersion,
    child_bytes: int,
    texts: list[str] | None,
) -> tuple[dict[str, float], dict[str, float]]:
    """(parent's figures, child's figures and comparisons)."""
    from maas.optimize.onnx_export import MODEL_FILE, OnnxModule

    task = parent.manifest.task
    name = _output_name(task)
    served = _Output(load(parent), name)
    if child.manifest.format == "onnx":
        models = [served, OnnxModule(child.folder / MODEL_FILE)]
    else:
        models = [served, _Output(load(child), name)]
    inputs = _inputs(parent, served.model, list(texts or SENTENCES))
    parent_figures = report.measure(models[0], parent.manifest.size_bytes, inputs)
    child_figures = report.measure(models[1], child_bytes, inputs)
    figures = {**child_figures, **report.compare(parent_figures, child_figures)}
    with torch.inference_mode():
        outputs = [model(**inputs) for model in models]
    figures["max_abs_diff"] = float((outputs[1] - outputs[0]).abs().max())
    if task == "embeddings":
        options = parent.manifest.task_options
        vectors = [_sentences(o, inputs["attention_mask"], options) for o in outputs]
        cosine = torch.nn.functional.cosine_similarity(vectors[0], vectors[1], dim=-1)
        figures["cosine_to_parent"] = float(cosine.mean())
        figures["cosine_to_parent_min"] = float(cosine.min())
    else:
        same = outputs[0].argmax(-1) == outputs[1].argmax(-1)
        figures["top1_agreement"] = float(same.float().mean())
    figures["evaluation_texts"] = float(len(inputs["input_ids"]))
    return parent_figures, figures


def _inputs(opened: OpenedVersion, model: nn.Module, texts: list[str]) -> dict[str, Any]:
    """At least ``report.TIMED_BATCH`` texts (repeated if fewer) as the runtime pads them."""
    import inspect

    from torch.nn.utils.rnn import pad_sequence

    from maas.tasks.text import TextEncoder

    options = opened.manifest.task_options
    max_length = options.get("max_seq_length") or opened.manifest.context_length or 512
    while len(texts) < report.TIMED_BATCH:
        texts = texts + texts
    with opened.open_file("tokenizer.json") as path:
        encoder = TextEncoder(path, int(max_length))
    rows = encoder.encode(texts[:512])
    accepted = inspect.signature(model.forward).parameters
    return {  # right-padded with 0, as the runtime's batcher pads (attention masks too)
        n: pad_sequence([torch.from_numpy(r[n]) for r in rows], batch_first=True)
        for n in rows[0]
        if n in accepted
    }


def _sentences(hidden: torch.Tensor, mask: torch.Tensor, options: dict) -> torch.Tensor:
    """Sentence vectors as the embeddings route makes them (pooling, then normalising)."""
    weights = mask[..., None].to(hidden.dtype)
    mode = options.get("pooling", "mean")
    if mode == "cls":
        vectors = hidden[:, 0]
    elif mode == "max":
        vectors = hidden.masked_fill(weights == 0, float("-inf")).amax(dim=1)
    else:
        vectors = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
    if options.get("normalize", False):
        vectors = torch.nn.functional.normalize(vectors, dim=-1)
    return vectors
