"""The v2 codec against the real tritonclient: what it sends we read, what we send it reads."""

from __future__ import annotations

import contextlib
import json
import struct

import numpy as np
import pytest
from tritonclient.http import InferInput, InferRequestedOutput, InferResult
from tritonclient.http._utils import _get_inference_request
from tritonclient.utils import np_to_triton_dtype, triton_to_np_dtype

from maas.api.v2_codec import (
    HEADER_LENGTH,
    InferRequest,
    encode_response,
    numpy_to_v2,
    parse_request,
    v2_to_numpy,
)
from maas.errors import InvalidRequest, MaasError
from maas.registry.manifest import TensorSpec

NUMERIC = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64"]
NUMERIC += ["FP16", "FP32", "FP64"]
TEXTS = np.array([[b"", "héllo ✓".encode()], [b"plain", "日本".encode()]], dtype=object)


def spec(name: str, datatype: str, shape: list[int]) -> TensorSpec:
    return TensorSpec(name=name, datatype=datatype, shape=shape)


def client_request(
    arrays: dict[str, np.ndarray],
    binary: bool | dict[str, bool] = True,
    outputs: list[InferRequestedOutput] | None = None,
    request_id: str = "",
) -> tuple[bytes, str | None]:
    """(body, Inference-Header-Content-Length) exactly as tritonclient.http builds them."""
    inputs = []
    for name, array in arrays.items():
        tensor = InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        as_binary = binary if isinstance(binary, bool) else binary[name]
        inputs.append(tensor.set_data_from_numpy(array, binary_data=as_binary))
    body, json_size = _get_inference_request(
        inputs=inputs,
        request_id=request_id,
        outputs=outputs,
        sequence_id=0,
        sequence_start=False,
        sequence_end=False,
        priority=0,
        timeout=None,
        custom_parameters=None,
    )
    return body, None if json_size is None else str(json_size)


def specs_for(arrays: dict[str, np.ndarray]) -> list[TensorSpec]:
    return [spec(n, np_to_triton_dtype(a.dtype), [-1] * a.ndim) for n, a in arrays.items()]


