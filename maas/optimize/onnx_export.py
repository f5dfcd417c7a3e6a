"""The ``export onnx`` step: a built-in torch model as an ONNX graph served by ONNX Runtime.

``torch.onnx.export`` (the ``torch.export``-based exporter, which needs ``onnxscript``)
traces the candidate's float module with a dynamic batch (and sequence, for token ids).
The graph's ``metadata_props`` carry the parent's task, labels and preprocessing
(maas/registry/formats/onnx_file.py reads them back), so the version serves through the same
routes. A quantize step before it runs in ONNX Runtime's own quantizer:

- ``int8-dynamic``: ``onnxruntime.quantization.quantize_dynamic``, int8 weights of every
  MatMul and Gemm (the torch step's linear layers) with a scale per output channel (one per
  tensor took MiniLM's cosine to its parent from 0.992 to 0.952), activations quantized per
  batch;
- ``int8-static``: ``quantize_static`` in QDQ form on Conv, MatMul and Gemm, weights int8 per
  channel and activations uint8 with ranges calibrated (MinMax) on the training file's first
  examples.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from maas.optimize.data import Examples

MODEL_FILE = "model.onnx"
CALIBRATION_EXAMPLES = 256
STATIC_OPS = ("Conv", "MatMul", "Gemm")
"""What static int8 quantizes: the layers with weights. Quantizing every op as well (the
embedding lookup, normalisations, softmax) took all-MiniLM-L6-v2's cosine to its parent
from 0.93 to 0.37 (bench/optimize.py, 2026-12-03)."""
CALIBRATION_BATCH = 16


def export(
    module: nn.Module,
    description: dict[str, Any],
    task: str,
    quantization: str | None,
    calibration: Examples | None,
    target: Path,
) -> str:
    """Write ``target`` (an .onnx file) of a built-in model and return what was done, for the
    step's note."""
    from maas.optimize.report import sample_inputs

    inputs = sample_inputs(description["architecture"], description["arguments"], 2)
    inputs = {k: v for k, v in inputs.items() if k != "attention_mask"}
    feeds = None
    if calibration is not None:
        name = next(iter(inputs))
        count = min(CALIBRATION_EXAMPLES, len(calibration))
        feeds = [
            {name: calibration.inputs[start : min(start + CALIBRATION_BATCH, count)].numpy()}
            for start in range(0, count, CALIBRATION_BATCH)
        ]
    return write(module, inputs, "logits", task, description, quantization, feeds, target)


def write(
    module: nn.Module,
    inputs: dict[str, torch.Tensor],
    output: str,
    task: str,
    description: dict[str, Any],
    quantization: str | None,
    feeds: list[dict[str, np.ndarray]] | None,
    target: Path,
) -> str:
    """Trace ``module`` on ``inputs`` (keyword tensors; its result is the graph's ``output``),
    quantize the graph in ONNX Runtime as ``quantization`` says (static int8 calibrated on
    ``feeds``), and write it to ``target`` with its serving metadata; returns the note."""
    with tempfile.TemporaryDirectory() as scratch:
        plain = Path(scratch) / "float.onnx"
        _trace(module.eval(), inputs, output, plain)
        if quantization in ("int8-dynamic", "int8-dynamic-a8"):
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantized = Path(scratch) / "int8.onnx"
            quantize_dynamic(
                plain,
                quantized,
                op_types_to_quantize=["MatMul", "Gemm"],
                weight_type=QuantType.QInt8,
                per_channel=True,
            )
            plain, done = (
                quantized,
                (
                    "int8 weights in MatMul and Gemm, a scale per output channel (ONNX Runtime, "
                    "dynamic)"
                ),
            )
        elif quantization == "int8-static":
            assert feeds  # recipe check: static int8 needs a training file
            plain, done = _static(plain, Path(scratch), feeds)
        else:
            done = "float32"
        _describe(plain, target, task, description)
    return f"exported to ONNX ({done}), {target.stat().st_size:,} bytes"


def _trace(module: nn.Module, inputs: dict[str, torch.Tensor], output: str, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=65_536)
    sequence = torch.export.Dim("sequence", min=1, max=65_536)
    shapes = {
        name: {0: batch, 1: sequence} if value.dtype == torch.long else {0: batch}
        for name, value in inputs.items()
    }
    program = torch.onnx.export(
        module,
        (),
        kwargs=inputs,
        dynamo=True,
        dynamic_shapes=shapes,
        input_names=list(inputs),
        output_names=[output],
        verbose=False,
    )
    program.save(path, external_data=False)


def _static(plain: Path, scratch: Path, feeds: list[dict[str, np.ndarray]]) -> tuple[Path, str]:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self._feeds = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._feeds, None)

    quantized = scratch / "static.onnx"
    quantize_static(
        plain,
        quantized,
        Batches(),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=list(STATIC_OPS),
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    count = sum(len(next(iter(feed.values()))) for feed in feeds)
    return quantized, f"static int8 (ONNX Runtime, QDQ), calibrated on {count} examples"


def _describe(source: Path, target: Path, task: str, description: dict[str, Any]) -> None:
    """``source`` with the serving metadata maas reads, written to ``target``."""
    import onnx

    model = onnx.load(str(source))
    for node in model.graph.node:  # the exporter's per-node trace (stack, module path)
        del node.metadata_props[:]
        node.doc_string = ""
    for value in [*model.graph.value_info, *model.graph.input, *model.graph.output]:
        del value.metadata_props[:]
    values = {
        "maas.task": task,
        "maas.labels": description.get("labels"),
        "maas.preprocessing": description.get("preprocessing"),
        "maas.task_options": description.get("task_options"),
    }
    del model.metadata_props[:]
    for key, value in values.items():
        if value is not None:
            model.metadata_props.add(key=key, value=json.dumps(value))
    target.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(target))


class OnnxModule(nn.Module):
    """An ONNX file run by ONNX Runtime as a module, so one harness measures both (its
    ``state_dict`` is the graph's initializers, int8 ones as they are stored)."""

    def __init__(self, path: Path) -> None:
        import onnx
        import onnxruntime
        from onnx import numpy_helper

        super().__init__()
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        self._session = onnxruntime.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )
        self._names = [i.name for i in self._session.get_inputs()]
        graph = onnx.load(str(path)).graph
        self._initializers = {
            init.name: torch.from_numpy(numpy_helper.to_array(init).copy())
            for init in graph.initializer
        }

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        feed = {k: v.numpy() for k, v in inputs.items() if k in self._names}
        return torch.from_numpy(self._session.run(None, feed)[0])

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return dict(self._initializers)
