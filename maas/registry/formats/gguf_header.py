"""A bounded walk over the header of an untrusted GGUF file, run before anything else reads it.

GGUF v2/v3 (little- or big-endian, told apart by the version field as ``gguf`` does)::

    magic "GGUF" | version u32 | tensor_count u64 | kv_count u64
    kv_count     x  key string | value_type u32 | value
    tensor_count x  name string | n_dims u32 | dims u64 x n_dims | ggml_type u32 | offset u64
    padding to general.alignment (default 32), then the data section

A string is a u64 byte length then UTF-8 bytes; an array is an element type u32, a count u64,
then the elements. Every count and length is checked against the bytes left in the file (and
against the limits below) before it is read, skipped or iterated; arrays of fixed-size elements
are skipped in O(1). So nothing is allocated or looped over because a header claims it: a header
that lies costs time and memory in proportion to the bytes really there, up to the limits, and
ends in a ``HeaderError`` that says what is wrong and where.

The walk keeps what readers of the file need, so that none of them has to walk it again: every
key's value (an array of more than ``MAX_KEPT_ARRAY`` elements, such as the vocabulary, as its
element type and length only) and every tensor's name, type, shape and place. What is kept is
bounded too: ``MAX_STRING_BYTES`` of strings and ``MAX_KEPT_ELEMENTS`` array elements in all.
"""

from __future__ import annotations

import codecs
import mmap
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from gguf.constants import (
    GGML_QUANT_SIZES,
    GGUF_DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    GGMLQuantizationType,
    GGUFValueType,
)

SUPPORTED_VERSIONS = (2, 3)
MAX_KV_PAIRS = 1 << 16
"""Real files carry a few dozen key/value pairs; 200 would be a lot."""
MAX_ARRAY_ELEMENTS = 1 << 20
"""Over all arrays, nested ones included. The largest real vocabularies (Gemma 3: 262,208
tokens, with scores and token types) come to about 790k elements. Strings are checked one by
one (2^20 of them in about half a second), fixed-size elements are skipped at no cost."""
MAX_KEPT_ARRAY = 64
"""Arrays up to this many elements are kept as lists; longer ones by element type and length."""
MAX_KEPT_ELEMENTS = 1 << 16
"""Elements of the arrays kept as lists, in all (each becomes a Python object of 30 to 60 bytes).
Real files keep a few dozen: per-layer settings, special token lists."""
MAX_STRING_BYTES = 16 << 20
"""Bytes of the strings kept (keys, string values, strings in kept arrays, tensor names), in all.
The largest part of a real header is its chat template, a few hundred kB at most."""
MAX_ARRAY_DEPTH = 2
"""An array of arrays at most; ggml itself accepts no nested arrays at all."""
MAX_NESTED_ARRAYS = 1 << 12
"""Arrays inside arrays, in all: walking each costs a few microseconds, and no real file has one."""
MAX_TENSORS = 1 << 16
"""Real checkpoints hold hundreds to a few thousand tensors (experts are stacked)."""
MAX_KEY_LENGTH = (1 << 16) - 1
"""The GGUF specification's limit for a key, in bytes."""
GGML_MAX_NAME = 64
"""ggml keeps tensor names in a 64-byte buffer, NUL included."""
GGML_MAX_DIMS = 4
MAX_DIM = (1 << 63) - 1
"""ggml stores dimensions as int64."""

STRUCT_CODES = {
    GGUFValueType.UINT8: "B",
    GGUFValueType.INT8: "b",
    GGUFValueType.BOOL: "?",
    GGUFValueType.UINT16: "H",
    GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I",
    GGUFValueType.INT32: "i",
    GGUFValueType.FLOAT32: "f",
    GGUFValueType.UINT64: "Q",
    GGUFValueType.INT64: "q",
    GGUFValueType.FLOAT64: "d",
}
"""How ``struct`` reads each fixed-size value type."""
FIXED_SIZES = {value_type: struct.calcsize(code) for value_type, code in STRUCT_CODES.items()}
MIN_SIZES = {**FIXED_SIZES, GGUFValueType.STRING: 8, GGUFValueType.ARRAY: 12}
"""The fewest bytes one value of each type takes: a string or array header with no content."""
MIN_KV_SIZE = 8 + 4 + 1
MIN_TENSOR_INFO_SIZE = 8 + 4 + 4 + 8
UTF8_CHUNK = 1 << 20


class HeaderError(ValueError):
    """The header is not a well-formed GGUF v2/v3 header; ``str(err)`` says where and why."""