def assert_same(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape
    assert actual.dtype == expected.dtype
    assert actual.tolist() == expected.tolist()


def sample(datatype: str, shape: tuple[int, ...] = (2, 3)) -> np.ndarray:
    values = np.arange(np.prod(shape)).reshape(shape)
    dtype = triton_to_np_dtype(datatype)
    return (values % 2).astype(bool) if datatype == "BOOL" else (values * 3 - 1).astype(dtype)


# --- datatypes -----------------------------------------------------------------------------


@pytest.mark.parametrize("datatype", [*NUMERIC, "BYTES"])
def test_datatypes_agree_with_tritonclient(datatype):
    assert v2_to_numpy(datatype) == np.dtype(triton_to_np_dtype(datatype))
    assert numpy_to_v2(v2_to_numpy(datatype)) == datatype


def test_bf16_and_unknown_have_no_numpy_dtype():
    assert v2_to_numpy("BF16") is None
    assert v2_to_numpy("FLOAT") is None


def test_numpy_to_v2_reads_strings_and_big_endian():
    assert numpy_to_v2(np.dtype("<U5")) == "BYTES"
    assert numpy_to_v2(np.dtype("S3")) == "BYTES"
    assert numpy_to_v2(np.dtype(">f4")) == "FP32"
    with pytest.raises(ValueError, match="complex"):
        numpy_to_v2(np.dtype(np.complex64))


# --- requests from tritonclient ------------------------------------------------------------


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("datatype", NUMERIC)
def test_parses_tritonclient_numeric_inputs(datatype, binary):
    arrays = {"x": sample(datatype, (2, 3)), "y": sample(datatype, (2, 2, 2))}
    request = parse_request(*client_request(arrays, binary), specs_for(arrays), [])
    for name, array in arrays.items():
        assert_same(request.inputs[name], array)
        assert request.inputs[name].flags.writeable


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_parses_tritonclient_bytes_with_empty_and_non_ascii(binary):
    arrays = {"text": TEXTS}
    request = parse_request(*client_request(arrays, binary), specs_for(arrays), [])
    assert_same(request.inputs["text"], TEXTS)
    assert all(type(item) is bytes for item in request.inputs["text"].ravel())


def test_parses_tritonclient_binary_bytes_that_are_not_utf8():
    arrays = {"blob": np.array([b"\x00\xff\xfe", b"\x80"], dtype=object)}
    request = parse_request(*client_request(arrays), specs_for(arrays), [])
    assert_same(request.inputs["blob"], arrays["blob"])


def test_parses_mixed_binary_and_json_inputs_in_order():
    arrays = {"a": sample("FP32"), "b": sample("INT64"), "c": TEXTS, "d": sample("UINT8")}
    binary = {"a": True, "b": False, "c": True, "d": True}
    request = parse_request(*client_request(arrays, binary), specs_for(arrays), [])
    for name, array in arrays.items():
        assert_same(request.inputs[name], array)


def test_parses_scalar_and_empty_tensors():
    arrays = {"scalar": np.array(2.5, dtype=np.float32), "empty": np.zeros((0, 4), np.int32)}
    for binary in (True, False):
        request = parse_request(*client_request(arrays, binary), specs_for(arrays), [])
        assert_same(request.inputs["scalar"], arrays["scalar"])
        assert_same(request.inputs["empty"], arrays["empty"])


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_integer_extremes_survive_both_ways(binary):
    arrays = {
        "i": np.array([np.iinfo(np.int64).min, np.iinfo(np.int64).max]),
        "u": np.array([0, np.iinfo(np.uint64).max], dtype=np.uint64),
    }
    request = parse_request(*client_request(arrays, binary), specs_for(arrays), list(arrays))
    for name, array in arrays.items():
        assert_same(request.inputs[name], array)
    outputs = {"i": arrays["i"], "u": arrays["u"].astype(">u8")}  # big-endian from a runtime
    request = InferRequest(None, {}, None, set(arrays) if binary else set())
    body, headers = encode_response("m", "1", outputs, request, specs_for(arrays))
    result = InferResult.from_response_body(body, False, header_length=headers.get(HEADER_LENGTH))
    for name, array in arrays.items():
        assert_same(result.as_numpy(name), array)


def test_fixed_dimensions_in_the_spec_accept_matching_shapes():
    arrays = {"x": sample("FP32", (5, 3))}
    specs = [spec("x", "FP32", [-1, 3])]
    assert parse_request(*client_request(arrays), specs, []).inputs["x"].shape == (5, 3)


def test_bf16_model_takes_fp32():
    arrays = {"x": sample("FP32")}
    request = parse_request(*client_request(arrays), [spec("x", "BF16", [-1, -1])], [])
    assert_same(request.inputs["x"], arrays["x"])


def test_id_and_requested_outputs():
    outputs = [InferRequestedOutput("b", binary_data=False), InferRequestedOutput("a")]
    body, header = client_request({"x": sample("FP32")}, outputs=outputs, request_id="r-1")
    request = parse_request(body, header, [spec("x", "FP32", [2, 3])], ["a", "b", "c"])
    assert request.id == "r-1"
    assert request.requested_outputs == ["b", "a"]
    assert request.binary_outputs == {"a"}


def test_no_requested_outputs_means_all_binary_as_tritonclient_asks():
    body, header = client_request({"x": sample("FP32")})
    request = parse_request(body, header, [spec("x", "FP32", [2, 3])], ["a", "b"])
    assert request.requested_outputs is None
    assert request.binary_outputs == {"a", "b"}
    assert request.parameters == {"binary_data_output": True}


def test_binary_data_output_is_the_default_for_requested_outputs():
    doc = {
        "inputs": [],
        "parameters": {"binary_data_output": True},
        "outputs": [{"name": "a"}, {"name": "b", "parameters": {"binary_data": False}}],
    }
    request = parse_request(json.dumps(doc).encode(), None, [], ["a", "b"])
    assert request.binary_outputs == {"a"}


def test_plain_json_without_outputs_gets_json():
    doc = {"inputs": [{"name": "x", "shape": [2], "datatype": "INT32", "data": [1, 2]}]}
    request = parse_request(json.dumps(doc).encode(), None, [spec("x", "INT32", [2])], ["y"])
    assert request.binary_outputs == set()


def test_nested_json_data_is_read_row_major():
    doc = {
        "inputs": [
            {"name": "x", "shape": [2, 2], "datatype": "FP64", "data": [[1, 2.5], [3, 4]]},
            {"name": "s", "shape": [1, 2], "datatype": "BYTES", "data": [["a", "ü"]]},
        ]
    }
    specs = [spec("x", "FP64", [2, 2]), spec("s", "BYTES", [-1, 2])]
    request = parse_request(json.dumps(doc).encode(), None, specs, [])
    assert request.inputs["x"].tolist() == [[1.0, 2.5], [3.0, 4.0]]
    assert request.inputs["s"].tolist() == [[b"a", "ü".encode()]]


def test_json_nan_and_infinity_are_floats():
    doc = '{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [NaN, -Infinity]}]}'
    request = parse_request(doc.encode(), None, [spec("x", "FP32", [2])], [])
    assert np.isnan(request.inputs["x"][0]) and request.inputs["x"][1] == -np.inf


# --- request errors ------------------------------------------------------------------------

X = spec("x", "FP32", [-1, 2])


def entry(data=None, *, name="x", shape=(1, 2), datatype="FP32", **extra) -> dict:
    item = {"name": name, "shape": list(shape), "datatype": datatype, **extra}
    if data is not None:
        item["data"] = data
    return item


def binary_entry(size: int, **extra) -> dict:
    return entry(parameters={"binary_data_size": size}, **extra)


def bytes_blob(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


# (inputs, binary part or None for no header, spec of x, words the message must hold)
INPUT_ERRORS = {
    "unknown name": ([entry([1, 2], name="y")], None, X, "no input 'y'"),
    "missing": ([], None, X, "missing input 'x'"),
    "duplicate": ([entry([1, 2]), entry([1, 2])], None, X, "'x' is given twice"),
    "datatype": (
        [entry([1, 2], datatype="INT32")],
        None,
        X,
        "input 'x' has datatype INT32; the model expects FP32",
    ),
    "bf16": ([binary_entry(4, datatype="BF16")], b"\0" * 4, X, "BF16 is not supported"),
    "unknown datatype": ([entry([1, 2], datatype="FLOAT")], None, X, "'x' has unknown datatype"),
    "rank": ([entry([1, 2], shape=[2])], None, X, "'x' has shape [2]; the model expects [-1, 2]"),
    "fixed dim": ([entry([1, 2, 3], shape=[1, 3])], None, X, "'x' has shape [1, 3]"),
    "negative dim": ([entry([1, 2], shape=[-1, 2])], None, X, "'x': shape must be"),
    "string dim": ([entry([1, 2], shape=["1", 2])], None, X, "'x': shape must be"),
    "bool dim": ([entry([1, 2], shape=[True, 2])], None, X, "'x': shape must be"),
    "shape missing": ([{"name": "x", "datatype": "FP32", "data": [1]}], None, X, "'x': shape"),
    "too few": ([entry([1, 2, 3], shape=[2, 2])], None, X, "'x' has shape [2, 2] (4 elements)"),
    "nested shape": ([entry([[1, 2], [3]], shape=[2, 2])], None, X, "'x': nested 'data'"),
    "nested deeper": (
        [entry([[[1], [2]]], shape=[1, 2])],
        None,
        X,
        "'x': nested 'data' is deeper",
    ),
    "data not list": ([entry(5)], None, X, "'x': 'data' must be a list"),
    "no data": ([entry()], None, X, "'x' has no 'data'"),
    "string for FP32": ([entry(["a", 1])], None, X, "input 'x' element 0 is \"a\"; FP32 needs"),
    "bool for FP32": ([entry([1, True])], None, X, "'x' element 1 is true"),
    "FP32 overflow": ([entry([1, 1e39])], None, X, "'x' element 1 is 1e+39"),
    "FP16 overflow": (
        [entry([70000], shape=[1], datatype="FP16")],
        None,
        spec("x", "FP16", [1]),
        "'x' element 0 is 70000; FP16 needs numbers within",
    ),
    "300 for UINT8": (
        [entry([300], shape=[1], datatype="UINT8")],
        None,
        spec("x", "UINT8", [1]),
        "'x' element 0 is 300; UINT8 needs integers from 0 to 255",
    ),
    "-1 for UINT64": (
        [entry([-1], shape=[1], datatype="UINT64")],
        None,
        spec("x", "UINT64", [1]),
        "'x' element 0 is -1",
    ),
    "float for INT64": (
        [entry([1.5], shape=[1], datatype="INT64")],
        None,
        spec("x", "INT64", [1]),
        "'x' element 0 is 1.5; INT64 needs integers",
    ),
    "1 for BOOL": (
        [entry([1], shape=[1], datatype="BOOL")],
        None,
        spec("x", "BOOL", [1]),
        "'x' element 0 is 1; BOOL needs true or false",
    ),
    "0 for BYTES": (
        [entry(["a", 0], shape=[2], datatype="BYTES")],
        None,
        spec("x", "BYTES", [2]),
        "'x' element 1 is 0; BYTES needs strings",
    ),
    "binary size": ([binary_entry(4)], b"\0" * 4, X, "which is 8 bytes, but binary_data_size is 4"),
    "binary beyond body": ([binary_entry(8)], b"\0" * 4, X, "'x' has binary_data_size 8 but only"),
    "binary without header": ([binary_entry(8)], None, X, "needs the Inference-Header"),
    "binary size negative": ([binary_entry(-8)], b"", X, "'x': binary_data_size must be"),
    "binary size string": ([binary_entry("8")], b"\0" * 8, X, "'x': binary_data_size must be"),
    "data and binary": (
        [entry([1, 2], parameters={"binary_data_size": 8})],
        b"\0" * 8,
        X,
        "'x' has both 'data' and binary_data_size",
    ),
    "binary BOOL 2": (
        [binary_entry(2, datatype="BOOL")],
        b"\x01\x02",
        spec("x", "BOOL", [1, 2]),
        "'x': BOOL bytes must be 0 or 1",
    ),
    "BYTES cut in length": (
        [binary_entry(6, datatype="BYTES")],
        bytes_blob(b"a") + b"\x01",
        spec("x", "BYTES", [1, 2]),
        "'x': BYTES data ends inside a length",
    ),
    "BYTES cut in element": (
        [binary_entry(10, datatype="BYTES")],
        bytes_blob(b"a") + struct.pack("<I", 9) + b"x",
        spec("x", "BYTES", [1, 2]),
        "'x': BYTES data ends inside an element",
    ),
    "BYTES count": (
        [binary_entry(5, datatype="BYTES")],
        bytes_blob(b"a"),
        spec("x", "BYTES", [1, 2]),
        "'x' has shape [1, 2] (2 elements) but its binary data holds 1",
    ),
    "shared memory": (
        [entry([1, 2], parameters={"shared_memory_region": "r"})],
        None,
        X,
        "'x': shared memory is not supported",
    ),
}


@pytest.mark.parametrize(
    ("inputs", "blob", "x_spec", "words"), INPUT_ERRORS.values(), ids=list(INPUT_ERRORS)
)
def test_input_errors_name_the_input(inputs, blob, x_spec, words):
    header = json.dumps({"inputs": inputs}).encode()
    body = header + (blob or b"")
    header_length = None if blob is None else str(len(header))
    with pytest.raises(InvalidRequest) as caught:
        parse_request(body, header_length, [x_spec], ["y"])
    assert words in caught.value.message
    assert caught.value.param is not None


def test_error_param_points_at_the_field():
    doc = {"inputs": [entry([1, 2]), entry([1, 2], name="s", datatype="INT32")]}
    specs = [X, spec("s", "FP32", [1, 2])]
    with pytest.raises(InvalidRequest) as caught:
        parse_request(json.dumps(doc).encode(), None, specs, [])
    assert caught.value.param == "inputs[1].datatype"


OK_INPUT = {"inputs": [entry([1, 2])]}
BODY_ERRORS = {
    "invalid json": (b'{"inputs": [', None, "not valid JSON"),
    "not utf-8": (b'{"id": "\xff"}', None, "not valid JSON"),
    "lone surrogate": (
        json.dumps({"inputs": [entry(["\ud800"], shape=[1], datatype="BYTES")]}).encode(),
        None,
        "half of a surrogate pair",
    ),
    "deep nesting": (b"[" * 100_000, None, "not valid JSON"),
    "not an object": (b"[]", None, "'request' must be a JSON object"),
    "no inputs": (b"{}", None, "needs an 'inputs' list"),
    "input not object": (b'{"inputs": [3]}', None, "'inputs[0]' must be a JSON object"),
    "input without name": (b'{"inputs": [{}]}', None, "inputs[0] needs a string 'name'"),
    "id not string": (json.dumps({**OK_INPUT, "id": 5}).encode(), None, "'id' must be a string"),
    "parameters": (json.dumps({**OK_INPUT, "parameters": []}).encode(), None, "'parameters'"),
    "header not a number": (b"{}", "abc", "must be a number of bytes, not 'abc'"),
    "header negative": (b"{}", "-1", "must be a number of bytes"),
    "header unicode digit": (b"{}", "²", "must be a number of bytes"),
    "header too large": (b"{}", "3", "is 3 but the body has only 2 bytes"),
    "trailing bytes": (
        json.dumps(OK_INPUT).encode() + b"xyz",
        str(len(json.dumps(OK_INPUT))),
        "3 bytes of binary data that no input",
    ),
}


@pytest.mark.parametrize(
    ("body", "header_length", "words"), BODY_ERRORS.values(), ids=list(BODY_ERRORS)
)
def test_body_errors(body, header_length, words):
    with pytest.raises(InvalidRequest) as caught:
        parse_request(body, header_length, [X], ["y"])
    assert words in caught.value.message


OUTPUT_ERRORS = {
    "unknown": ([{"name": "z"}], {}, "no output 'z' (outputs: 'y', 'w')"),
    "no name": ([{}], {}, "no output None"),
    "twice": ([{"name": "y"}, {"name": "y"}], {}, "output 'y' is requested twice"),
    "classification": (
        [{"name": "y", "parameters": {"classification": 3}}],
        {},
        "'y': classification is not supported",
    ),
    "binary_data": (
        [{"name": "y", "parameters": {"binary_data": "yes"}}],
        {},
        "'y': binary_data must be true or false",
    ),
    "binary_data_output": ([], {"binary_data_output": 1}, "binary_data_output must be"),
    "outputs not list": ({"name": "y"}, {}, "'outputs' must be a list"),
}


@pytest.mark.parametrize(
    ("outputs", "parameters", "words"), OUTPUT_ERRORS.values(), ids=list(OUTPUT_ERRORS)
)
def test_requested_output_errors(outputs, parameters, words):
    doc = {**OK_INPUT, "outputs": outputs, "parameters": parameters}
    with pytest.raises(InvalidRequest) as caught:
        parse_request(json.dumps(doc).encode(), None, [X], ["y", "w"])
    assert words in caught.value.message


def test_damaged_bodies_raise_only_invalid_request():
    arrays = {"a": sample("FP32"), "t": TEXTS, "b": sample("BOOL", (4,))}
    body, header = client_request(arrays, {"a": True, "t": True, "b": False})
    specs = specs_for(arrays)
    rng = np.random.default_rng(0)
    for _ in range(300):
        damaged = bytearray(body)
        if rng.random() < 0.5:
            damaged = damaged[: rng.integers(len(body))]
        else:
            damaged[rng.integers(len(body))] = int(rng.integers(256))
        with contextlib.suppress(InvalidRequest):
            parse_request(bytes(damaged), header, specs, [])


# --- responses read by tritonclient --------------------------------------------------------

OUTPUTS = {
    "probs": np.array([[0.1, 0.9], [0.7, 0.3]]),  # float64 from the runtime, FP32 in the spec
    "ids": np.array([3, 1], dtype=np.int64),
    "mask": np.array([True, False, True]),
    "half": np.array([1.5, -2.0], dtype=np.float16),
    "labels": TEXTS,
    "names": np.array(["cat", "çà"]),  # a str array
}
OUTPUT_SPECS = [
    spec("probs", "FP32", [-1, 2]),
    spec("ids", "INT64", [-1]),
    spec("mask", "BOOL", [-1]),
    spec("half", "FP16", [-1]),
    spec("labels", "BYTES", [-1, -1]),
    spec("names", "BYTES", [-1]),
]


def respond(requested: list[InferRequestedOutput] | None, request_id: str = "") -> InferResult:
    body, header = client_request({"x": sample("FP32")}, outputs=requested, request_id=request_id)
    request = parse_request(body, header, [spec("x", "FP32", [2, 3])], list(OUTPUTS))
    body, headers = encode_response("m", "3", OUTPUTS, request, OUTPUT_SPECS)
    return InferResult.from_response_body(body, False, header_length=headers.get(HEADER_LENGTH))


def expected(name: str, *, binary: bool) -> np.ndarray:
    array = OUTPUTS[name]
    if name == "probs":
        return array.astype(np.float32)
    if name in ("labels", "names"):
        items = [item if isinstance(item, bytes) else str(item).encode() for item in array.ravel()]
        texts = items if binary else [item.decode() for item in items]
        return np.array(texts, dtype=object).reshape(array.shape)
    return array


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_reads_all_outputs(binary):
    result = respond([InferRequestedOutput(name, binary_data=binary) for name in OUTPUTS])
    for name in OUTPUTS:
        assert_same(result.as_numpy(name), expected(name, binary=binary))


def test_tritonclient_reads_all_outputs_binary_when_none_requested():
    result = respond(None, request_id="abc")
    response = result.get_response()
    assert response["model_name"] == "m" and response["model_version"] == "3"
    assert response["id"] == "abc"
    assert [output["name"] for output in response["outputs"]] == list(OUTPUTS)
    for name in OUTPUTS:
        assert_same(result.as_numpy(name), expected(name, binary=True))


def test_subset_of_outputs_in_request_order_mixing_binary_and_json():
    requested = [InferRequestedOutput("labels"), InferRequestedOutput("ids", binary_data=False)]
    result = respond(requested)
    assert [output["name"] for output in result.get_response()["outputs"]] == ["labels", "ids"]
    assert "data" in result.get_output("ids")
    assert_same(result.as_numpy("labels"), expected("labels", binary=True))
    assert_same(result.as_numpy("ids"), expected("ids", binary=False))


def test_headers_say_how_the_body_is_framed():
    arrays = {"x": sample("FP32")}
    specs = [spec("x", "FP32", [2, 3])]
    for binary, content_type in ((True, "application/octet-stream"), (False, "application/json")):
        outputs = [InferRequestedOutput("ids", binary_data=binary)]
        request = parse_request(*client_request(arrays, outputs=outputs), specs, ["ids"])
        body, headers = encode_response("m", "1", OUTPUTS, request, OUTPUT_SPECS)
        assert headers["Content-Type"] == content_type
        if binary:
            assert json.loads(body[: int(headers[HEADER_LENGTH])])["outputs"][0]["name"] == "ids"
        else:
            assert HEADER_LENGTH not in headers
            assert json.loads(body)["outputs"][0]["data"] == [3, 1]


def plain_request(binary_outputs: set[str]) -> InferRequest:
    return InferRequest(id=None, inputs={}, requested_outputs=None, binary_outputs=binary_outputs)


def test_bf16_output_is_sent_as_fp32():
    outputs = {"y": np.array([1.25, 2.5], dtype=np.float32)}
    body, _ = encode_response("m", "1", outputs, plain_request(set()), [spec("y", "BF16", [-1])])
    assert json.loads(body)["outputs"] == [
        {"name": "y", "datatype": "FP32", "shape": [2], "data": [1.25, 2.5]}
    ]


def test_output_without_spec_takes_its_numpy_datatype():
    body, _ = encode_response("m", "1", {"y": np.zeros(1, np.uint16)}, plain_request(set()), [])
    assert json.loads(body)["outputs"][0]["datatype"] == "UINT16"


def test_non_utf8_bytes_output_must_be_requested_binary():
    outputs = {"y": np.array([b"\xff"], dtype=object)}
    specs = [spec("y", "BYTES", [-1])]
    with pytest.raises(InvalidRequest, match="output 'y'.*binary_data: true"):
        encode_response("m", "1", outputs, plain_request(set()), specs)
    body, headers = encode_response("m", "1", outputs, plain_request({"y"}), specs)
    result = InferResult.from_response_body(body, False, header_length=headers[HEADER_LENGTH])
    assert result.as_numpy("y").tolist() == [b"\xff"]


def test_missing_model_output_is_a_server_error():
    request = InferRequest(id=None, inputs={}, requested_outputs=["y"], binary_outputs=set())
    with pytest.raises(MaasError, match="no output 'y'") as caught:
        encode_response("m", "1", {}, request, [])
    assert not isinstance(caught.value, InvalidRequest)
