"""Untrusted GGUF headers: a corpus of malformed files, each refused fast, in flat memory, leaving
nothing behind; honest files still pass.

The files are built from raw parts below, since no honest writer makes them.
"""

from __future__ import annotations

import resource
import struct
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from gguf import GGUFEndian, GGUFReader, GGUFValueType, GGUFWriter

from maas.api.app import build_app
from maas.auth.bootstrap import ensure_admin_key
from maas.errors import Unavailable, UnsupportedFormat
from maas.registry.demo import DEMO_MODELS, locate
from maas.registry.formats import gguf_file
from maas.registry.formats.gguf_header import (
    MAX_ARRAY_ELEMENTS,
    MAX_KV_PAIRS,
    MAX_NESTED_ARRAYS,
    MAX_TENSORS,
    read_header,
)
from tests.fixtures import files_under, make_gguf

# Without the header check GGUFReader walks a 2^40-element array until memory runs out; the
# timeout stops it (on this thread: keep 2^40 bombs off the HTTP route, whose import runs on a
# worker thread).
pytestmark = pytest.mark.timeout(30)

FAST_SECONDS = 1.0
BOMB_COUNTS = (1 << 40, 10**6)
T = GGUFValueType
F32, Q4_0 = 0, 2


def gguf_string(value: str | bytes, *, length: int | None = None) -> bytes:
    """u64 length, then the bytes; ``length`` makes the prefix lie."""
    data = value.encode() if isinstance(value, str) else value
    return struct.pack("<Q", len(data) if length is None else length) + data


def kv(key: str | bytes, value_type: int, value: bytes) -> bytes:
    return gguf_string(key) + struct.pack("<I", value_type) + value


def array(element_type: int, count: int, elements: bytes = b"") -> bytes:
    """An array value: element type, a count that may lie, then whatever bytes follow."""
    return struct.pack("<IQ", element_type, count) + elements


def tensor_info(
    name: str | bytes,
    dims: tuple[int, ...],
    ggml_type: int = F32,
    offset: int = 0,
    *,
    num_dims: int | None = None,
) -> bytes:
    """``num_dims`` makes the dimension count lie."""
    return (
        gguf_string(name)
        + struct.pack(f"<I{len(dims)}Q", len(dims) if num_dims is None else num_dims, *dims)
        + struct.pack("<IQ", ggml_type, offset)
    )


ARCH = kv("general.architecture", T.STRING, gguf_string("llama"))


def gguf(
    kvs: tuple[bytes, ...] = (ARCH,),
    tensors: tuple[bytes, ...] = (),
    *,
    data: bytes = b"",
    magic: bytes = b"GGUF",
    version: int = 3,
    num_kv: int | None = None,
    num_tensors: int | None = None,
) -> bytes:
    """A GGUF file from raw parts; the counts default to the parts given, or lie."""
    num_kv = len(kvs) if num_kv is None else num_kv
    num_tensors = len(tensors) if num_tensors is None else num_tensors
    header = magic + struct.pack("<IQQ", version, num_tensors, num_kv)
    header += b"".join(kvs) + b"".join(tensors)
    return header + bytes(-len(header) % 32) + data if data else header


def nested_arrays(depth: int) -> bytes:
    value = array(T.UINT8, 0)
    for _ in range(depth - 1):
        value = array(T.ARRAY, 1, value)
    return value


def array_count_bombs():
    for value_type in GGUFValueType:
        for count in BOMB_COUNTS:
            data = gguf((ARCH, kv("bomb", T.ARRAY, array(value_type, count, bytes(16)))))
            yield pytest.param(data, "an array of", id=f"array-of-{count}-{value_type.name}")


def string_bombs():
    for length in (*BOMB_COUNTS, (1 << 64) - 1):
        value = kv("bomb", T.STRING, gguf_string("abc", length=length))
        yield pytest.param(gguf((ARCH, value)), "a string needs", id=f"string-value-{length}")
        key = gguf_string("abc", length=length) + struct.pack("<I", T.UINT8) + b"\0"
        yield pytest.param(gguf((ARCH, key)), "key 1: a string", id=f"key-{length}")
        name = gguf_string("w", length=length) + bytes(28)
        yield pytest.param(gguf(tensors=(name,)), "tensor 0: a string", id=f"name-{length}")
    strings = gguf_string("ok") * 3 + gguf_string("abc", length=1 << 40)
    bomb_inside = kv("tokens", T.ARRAY, array(T.STRING, 5, strings))
    yield pytest.param(gguf((ARCH, bomb_inside)), "element 3: a string", id="string-in-array")


