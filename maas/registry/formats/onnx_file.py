"""ONNX models: graph inputs and outputs, and external data that must stay inside the folder."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto

from maas.errors import RefusedArtifact, UnsupportedFormat
from maas.registry.formats.info import FormatInfo
from maas.registry.manifest import TASKS, TensorSpec
from maas.registry.policy import check_path_text

V2_DATATYPES = {
    TensorProto.BOOL: "BOOL",
    TensorProto.UINT8: "UINT8",
    TensorProto.UINT16: "UINT16",
    TensorProto.UINT32: "UINT32",
    TensorProto.UINT64: "UINT64",
    TensorProto.INT8: "INT8",
    TensorProto.INT16: "INT16",
    TensorProto.INT32: "INT32",
    TensorProto.INT64: "INT64",
    TensorProto.FLOAT16: "FP16",
    TensorProto.FLOAT: "FP32",
    TensorProto.DOUBLE: "FP64",
    TensorProto.BFLOAT16: "BF16",
    TensorProto.STRING: "BYTES",
}


def load_graph(path: Path) -> onnx.ModelProto:
    """Parse the model without touching external data."""
    try:
        return onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, OSError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else type(err).__name__
        raise UnsupportedFormat(f"{path.name} is not a valid ONNX model ({reason})") from None


def external_data_files(model: onnx.ModelProto, model_path: Path, folder: Path) -> list[str]:
    """Relative paths (inside ``folder``) of the files the model's external data lives in.

    Refuses a location that is absolute, climbs out with '..', or resolves outside ``folder``.
    """
    locations: set[str] = set()
    base = model_path.parent
    for tensor in tensors_of(model.graph):
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        location = {entry.key: entry.value for entry in tensor.external_data}.get("location", "")
        check_path_text(location, f"{model_path.name}: external data location of {tensor.name!r}")
        pure = PurePosixPath(location)
        if not location or "\\" in location or pure.is_absolute() or ".." in pure.parts:
            raise RefusedArtifact(
                f"{model_path.name}: external data of {tensor.name!r} points outside the "
                f"model folder ({location!r})"
            )
        resolved = (base / pure).resolve()
        if not resolved.is_relative_to(folder.resolve()):
            raise RefusedArtifact(
                f"{model_path.name}: external data of {tensor.name!r} points outside the "
                f"model folder ({location!r})"
            )
        if not resolved.is_file():
            raise UnsupportedFormat(
                f"{model_path.name}: external data file {location!r} is missing"
            )
        locations.add(resolved.relative_to(folder.resolve()).as_posix())
    return sorted(locations)


def inspect(folder: Path, model_path: Path) -> FormatInfo:
    model = load_graph(model_path)
    external = external_data_files(model, model_path, folder)
    try:
        onnx.checker.check_model(str(model_path))
    except onnx.checker.ValidationError as err:
        reason = str(err).replace(f"{folder.resolve()}/", "").replace(f"{folder}/", "")
        raise UnsupportedFormat(f"{model_path.name} is not a valid ONNX model: {reason}") from None
    initializers = {init.name for init in model.graph.initializer}
    inputs = [_spec(v) for v in model.graph.input if v.name not in initializers]
    described = described_serving(model)
    options = dict(described.get("task_options", {}))
    if "preprocessing" in described:
        options["preprocessing"] = described["preprocessing"]
    tokenizer = {"kind": "huggingface", "files": ["tokenizer.json"]}
    return FormatInfo(
        format="onnx",
        runtime="onnx",
        default_task=described.get("task", "tensor"),
        tasks=TASKS,
        labels=described.get("labels"),
        task_options=options,
        tokenizer=tokenizer if (folder / "tokenizer.json").is_file() else None,
        architecture=model.graph.name or None,
        config={
            "model_file": model_path.relative_to(folder).as_posix(),
            "ir_version": model.ir_version,
            "opset": {op.domain or "ai.onnx": op.version for op in model.opset_import},
            "producer": f"{model.producer_name} {model.producer_version}".strip(),
        },
        inputs=inputs,
        outputs=[_spec(v) for v in model.graph.output],
        weight_files=[model_path.relative_to(folder).as_posix(), *external],
    )


SERVING_KEYS = {
    "maas.task": "task",
    "maas.labels": "labels",
    "maas.preprocessing": "preprocessing",
    "maas.task_options": "task_options",
}
"""The model's ``metadata_props`` a maas ONNX export writes (JSON values), so that its
version serves with its parent's task, labels, preprocessing and task options (an
embedder's pooling, normalisation and longest input)."""


def described_serving(model: onnx.ModelProto) -> dict:
    """What the graph's metadata says about serving it; a malformed entry is refused."""
    described = {}
    for prop in model.metadata_props:
        if prop.key in SERVING_KEYS:
            try:
                value = json.loads(prop.value)
            except ValueError:
                raise UnsupportedFormat(f"metadata {prop.key!r} is not JSON") from None
            kind = {"task": str, "labels": list, "preprocessing": dict, "task_options": dict}[
                SERVING_KEYS[prop.key]
            ]
            if not isinstance(value, kind) or (
                kind is list and not all(isinstance(v, str) for v in value)
            ):
                raise UnsupportedFormat(f"metadata {prop.key!r} is not a {kind.__name__}")
            described[SERVING_KEYS[prop.key]] = value
    if described.get("task") not in (None, *TASKS):
        raise UnsupportedFormat(f"metadata 'maas.task' names no task: {described['task']!r}")
    return described


def _spec(value: onnx.ValueInfoProto) -> TensorSpec:
    tensor_type = value.type.tensor_type
    datatype = V2_DATATYPES.get(tensor_type.elem_type)
    if datatype is None:
        raise UnsupportedFormat(f"input or output {value.name!r} has an unsupported type")
    shape = [dim.dim_value if dim.HasField("dim_value") else -1 for dim in tensor_type.shape.dim]
    return TensorSpec(name=value.name, datatype=datatype, shape=shape)


def tensors_of(graph: onnx.GraphProto) -> Iterator[TensorProto]:
    """Every tensor of a graph, its subgraphs included, that may hold external data."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from tensors_of(attribute.g)
            for subgraph in attribute.graphs:
                yield from tensors_of(subgraph)
