"""``gguf_file.inspect`` reads what the header walk kept, not ``gguf.GGUFReader``: on honest files
it must give exactly what the GGUFReader-based inspect gave (kept below as the reference), and
what the walk keeps stays bounded."""

from __future__ import annotations

import time
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFEndian, GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import quantize

from maas.errors import Unavailable, UnsupportedFormat
from maas.registry.demo import DEMO_MODELS, locate
from maas.registry.formats import gguf_file
from maas.registry.formats.gguf_header import (
    MAX_KEPT_ARRAY,
    MAX_KEPT_ELEMENTS,
    MAX_STRING_BYTES,
    LongArray,
    read_header,
)
from maas.registry.formats.info import LLAMA_FAMILY, FormatInfo, generation_tasks
from tests.fixtures import make_gguf

pytestmark = pytest.mark.timeout(60)

T = GGUFValueType
Q = GGMLQuantizationType


def reader_inspect(path: Path) -> FormatInfo:
    """The inspect of before, on ``gguf.GGUFReader``: the reference for honest files."""
    reader = GGUFReader(path)
    metadata: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in gguf_file.SKIPPED_ARRAYS:
            continue
        value = field.contents()
        if field.types and field.types[0] == T.ARRAY and len(field.data) > 64:
            value = {"array_length": len(field.data)}
        metadata[key] = reader_plain(value)
    architecture = metadata["general.architecture"]
    chat_template = metadata.pop("tokenizer.chat_template", None)
    default_task, tasks = generation_tasks(chat_template)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    metadata["tensor_types"] = dict(Counter(t.tensor_type.name for t in reader.tensors))
    metadata["tensor_count"] = len(reader.tensors)
    if isinstance(metadata.get("general.file_type"), int):
        metadata["file_type_name"] = gguf_file._file_type_name(metadata["general.file_type"])
    context_length = metadata.get(f"{architecture}.context_length")
    return FormatInfo(
        format="gguf",
        runtime="llm" if architecture in LLAMA_FAMILY else "transformers",
        default_task=default_task,
        tasks=tasks,
        architecture=architecture,
        config=metadata,
        tokenizer={
            "kind": "gguf",
            "file": path.name,
            "model": metadata.get("tokenizer.ggml.model"),
            "vocab_size": len(tokens.data) if tokens is not None else None,
            "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
        },
        chat_template=chat_template if isinstance(chat_template, str) else None,
        context_length=context_length if isinstance(context_length, int) else None,
        weight_files=[path.name],
    )


def reader_plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, list):
        return [reader_plain(item) for item in value]
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    return value