def nesting_bombs():
    yield pytest.param(
        gguf((ARCH, kv("deep", T.ARRAY, nested_arrays(1000)))), "nest deeper", id="depth-1000"
    )
    yield pytest.param(
        gguf((ARCH, kv("deep", T.ARRAY, nested_arrays(3)))), "nest deeper", id="depth-3"
    )
    count = MAX_NESTED_ARRAYS + 1
    many = kv("many", T.ARRAY, array(T.ARRAY, count, array(T.UINT8, 0) * count))
    yield pytest.param(gguf((ARCH, many)), "nested arrays in all", id="too-many-nested")
    inner_bomb = array(T.ARRAY, 2, array(T.UINT8, 0) + array(T.STRING, 1 << 40))
    yield pytest.param(
        gguf((ARCH, kv("k", T.ARRAY, inner_bomb))), "element 1: an array", id="inner"
    )


def limit_bombs():
    """Files that hold every byte they claim, but more than the limits allow."""
    elements = kv(
        "big", T.ARRAY, array(T.UINT8, MAX_ARRAY_ELEMENTS + 1, bytes(MAX_ARRAY_ELEMENTS + 1))
    )
    yield pytest.param(gguf((ARCH, elements)), "array elements in all", id="elements")
    split = kv("a", T.ARRAY, array(T.UINT8, MAX_ARRAY_ELEMENTS, bytes(MAX_ARRAY_ELEMENTS)))
    more = kv("b", T.ARRAY, array(T.INT8, 1, b"\0"))
    yield pytest.param(gguf((ARCH, split, more)), "array elements in all", id="elements-summed")
    yield pytest.param(
        gguf(num_kv=MAX_KV_PAIRS + 1, data=bytes(MAX_KV_PAIRS * 16)), "kv_count", id="kv-pairs"
    )
    yield pytest.param(
        gguf(num_tensors=MAX_TENSORS + 1, data=bytes(MAX_TENSORS * 32)),
        "tensor_count",
        id="tensors",
    )


def count_bombs():
    for count in (*BOMB_COUNTS, (1 << 64) - 1, 1000):
        yield pytest.param(gguf(num_kv=count), "kv_count", id=f"kv_count-{count}")
        yield pytest.param(gguf(num_tensors=count), "tensor_count", id=f"tensor_count-{count}")


def tensor_bombs():
    def one(info: bytes, data: bytes = bytes(64), *kvs: bytes):
        return gguf((ARCH, *kvs), (info,), data=data)

    yield pytest.param(one(tensor_info("w", (4,), offset=64)), "past the end", id="offset-past-end")
    yield pytest.param(one(tensor_info("w", (1 << 40,))), "past the end", id="size-past-end")
    yield pytest.param(one(tensor_info("w", (32,), offset=32)), "past the end", id="straddles-end")
    yield pytest.param(
        one(tensor_info("w", (4,), offset=(1 << 64) - 32)), "past the end", id="offset-2^64"
    )
    yield pytest.param(  # 2^32 * 2^32 wraps to 0 in uint64, which GGUFReader computes in
        one(tensor_info("w", (1 << 32, 1 << 32))), "past the end", id="size-wraps-64-bits"
    )
    yield pytest.param(one(tensor_info("w", (0, (1 << 64) - 1))), "2\\^63-1", id="dim-over-int64")
    yield pytest.param(one(tensor_info("w", (4,), offset=4)), "not a multiple", id="misaligned")
    yield pytest.param(one(tensor_info("w", (1,) * 5)), "5 dimensions", id="five-dims")
    yield pytest.param(
        one(tensor_info("w", (4,), num_dims=(1 << 32) - 1)), "dimensions", id="n_dims-bomb"
    )
    yield pytest.param(one(tensor_info("w", (4,), ggml_type=4)), "not a ggml type", id="type-4")
    yield pytest.param(
        one(tensor_info("w", (4,), ggml_type=1000)), "not a ggml type", id="type-1000"
    )
    yield pytest.param(one(tensor_info("w", (10,), ggml_type=Q4_0)), "block size", id="rows")
    yield pytest.param(one(tensor_info("w", (), ggml_type=Q4_0)), "rows of 1", id="no-dims-Q4_0")
    yield pytest.param(one(tensor_info("w" * 64, (4,))), "longer than 63", id="long-name")
    yield pytest.param(one(tensor_info(b"\xff\xfe", (4,))), "UTF-8", id="name-not-utf8")
    twice = gguf((ARCH,), (tensor_info("w", (4,)), tensor_info("w", (4,))), data=bytes(64))
    yield pytest.param(twice, "appears twice", id="duplicate-tensor")
    alignment = kv("general.alignment", T.UINT32, struct.pack("<I", 1 << 30))
    yield pytest.param(
        one(tensor_info("w", (4,)), bytes(64), alignment), "past the end", id="big-align"
    )