@dataclass(frozen=True)
class LongArray:
    """An array of more than ``MAX_KEPT_ARRAY`` elements, kept as what it holds and how many."""

    element_type: GGUFValueType
    length: int


Value = bool | int | float | str | LongArray | list["Value"]
"""A key's value: scalars as Python numbers, strings decoded, short arrays as lists."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ggml_type: GGMLQuantizationType
    dims: tuple[int, ...]
    """In GGUF order: the length of a row first (numpy's shape is the reverse)."""
    offset: int
    """From the start of the data section."""
    num_bytes: int


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    alignment: int
    data_offset: int
    """Where the data section starts in the file."""
    metadata: dict[str, Value]
    """Every key's value, in the file's order."""
    tensors: tuple[TensorInfo, ...]
    value_spans: dict[str, tuple[int, int]]
    """Where each key's value lies in the file, its type field included: (start, end)."""


def read_header(path: Path) -> GGUFHeader:
    """Walk and check the header of ``path``; raise ``HeaderError`` at the first problem."""
    with path.open("rb") as file:
        size = file.seek(0, 2)
        if size < 24:
            raise HeaderError(f"the file has {size} bytes, fewer than a GGUF header's 24")
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
            return _HeaderReader(buffer, size).read()


class _HeaderReader:
    """A cursor over the mapped file that checks every read, skip and count before doing it.

    Error messages name the part being read; callers prefix where it sits ("'key': element 3:
    a string needs ..."), and only when something fails, so the walk stays cheap per element.
    """

    def __init__(self, buffer: mmap.mmap, size: int) -> None:
        self.buffer = buffer
        self.size = size
        self.pos = 0
        self.byte_order = "<"
        self.u32_format = struct.Struct("<I")
        self.u64_format = struct.Struct("<Q")
        self.elements_left = MAX_ARRAY_ELEMENTS
        self.nested_arrays_left = MAX_NESTED_ARRAYS
        self.kept_elements_left = MAX_KEPT_ELEMENTS
        self.string_bytes_left = MAX_STRING_BYTES
        self.metadata: dict[str, Value] = {}
        self.value_spans: dict[str, tuple[int, int]] = {}
        self.tensor_names: set[str] = set()
        self.alignment = GGUF_DEFAULT_ALIGNMENT

    @property
    def remaining(self) -> int:
        return self.size - self.pos

    def read(self) -> GGUFHeader:
        version = self._preamble()
        num_tensors, num_kv = self.u64("tensor_count"), self.u64("kv_count")
        self._check_counts(num_tensors, num_kv)
        for index in range(num_kv):
            self._key_value(index)
        tensors = tuple(self._tensor_info(index) for index in range(num_tensors))
        data_offset = -(-self.pos // self.alignment) * self.alignment
        for tensor in tensors:
            self._check_inside(tensor, data_offset)
        return GGUFHeader(
            version, self.alignment, data_offset, self.metadata, tensors, self.value_spans
        )

    # reading

    def take(self, num_bytes: int, what: str) -> int:
        """Advance past ``num_bytes`` and return where they start."""
        start = self.pos
        if num_bytes > self.size - start:
            raise HeaderError(
                f"{what} needs {num_bytes} bytes at offset {start}, "
                f"but only {self.size - start} remain"
            )
        self.pos = start + num_bytes
        return start

    def u32(self, what: str) -> int:
        return self.u32_format.unpack_from(self.buffer, self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return self.u64_format.unpack_from(self.buffer, self.take(8, what))[0]

    def fixed(self, value_type: GGUFValueType, count: int = 1) -> tuple[bool | int | float, ...]:
        """``count`` values of a fixed-size type, as Python numbers."""
        start = self.take(count * FIXED_SIZES[value_type], value_type.name)
        code = f"{self.byte_order}{count}{STRUCT_CODES[value_type]}"
        return struct.unpack_from(code, self.buffer, start)

    def string(self, max_length: int = MAX_STRING_BYTES) -> str:
        """A string to keep: it counts against ``MAX_STRING_BYTES``."""
        length = self.u64("a string length")
        start = self.take(length, "a string")
        if length > max_length:
            raise HeaderError(f"a string of {length} bytes is longer than {max_length}")
        if length > self.string_bytes_left:
            raise HeaderError(
                f"a string of {length} bytes goes over the limit of {MAX_STRING_BYTES} bytes "
                "of strings kept in all"
            )
        self.string_bytes_left -= length
        return _decode(self.buffer[start : start + length])

    def skip_string(self) -> None:
        length = self.u64("a string length")
        start = self.take(length, "a string")
        if length <= UTF8_CHUNK:
            _decode(self.buffer[start : start + length])
        else:
            _check_utf8_in_chunks(self.buffer, start, length)

    # the header, part by part

    def _preamble(self) -> int:
        if self.u32("the magic") != GGUF_MAGIC:
            raise HeaderError("the file does not start with the magic bytes 'GGUF'")
        if self.u32_format.unpack_from(self.buffer, self.pos)[0] & 0xFFFF == 0:
            # written on a machine of the other byte order, as gguf.GGUFReader guesses it
            self.byte_order = ">"
            self.u32_format, self.u64_format = struct.Struct(">I"), struct.Struct(">Q")
        version = self.u32("the version")
        if version not in SUPPORTED_VERSIONS:
            raise HeaderError(f"GGUF version {version} is not supported (only 2 and 3)")
        return version

    def _check_counts(self, num_tensors: int, num_kv: int) -> None:
        if num_kv > MAX_KV_PAIRS:
            raise HeaderError(f"kv_count {num_kv} is over the limit of {MAX_KV_PAIRS}")
        if num_tensors > MAX_TENSORS:
            raise HeaderError(f"tensor_count {num_tensors} is over the limit of {MAX_TENSORS}")
        least = num_kv * MIN_KV_SIZE + num_tensors * MIN_TENSOR_INFO_SIZE
        if least > self.remaining:
            raise HeaderError(
                f"kv_count {num_kv} and tensor_count {num_tensors} need at least {least} bytes, "
                f"but only {self.remaining} remain"
            )

    def _key_value(self, index: int) -> None:
        try:
            key = self.string(MAX_KEY_LENGTH)
        except HeaderError as err:
            raise HeaderError(f"key {index}: {err}") from None
        if key in self.metadata:
            raise HeaderError(f"key {key!r} appears twice")
        start = self.pos
        try:
            value_type = self._value_type()
            value = self._value(value_type, depth=0)
            if key == "general.alignment":
                self._set_alignment(value_type, value)
        except HeaderError as err:
            raise HeaderError(f"{key!r}: {err}") from None
        self.metadata[key] = value
        self.value_spans[key] = (start, self.pos)

    def _value_type(self) -> GGUFValueType:
        raw = self.u32("a value type")
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise HeaderError(f"value type {raw} is not a GGUF value type") from None

    def _set_alignment(self, value_type: GGUFValueType, alignment: Value) -> None:
        if value_type != GGUFValueType.UINT32:
            raise HeaderError(f"the alignment is {value_type.name}, not UINT32")
        if alignment == 0 or alignment & (alignment - 1):
            raise HeaderError(f"the alignment {alignment} is not a power of two")
        self.alignment = alignment

    def _value(self, value_type: GGUFValueType, depth: int) -> Value:
        if value_type == GGUFValueType.STRING:
            return self.string()
        if value_type == GGUFValueType.ARRAY:
            return self._array(depth + 1)
        return self.fixed(value_type)[0]

    def _array(self, depth: int) -> Value:
        """A short array as a list of its values, a long one as a ``LongArray``."""
        element_type, count = self._array_header(depth)
        if count > MAX_KEPT_ARRAY:
            self._skip_elements(element_type, count, depth)
            return LongArray(element_type, count)
        self._charge_kept(count)
        if element_type in FIXED_SIZES:
            return list(self.fixed(element_type, count))
        if element_type == GGUFValueType.STRING:
            return list(self._each(count, self.string))
        return list(self._each(count, partial(self._array, depth + 1)))

    def _skip_array(self, depth: int) -> None:
        element_type, count = self._array_header(depth)
        self._skip_elements(element_type, count, depth)

    def _array_header(self, depth: int) -> tuple[GGUFValueType, int]:
        """The element type and count, checked and charged before any element is read."""
        if depth > MAX_ARRAY_DEPTH:
            raise HeaderError(f"arrays nest deeper than {MAX_ARRAY_DEPTH} levels")
        element_type = self._value_type()
        count = self.u64("an array length")
        least = count * MIN_SIZES[element_type]
        if least > self.remaining:
            raise HeaderError(
                f"an array of {count} {element_type.name} needs at least {least} bytes, "
                f"but only {self.remaining} remain"
            )
        self._charge(element_type, count)
        return element_type, count

    def _charge(self, element_type: GGUFValueType, count: int) -> None:
        """Count the elements against the limits before any of them is walked."""
        if count > self.elements_left:
            raise HeaderError(
                f"an array of {count} {element_type.name} goes over the limit of "
                f"{MAX_ARRAY_ELEMENTS} array elements in all"
            )
        self.elements_left -= count
        if element_type == GGUFValueType.ARRAY:
            if count > self.nested_arrays_left:
                raise HeaderError(
                    f"an array of {count} arrays goes over the limit of "
                    f"{MAX_NESTED_ARRAYS} nested arrays in all"
                )
            self.nested_arrays_left -= count

    def _charge_kept(self, count: int) -> None:
        if count > self.kept_elements_left:
            raise HeaderError(
                f"an array of {count} elements goes over the limit of {MAX_KEPT_ELEMENTS} "
                "array elements kept in all"
            )
        self.kept_elements_left -= count

    def _skip_elements(self, element_type: GGUFValueType, count: int, depth: int) -> None:
        if element_type in FIXED_SIZES:
            self.pos += count * FIXED_SIZES[element_type]  # _array_header checked they are there
        elif element_type == GGUFValueType.STRING:
            for _ in self._each(count, self.skip_string):
                pass
        else:
            for _ in self._each(count, partial(self._skip_array, depth + 1)):
                pass

    def _each(self, count: int, read: Callable[[], Value | None]) -> Iterator[Value | None]:
        """``read()`` ``count`` times; an error names the element it happened in."""
        for index in range(count):
            try:
                yield read()
            except HeaderError as err:
                raise HeaderError(f"element {index}: {err}") from None

    def _tensor_info(self, index: int) -> TensorInfo:
        try:
            name = self.string(GGML_MAX_NAME - 1)
        except HeaderError as err:
            raise HeaderError(f"tensor {index}: {err}") from None
        if name in self.tensor_names:
            raise HeaderError(f"tensor {name!r} appears twice")
        self.tensor_names.add(name)
        try:
            return self._tensor_layout(name)
        except HeaderError as err:
            raise HeaderError(f"tensor {name!r}: {err}") from None

    def _tensor_layout(self, name: str) -> TensorInfo:
        num_dims = self.u32("n_dims")
        if num_dims > GGML_MAX_DIMS:
            raise HeaderError(f"{num_dims} dimensions, but ggml allows {GGML_MAX_DIMS}")
        dims = tuple(self.u64("a dimension") for _ in range(num_dims))
        ggml_type = _ggml_type(self.u32("the ggml type"))
        num_bytes = _num_bytes(ggml_type, dims)
        return TensorInfo(name, ggml_type, dims, self.u64("the offset"), num_bytes)

    def _check_inside(self, tensor: TensorInfo, data_offset: int) -> None:
        """The tensor's bytes start aligned and end inside the file."""
        if tensor.offset % self.alignment:
            raise HeaderError(
                f"tensor {tensor.name!r}: offset {tensor.offset} is not a multiple of "
                f"{self.alignment}"
            )
        end = data_offset + tensor.offset + tensor.num_bytes
        if end > self.size:
            raise HeaderError(
                f"tensor {tensor.name!r}: {tensor.num_bytes} bytes at data offset {tensor.offset} "
                f"end at byte {end}, past the end of the file ({self.size} bytes)"
            )


def _ggml_type(raw: int) -> GGMLQuantizationType:
    try:
        ggml_type = GGMLQuantizationType(raw)
    except ValueError:
        raise HeaderError(f"type {raw} is not a ggml type") from None
    if ggml_type not in GGML_QUANT_SIZES:
        raise HeaderError(f"type {ggml_type.name} has no known size")
    return ggml_type


def _num_bytes(ggml_type: GGMLQuantizationType, dims: tuple[int, ...]) -> int:
    if any(dim > MAX_DIM for dim in dims):
        raise HeaderError(f"dimensions {list(dims)} go over ggml's 2^63-1")
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    row = dims[0] if dims else 1  # ggml fills missing dimensions with 1
    if row % block_size:
        raise HeaderError(
            f"rows of {row} are not a multiple of the {ggml_type.name} block size {block_size}"
        )
    num_elements = 1
    for dim in dims:
        num_elements *= dim
    return num_elements // block_size * type_size


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise HeaderError("a string is not valid UTF-8") from None


def _check_utf8_in_chunks(buffer: mmap.mmap, start: int, length: int) -> None:
    """A long string costs its length in time, but only a chunk in memory."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        for at in range(start, start + length, UTF8_CHUNK):
            decoder.decode(buffer[at : min(at + UTF8_CHUNK, start + length)])
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise HeaderError("a string is not valid UTF-8") from None