def write(path: Path, writer_setup, *, endianess: GGUFEndian = GGUFEndian.LITTLE) -> Path:
    writer = GGUFWriter(str(path), "llama", endianess=endianess)
    writer_setup(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def every_kind_of_value(writer: GGUFWriter) -> None:
    """Each scalar type, arrays on both sides of the kept length, strings not in ASCII, an
    alignment, several tensor types: what real files carry, in one file."""
    scalars = {
        T.UINT8: 255, T.INT8: -128, T.UINT16: 65535, T.INT16: -32768, T.UINT32: 2**32 - 1,
        T.INT32: -(2**31), T.UINT64: 2**64 - 1, T.INT64: -(2**63), T.FLOAT32: 1e-5,
        T.FLOAT64: 0.1, T.BOOL: True, T.STRING: "Größe 日本語 🙂",
    }  # fmt: skip
    for value_type, value in scalars.items():
        writer.add_key_value(f"test.{value_type.name.lower()}", value, value_type)
    for length in (1, MAX_KEPT_ARRAY, MAX_KEPT_ARRAY + 1, 1000):
        writer.add_key_value(f"test.ints_{length}", list(range(length)), T.ARRAY, T.INT32)
        words = [f"w{i}é" for i in range(length)]
        writer.add_key_value(f"test.words_{length}", words, T.ARRAY, T.STRING)
    writer.add_key_value("test.floats", [0.1, 1e30, -2.5], T.ARRAY, T.FLOAT32)
    writer.add_key_value("test.bools", [True, False, True], T.ARRAY, T.BOOL)
    writer.add_key_value("test.u64s", [2**64 - 1, 0], T.ARRAY, T.UINT64)
    writer.add_custom_alignment(64)
    writer.add_file_type(7)
    writer.add_context_length(4096)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([f"t{i}" for i in range(300)])
    writer.add_token_scores([float(i) for i in range(300)])
    writer.add_token_types([1] * 300)
    writer.add_chat_template("{{ messages }} ✓" * 1000)
    weights = np.linspace(-1, 1, 64 * 4, dtype=np.float32).reshape(4, 64)
    writer.add_tensor("a", weights)
    writer.add_tensor("b", weights.astype(np.float16))
    writer.add_tensor("c", quantize(weights, Q.Q8_0), raw_dtype=Q.Q8_0)
    writer.add_tensor("d", quantize(weights, Q.Q4_0), raw_dtype=Q.Q4_0)


def honest_files(folder: Path) -> list[Path]:
    return [
        make_gguf(folder / "tiny.gguf"),
        make_gguf(folder / "no-template.gguf", chat_template=None),
        make_gguf(folder / "qwen2.gguf", arch="qwen2"),
        make_gguf(folder / "gpt2.gguf", arch="gpt2"),
        write(folder / "every-kind.gguf", every_kind_of_value),
        write(folder / "big-endian.gguf", every_kind_of_value, endianess=GGUFEndian.BIG),
    ]


def test_inspect_gives_what_gguf_reader_gave(tmp_path):
    for path in honest_files(tmp_path):
        assert gguf_file.inspect(path) == reader_inspect(path), path.name


def test_inspect_gives_what_gguf_reader_gave_on_the_demo_model():
    demo = next(m for m in DEMO_MODELS if m.path.endswith(".gguf"))
    try:
        path = locate(demo)
    except Unavailable:
        pytest.skip(f"{demo.package} is not installed")
    ours = gguf_file.inspect(path)
    assert ours == reader_inspect(path)
    assert ours.tokenizer["vocab_size"] == 49152
    assert ours.config["tokenizer.ggml.bos_token_id"] == 1


def test_the_walk_keeps_values_and_the_length_of_long_arrays(tmp_path):
    metadata = read_header(write(tmp_path / "every-kind.gguf", every_kind_of_value)).metadata
    assert metadata["test.string"] == "Größe 日本語 🙂"
    assert metadata["test.int8"] == -128 and metadata["test.bool"] is True
    assert metadata[f"test.words_{MAX_KEPT_ARRAY}"][-1] == f"w{MAX_KEPT_ARRAY - 1}é"
    assert metadata[f"test.ints_{MAX_KEPT_ARRAY + 1}"] == LongArray(T.INT32, MAX_KEPT_ARRAY + 1)
    assert metadata["tokenizer.ggml.tokens"] == LongArray(T.STRING, 300)


def test_a_large_vocabulary_costs_little(tmp_path):
    def vocabulary(writer: GGUFWriter) -> None:
        writer.add_token_list([f"token{i}" for i in range(200_000)])
        writer.add_token_scores([0.0] * 200_000)

    path = write(tmp_path / "vocab.gguf", vocabulary)
    start = time.perf_counter()
    info = gguf_file.inspect(path)
    assert time.perf_counter() - start < 0.5  # GGUFReader: about 6 s
    assert info.tokenizer["vocab_size"] == 200_000
    tracemalloc.start()
    try:
        gguf_file.inspect(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024**2  # GGUFReader: about 400 MB


def refused(path: Path, reason: str) -> None:
    with pytest.raises(UnsupportedFormat, match=f"not a valid GGUF file: .*{reason}"):
        gguf_file.inspect(path)


def test_a_string_over_the_limit_is_refused(tmp_path):
    def huge_template(writer: GGUFWriter) -> None:
        writer.add_chat_template("x" * (MAX_STRING_BYTES + 1))

    refused(write(tmp_path / "one.gguf", huge_template), f"longer than {MAX_STRING_BYTES}")


def test_strings_over_the_limit_in_all_are_refused(tmp_path):
    half = "x" * (MAX_STRING_BYTES // 2)

    def two_halves(writer: GGUFWriter) -> None:
        writer.add_string("test.a", half)
        writer.add_string("test.b", half)

    refused(write(tmp_path / "two.gguf", two_halves), "bytes of strings kept in all")


def test_short_arrays_over_the_limit_in_all_are_refused(tmp_path):
    def many_arrays(writer: GGUFWriter) -> None:
        for index in range(MAX_KEPT_ELEMENTS // MAX_KEPT_ARRAY + 1):
            writer.add_key_value(f"test.{index}", [0] * MAX_KEPT_ARRAY, T.ARRAY, T.UINT8)

    refused(write(tmp_path / "many.gguf", many_arrays), "array elements kept in all")