def metadata_bombs():
    yield pytest.param(gguf((ARCH, kv("k", 13, b"\0"))), "not a GGUF value type", id="type-13")
    yield pytest.param(gguf((ARCH, kv("k", 1 << 31, b""))), "not a GGUF value type", id="type-2^31")
    yield pytest.param(
        gguf((ARCH, kv("k", T.ARRAY, array(99, 0)))), "not a GGUF value type", id="element-type"
    )
    yield pytest.param(gguf((ARCH, ARCH)), "appears twice", id="duplicate-key")
    yield pytest.param(gguf((ARCH, kv(b"\xc3(", T.UINT8, b"\0"))), "UTF-8", id="key-not-utf8")
    yield pytest.param(
        gguf((ARCH, kv("k", T.STRING, gguf_string(b"\xed\xa0\x80")))), "UTF-8", id="value-not-utf8"
    )
    yield pytest.param(
        gguf((ARCH, kv("k" * (1 << 16), T.UINT8, b"\0"))), "longer than 65535", id="long-key"
    )
    for value_type, value in ((T.UINT32, 0), (T.UINT32, 48), (T.UINT64, 32)):
        packed = struct.pack("<Q" if value_type == T.UINT64 else "<I", value)
        alignment = kv("general.alignment", value_type, packed)
        yield pytest.param(gguf((ARCH, alignment)), "alignment", id=f"alignment-{value}")


def preamble_bombs():
    yield pytest.param(b"", "fewer than", id="empty")
    yield pytest.param(gguf()[:23], "fewer than", id="23-bytes")
    yield pytest.param(gguf(magic=b"GGUG"), "magic", id="magic")
    yield pytest.param(b"\x00" * 64, "magic", id="zeros")
    for version in (1, 4, 0xFFFF, 1 << 16):
        yield pytest.param(gguf(version=version), "version", id=f"version-{version}")


CORPUS = [
    *array_count_bombs(),
    *string_bombs(),
    *nesting_bombs(),
    *limit_bombs(),
    *count_bombs(),
    *tensor_bombs(),
    *metadata_bombs(),
    *preamble_bombs(),
]


def import_refused(registry, path: Path, reason: str) -> float:
    """Import ``path``, expect UnsupportedFormat naming ``reason``; return the seconds it took."""
    start = time.perf_counter()
    with pytest.raises(
        UnsupportedFormat, match=f"{path.name} is not a valid GGUF file: .*{reason}"
    ):
        registry.import_model(path, "bomb")
    elapsed = time.perf_counter() - start
    assert registry.list_models() == []
    assert files_under(registry.store.root) == {".staging"}
    return elapsed


@pytest.mark.parametrize(("data", "reason"), CORPUS)
def test_malformed_gguf_is_refused_fast_and_leaves_nothing(registry, tmp_path, data, reason):
    path = tmp_path / "bomb.gguf"
    path.write_bytes(data)
    assert import_refused(registry, path, reason) < FAST_SECONDS


@pytest.mark.parametrize("element_type", [T.UINT8, T.STRING, T.ARRAY])
def test_a_2_pow_40_array_keeps_memory_flat(registry, tmp_path, element_type):
    path = tmp_path / "bomb.gguf"
    path.write_bytes(gguf((ARCH, kv("bomb", T.ARRAY, array(element_type, 1 << 40, bytes(64))))))
    tracemalloc.start()
    try:
        with pytest.raises(UnsupportedFormat):
            gguf_file.inspect(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024**2
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    import_refused(registry, path, "an array of 1099511627776")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 64 * 1024  # KiB


def valid_bytes_and_end(folder: Path) -> tuple[bytes, int]:
    """A valid file and where its last tensor ends: past that, only padding may be cut."""
    path = make_gguf(folder / "valid.gguf")
    header = read_header(path)
    end = max(header.data_offset + t.offset + t.num_bytes for t in header.tensors)
    return path.read_bytes(), end


def test_every_truncation_of_a_valid_file_is_refused(tmp_path):
    valid, end = valid_bytes_and_end(tmp_path)
    cut = tmp_path / "cut.gguf"
    for length in range(end):
        cut.write_bytes(valid[:length])
        with pytest.raises(UnsupportedFormat, match="not a valid GGUF file"):
            gguf_file.inspect(cut)


@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.03, 0.1, 0.25, 0.5, 0.75, 0.87, 0.95, 0.999])
def test_a_truncated_file_is_refused_on_import(registry, tmp_path, fraction):
    valid, end = valid_bytes_and_end(tmp_path / "src")
    path = tmp_path / "cut.gguf"
    path.write_bytes(valid[: int(end * fraction)])
    assert import_refused(registry, path, "") < FAST_SECONDS


