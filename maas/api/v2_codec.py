"""Open Inference Protocol v2 (KServe / Triton) bodies <-> numpy, with binary tensor data.

A request body is a JSON header, optionally followed by raw tensor data. The HTTP header
``Inference-Header-Content-Length: N`` says the first N bytes are JSON; the rest is the data
of every input whose ``parameters.binary_data_size`` is set, concatenated in input order.
Raw data is little-endian and row-major; BOOL is one byte (0 or 1) per element; a BYTES
element is a uint32 little-endian length followed by that many bytes.

Responses use the same framing for outputs asked for as binary (per output
``parameters.binary_data``, or the request's ``parameters.binary_data_output`` as default).

Everything here is pure: no HTTP framework, and every problem with a body is an
``InvalidRequest`` whose message names the input or output at fault.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from maas.api import strict_json
from maas.errors import InvalidRequest, MaasError
from maas.registry.manifest import TensorSpec

HEADER_LENGTH = "Inference-Header-Content-Length"
"""HTTP header giving the size of the JSON part of a body that carries binary tensor data."""

_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}
DATATYPES = tuple(_DTYPES)
"""The v2 datatypes an input may have (BF16 is sent as FP32)."""
_SHARED_MEMORY_PARAMETERS = ("shared_memory_region", "shared_memory_byte_size")


@dataclass(frozen=True)
class InferRequest:
    """A decoded and validated inference request."""

    id: str | None
    inputs: dict[str, np.ndarray]
    """By input name. BYTES inputs are object arrays of ``bytes``; all arrays are writable."""
    requested_outputs: list[str] | None
    """The outputs asked for, in request order; ``None`` means all of them."""
    binary_outputs: set[str]
    """The outputs to send as binary data rather than JSON."""
    parameters: dict[str, Any] = field(default_factory=dict)
    """The request's ``parameters`` object, as sent."""


def v2_to_numpy(datatype: str) -> np.dtype | None:
    """The numpy dtype of a v2 datatype (BYTES -> object); ``None`` if numpy has none (BF16)."""
    return _DTYPES.get(datatype)


def numpy_to_v2(dtype: np.dtype) -> str:
    """The v2 datatype of a numpy dtype; strings, bytes and objects are BYTES."""
    dtype = np.dtype(dtype)
    if dtype.kind in "OSU":
        return "BYTES"
    for datatype, candidate in _DTYPES.items():
        if dtype.newbyteorder("<") == candidate:
            return datatype
    raise ValueError(f"numpy dtype {dtype} has no Open Inference Protocol v2 datatype")


def parse_request(
    body: bytes, header_length: str | None, specs: list[TensorSpec], output_names: list[str]
) -> InferRequest:
    """Decode a v2 ``/infer`` body and check it against the model's inputs and outputs.

    ``header_length`` is the ``Inference-Header-Content-Length`` header value, if sent.
    ``specs`` are the model's input specs, ``output_names`` its output names. Raises
    ``InvalidRequest`` for anything the model cannot take.
    """
    header, blob = _split_body(body, header_length)
    doc = _load_json(header)
    parameters = _optional_object(doc.get("parameters"), "parameters")
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidRequest("'id' must be a string", param="id")
    inputs = _decode_inputs(doc.get("inputs"), _Blobs(blob, header_length is not None), specs)
    requested, binary = _requested_outputs(doc.get("outputs"), parameters, output_names)
    return InferRequest(request_id, inputs, requested, binary, parameters)


def encode_response(
    model_name: str,
    model_version: str,
    outputs: dict[str, np.ndarray],
    request: InferRequest,
    output_specs: list[TensorSpec],
) -> tuple[bytes, dict[str, str]]:
    """Encode a model's outputs as the v2 response to ``request``; return (body, headers).

    Each output takes the datatype of its spec (BF16 is sent as FP32). With any binary
    output the body is JSON + raw data and the headers carry ``Inference-Header-Content-Length``.
    """
    entries, blobs = _encode_outputs(outputs, request, output_specs)
    doc: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request.id is not None:
        doc["id"] = request.id
    doc["outputs"] = entries
    # ASCII-only JSON, so its length in bytes is its length in characters (what tritonclient uses).
    header = json.dumps(doc, separators=(",", ":"), ensure_ascii=True).encode()
    if not blobs:
        return header, {"Content-Type": "application/json"}
    headers = {HEADER_LENGTH: str(len(header)), "Content-Type": "application/octet-stream"}
    return b"".join([header, *blobs]), headers


# --- request -------------------------------------------------------------------------------