def test_honest_files_pass(registry, tmp_path):
    source = make_gguf(tmp_path / "tiny.gguf")
    agrees_with_gguf_reader(source)
    assert registry.import_model(source, "tiny").version == 1


def test_honest_limits_and_layouts_pass(tmp_path):
    vocabulary = array(T.STRING, 50_000, gguf_string("tok") * 50_000)
    num_scores = MAX_ARRAY_ELEMENTS - 50_000 - 2  # with the pairs below: exactly the limit
    scores = array(T.FLOAT32, num_scores, bytes(4 * num_scores))
    pairs = array(T.ARRAY, 2, array(T.UINT8, 0) * 2)
    alignment = kv("general.alignment", T.UINT32, struct.pack("<I", 64))
    kvs = (ARCH, kv("tokens", T.ARRAY, vocabulary), kv("scores", T.ARRAY, scores))
    kvs += (kv("pairs", T.ARRAY, pairs), alignment)
    path = tmp_path / "big.gguf"
    path.write_bytes(gguf(kvs, (tensor_info("w", (32, 2), Q4_0),), data=bytes(128)))
    start = time.perf_counter()
    header = read_header(path)
    assert time.perf_counter() - start < FAST_SECONDS
    assert (header.alignment, header.tensors[0].num_bytes) == (64, 2 * 18)
    assert header.data_offset % 64 == 0


def test_big_endian_files_pass(tmp_path):
    path = tmp_path / "big-endian.gguf"
    writer = GGUFWriter(str(path), "llama", endianess=GGUFEndian.BIG)
    writer.add_token_list(["a", "b"])
    writer.add_tensor("w", np.ones(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    agrees_with_gguf_reader(path)


def test_the_demo_model_passes():
    demo = next(m for m in DEMO_MODELS if m.path.endswith(".gguf"))
    try:
        path = locate(demo)
    except Unavailable:
        pytest.skip(f"{demo.package} is not installed")
    agrees_with_gguf_reader(path)


def agrees_with_gguf_reader(path: Path) -> None:
    header = read_header(path)
    reader = GGUFReader(path)
    assert header.data_offset == reader.data_offset
    ours = [(t.name, t.num_bytes, header.data_offset + t.offset) for t in header.tensors]
    assert ours == [(t.name, t.n_bytes, t.data_offset) for t in reader.tensors]
    spans = {  # a field is its key's length and bytes, then its value's type and value
        f.name: (f.offset + 8 + len(f.name.encode()), f.offset + sum(p.nbytes for p in f.parts))
        for f in reader.fields.values()
        if not f.name.startswith("GGUF.")  # the reader's names for the header's counts
    }
    assert header.value_spans == spans


def test_upload_of_a_bomb_answers_400(settings):
    # 10^6, not 2^40: the import runs on a worker thread, which no test timeout can stop
    bomb = gguf((ARCH, kv("bomb", T.ARRAY, array(T.UINT8, 10**6))))
    with TestClient(build_app(settings)) as client:
        client.headers["Authorization"] = (
            f"Bearer {ensure_admin_key(settings, client.app.state.keys)}"
        )
        start = time.perf_counter()
        response = client.post("/api/v1/models/bomb/versions/upload?filename=x.gguf", content=bomb)
        assert time.perf_counter() - start < FAST_SECONDS
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert (error["type"], error["code"]) == ("invalid_request_error", "unsupported_format")
        assert error["message"].startswith("x.gguf is not a valid GGUF file: 'bomb': an array of")
        assert client.get("/api/v1/models").json()["count"] == 0
        assert list(client.app.state.registry.store.staging_root.iterdir()) == []