class _Blobs:
    """The binary part of a request body, handed out to inputs in order."""

    def __init__(self, data: bytes, framed: bool) -> None:
        self.data = memoryview(data)
        self.offset = 0
        self.framed = framed

    def take(self, size: int, name: str, param: str) -> memoryview:
        remaining = len(self.data) - self.offset
        if size > remaining:
            hint = "" if self.framed else f"; binary data needs the {HEADER_LENGTH} header"
            raise InvalidRequest(
                f"input '{name}' has binary_data_size {size} but only {remaining} bytes "
                f"of binary data remain{hint}",
                param=param,
            )
        self.offset += size
        return self.data[self.offset - size : self.offset]

    def check_consumed(self) -> None:
        if extra := len(self.data) - self.offset:
            raise InvalidRequest(
                f"the body has {extra} bytes of binary data that no input's binary_data_size "
                "accounts for"
            )


def _split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    text = header_length.strip()
    if not (text.isascii() and text.isdigit()):
        raise InvalidRequest(f"{HEADER_LENGTH} must be a number of bytes, not {header_length!r}")
    size = int(text)
    if size > len(body):
        raise InvalidRequest(f"{HEADER_LENGTH} is {size} but the body has only {len(body)} bytes")
    return body[:size], body[size:]


def _load_json(header: bytes) -> dict[str, Any]:
    try:
        doc = strict_json.loads(header)
    except (ValueError, RecursionError) as err:
        raise InvalidRequest(f"the request is not valid JSON: {err}") from None
    return _object(doc, "request")


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidRequest(f"'{what}' must be a JSON object", param=what)
    return value


def _optional_object(value: Any, what: str) -> dict[str, Any]:
    return {} if value is None else _object(value, what)


def _decode_inputs(entries: Any, blobs: _Blobs, specs: list[TensorSpec]) -> dict[str, np.ndarray]:
    if not isinstance(entries, list):
        raise InvalidRequest("the request needs an 'inputs' list", param="inputs")
    by_name = {spec.name: spec for spec in specs}
    inputs: dict[str, np.ndarray] = {}
    for index, entry in enumerate(entries):
        param = f"inputs[{index}]"
        entry = _object(entry, param)
        spec = _input_spec(entry.get("name"), by_name, param)
        if spec.name in inputs:
            raise InvalidRequest(f"input '{spec.name}' is given twice", param=f"{param}.name")
        inputs[spec.name] = _decode_input(entry, spec, blobs, param)
    blobs.check_consumed()
    if missing := [spec.name for spec in specs if spec.name not in inputs]:
        names = ", ".join(f"'{name}'" for name in missing)
        raise InvalidRequest(f"missing input {names}", param="inputs")
    return inputs


def _input_spec(name: Any, by_name: dict[str, TensorSpec], param: str) -> TensorSpec:
    if not isinstance(name, str):
        raise InvalidRequest(f"{param} needs a string 'name'", param=f"{param}.name")
    if name not in by_name:
        known = ", ".join(f"'{known}'" for known in by_name) or "none"
        raise InvalidRequest(
            f"the model has no input '{name}' (inputs: {known})", param=f"{param}.name"
        )
    return by_name[name]


def _decode_input(entry: dict[str, Any], spec: TensorSpec, blobs: _Blobs, param: str) -> np.ndarray:
    name = spec.name
    datatype = _input_datatype(entry.get("datatype"), spec, f"{param}.datatype")
    shape = _input_shape(entry.get("shape"), spec, f"{param}.shape")
    parameters = _optional_object(entry.get("parameters"), f"{param}.parameters")
    if any(key in parameters for key in _SHARED_MEMORY_PARAMETERS):
        raise InvalidRequest(f"input '{name}': shared memory is not supported", param=param)
    if "binary_data_size" in parameters:
        if "data" in entry:
            raise InvalidRequest(
                f"input '{name}' has both 'data' and binary_data_size", param=param
            )
        size = parameters["binary_data_size"]
        if type(size) is not int or size < 0:
            raise InvalidRequest(
                f"input '{name}': binary_data_size must be a byte count",
                param=f"{param}.parameters",
            )
        raw = blobs.take(size, name, f"{param}.parameters")
        return _from_binary(raw, datatype, shape, name, param)
    if "data" not in entry:
        raise InvalidRequest(f"input '{name}' has no 'data'", param=f"{param}.data")
    values = _flatten(entry["data"], shape, name, f"{param}.data")
    return _from_values(values, datatype, name, f"{param}.data").reshape(shape)


def _input_datatype(datatype: Any, spec: TensorSpec, param: str) -> str:
    name = spec.name
    if datatype == "BF16":
        raise InvalidRequest(
            f"input '{name}': BF16 is not supported; send the data as FP32", param=param
        )
    if datatype not in _DTYPES:
        raise InvalidRequest(f"input '{name}' has unknown datatype {datatype!r}", param=param)
    # numpy has no bfloat16: a BF16 model takes FP32 and the runtime converts.
    expected = "FP32" if spec.datatype == "BF16" else spec.datatype
    if datatype != expected:
        raise InvalidRequest(
            f"input '{name}' has datatype {datatype}; the model expects {expected}", param=param
        )
    return datatype


def _input_shape(shape: Any, spec: TensorSpec, param: str) -> list[int]:
    name = spec.name
    if not isinstance(shape, list) or any(type(dim) is not int or dim < 0 for dim in shape):
        raise InvalidRequest(
            f"input '{name}': shape must be a list of non-negative integers, not {_show(shape)}",
            param=param,
        )
    fits = len(shape) == len(spec.shape) and all(
        want in (-1, dim) for dim, want in zip(shape, spec.shape, strict=True)
    )
    if not fits:
        raise InvalidRequest(
            f"input '{name}' has shape {shape}; the model expects {spec.shape} (-1: any size)",
            param=param,
        )
    return shape


def _from_binary(
    raw: memoryview, datatype: str, shape: list[int], name: str, param: str
) -> np.ndarray:
    count = math.prod(shape)
    if datatype == "BYTES":
        items = _split_bytes(raw, name, param)
        if len(items) != count:
            raise InvalidRequest(
                f"input '{name}' has shape {shape} ({count} elements) but its binary data "
                f"holds {len(items)}",
                param=param,
            )
        return _object_array(items, shape)
    dtype = _DTYPES[datatype]
    if len(raw) != count * dtype.itemsize:
        raise InvalidRequest(
            f"input '{name}' has shape {shape} of {datatype}, which is "
            f"{count * dtype.itemsize} bytes, but binary_data_size is {len(raw)}",
            param=param,
        )
    if datatype == "BOOL" and np.frombuffer(raw, dtype=np.uint8).max(initial=0) > 1:
        raise InvalidRequest(f"input '{name}': BOOL bytes must be 0 or 1", param=param)
    return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()


def _split_bytes(raw: memoryview, name: str, param: str) -> list[bytes]:
    items, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidRequest(f"input '{name}': BYTES data ends inside a length", param=param)
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise InvalidRequest(f"input '{name}': BYTES data ends inside an element", param=param)
        items.append(bytes(raw[offset : offset + size]))
        offset += size
    return items


def _flatten(data: Any, shape: list[int], name: str, param: str) -> list[Any]:
    """Row-major elements of flat or fully nested JSON ``data``, checked against ``shape``."""
    if not isinstance(data, list):
        raise InvalidRequest(f"input '{name}': 'data' must be a list", param=param)
    if not any(isinstance(item, list) for item in data):
        if len(data) != math.prod(shape):
            raise InvalidRequest(
                f"input '{name}' has shape {shape} ({math.prod(shape)} elements) "
                f"but 'data' has {len(data)}",
                param=param,
            )
        return data
    level = [data]
    for dim in shape:
        if any(not isinstance(item, list) or len(item) != dim for item in level):
            raise InvalidRequest(
                f"input '{name}': nested 'data' does not match shape {shape}", param=param
            )
        level = [value for item in level for value in item]
    if any(isinstance(value, list) for value in level):
        raise InvalidRequest(
            f"input '{name}': nested 'data' is deeper than shape {shape}", param=param
        )
    return level


def _from_values(values: list[Any], datatype: str, name: str, param: str) -> np.ndarray:
    fits, why = _value_rule(datatype)
    for index, value in enumerate(values):
        if not fits(value):
            message = f"input '{name}' element {index} is {_show(value)}; {why}"
            raise InvalidRequest(message, param=param)
    if datatype != "BYTES":
        return np.array(values, dtype=_DTYPES[datatype])
    # strings are Unicode text: strict_json refused any holding half a surrogate pair
    return _object_array([value.encode() for value in values], [len(values)])


def _value_rule(datatype: str) -> tuple[Callable[[Any], bool], str]:
    """Which JSON values a datatype takes, and how to say so."""
    if datatype == "BYTES":
        return (lambda v: isinstance(v, str)), "BYTES needs strings"
    if datatype == "BOOL":
        return (lambda v: type(v) is bool), "BOOL needs true or false"
    dtype = _DTYPES[datatype]
    if dtype.kind in "iu":
        low, high = int(np.iinfo(dtype).min), int(np.iinfo(dtype).max)
        return (lambda v: type(v) is int and low <= v <= high), (
            f"{datatype} needs integers from {low} to {high}"
        )
    limit = float(np.finfo(dtype).max)
    return _fits_float(limit), f"{datatype} needs numbers within ±{limit:g}"


def _fits_float(limit: float) -> Callable[[Any], bool]:
    def fits(value: Any) -> bool:
        if type(value) is float and not math.isfinite(value):
            return True  # NaN and Infinity: Python's json reads them, and floats hold them
        return type(value) in (int, float) and abs(value) <= limit

    return fits


def _show(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _object_array(items: list[bytes], shape: list[int]) -> np.ndarray:
    array = np.empty(len(items), dtype=object)
    array[:] = items  # element-wise: np.array(items) would make a fixed-width bytes array
    return array.reshape(shape)


def _requested_outputs(
    entries: Any, parameters: dict[str, Any], output_names: list[str]
) -> tuple[list[str] | None, set[str]]:
    default_binary = parameters.get("binary_data_output", False)
    if not isinstance(default_binary, bool):
        raise InvalidRequest("binary_data_output must be true or false", param="parameters")
    if entries is None or entries == []:
        return None, set(output_names) if default_binary else set()
    if not isinstance(entries, list):
        raise InvalidRequest("'outputs' must be a list", param="outputs")
    requested, binary = [], set()
    for index, entry in enumerate(entries):
        name, is_binary = _requested_output(entry, default_binary, output_names, index)
        if name in requested:
            raise InvalidRequest(f"output '{name}' is requested twice", param=f"outputs[{index}]")
        requested.append(name)
        if is_binary:
            binary.add(name)
    return requested, binary


def _requested_output(
    entry: Any, default_binary: bool, output_names: list[str], index: int
) -> tuple[str, bool]:
    param = f"outputs[{index}]"
    entry = _object(entry, param)
    name = entry.get("name")
    if not isinstance(name, str) or name not in output_names:
        known = ", ".join(f"'{known}'" for known in output_names) or "none"
        raise InvalidRequest(f"the model has no output {name!r} (outputs: {known})", param=param)
    parameters = _optional_object(entry.get("parameters"), f"{param}.parameters")
    if "classification" in parameters:
        raise InvalidRequest(f"output '{name}': classification is not supported", param=param)
    if any(key in parameters for key in _SHARED_MEMORY_PARAMETERS):
        raise InvalidRequest(f"output '{name}': shared memory is not supported", param=param)
    is_binary = parameters.get("binary_data", default_binary)
    if not isinstance(is_binary, bool):
        raise InvalidRequest(f"output '{name}': binary_data must be true or false", param=param)
    return name, is_binary


# --- response ------------------------------------------------------------------------------


def _encode_outputs(
    outputs: dict[str, np.ndarray], request: InferRequest, output_specs: list[TensorSpec]
) -> tuple[list[dict[str, Any]], list[bytes]]:
    specs = {spec.name: spec for spec in output_specs}
    entries, blobs = [], []
    for name in request.requested_outputs or list(outputs):
        if name not in outputs:
            raise MaasError(f"the model returned no output '{name}'")
        binary = name in request.binary_outputs
        entry, blob = _encode_output(name, outputs[name], specs.get(name), binary)
        entries.append(entry)
        if blob is not None:
            blobs.append(blob)
    return entries, blobs


def _encode_output(
    name: str, array: np.ndarray, spec: TensorSpec | None, binary: bool
) -> tuple[dict[str, Any], bytes | None]:
    array = np.asarray(array)
    datatype = spec.datatype if spec else numpy_to_v2(array.dtype)
    datatype = "FP32" if datatype == "BF16" else datatype
    entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
    if datatype == "BYTES":
        items = [_as_bytes(item) for item in array.ravel(order="C")]
        if binary:
            raw = b"".join(struct.pack("<I", len(item)) + item for item in items)
            return {**entry, "parameters": {"binary_data_size": len(raw)}}, raw
        return {**entry, "data": _utf8(items, name)}, None
    array = np.ascontiguousarray(array, dtype=_DTYPES[datatype])
    if binary:
        raw = array.tobytes()
        return {**entry, "parameters": {"binary_data_size": len(raw)}}, raw
    return {**entry, "data": array.ravel().tolist()}, None


def _as_bytes(item: Any) -> bytes:
    if isinstance(item, bytes):
        return item
    return str(item).encode()


def _utf8(items: list[bytes], name: str) -> list[str]:
    try:
        return [item.decode() for item in items]
    except UnicodeDecodeError:
        raise InvalidRequest(
            f"output '{name}' holds bytes that are not UTF-8, which JSON cannot carry; "
            "request it with binary_data: true",
            param="outputs",
        ) from None
