"""Reading chosen tensors of a safetensors file by byte range, so that a pipeline stage reads
only its own weights and never the whole file first.

The format is an 8-byte little-endian header length, a JSON header naming each tensor's
dtype, shape and ``data_offsets`` (from the end of the header), then the data. Ranges are read
with ``pread`` (``RangeReader``), so the bytes read are the ones asked for.
"""

from __future__ import annotations

import json
import math
import os
import struct

import torch
from torch import Tensor

from maas.errors import UnsupportedFormat

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

MAX_HEADER = 100 * 1024 * 1024
"""A header longer than this is refused (as the safetensors library does)."""


class RangeReader:
    """Reads byte ranges of one file with ``pread``: only what is asked is read."""

    def __init__(self, path) -> None:
        self._fd = os.open(path, os.O_RDONLY)

    def read(self, offset: int, size: int) -> bytes:
        chunks, done = [], 0
        while done < size:
            chunk = os.pread(self._fd, size - done, offset + done)
            if not chunk:
                raise UnsupportedFormat("a weights file ends before one of its tensors")
            chunks.append(chunk)
            done += len(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        os.close(self._fd)


class SafetensorsFile:
    """The tensors of one safetensors file, each read when asked for."""

    def __init__(self, path) -> None:
        self._reader = RangeReader(path)
        try:
            (length,) = struct.unpack("<Q", self._reader.read(0, 8))
            if length > MAX_HEADER:
                raise UnsupportedFormat("a safetensors header is over 100 MB")
            header = json.loads(self._reader.read(8, length))
        except (struct.error, ValueError, UnicodeDecodeError) as err:
            self._reader.close()
            raise UnsupportedFormat(f"not a safetensors file: {err}") from None
        header.pop("__metadata__", None)
        self._base = 8 + length
        self._info: dict[str, dict] = header

    @property
    def names(self) -> list[str]:
        return list(self._info)

    def get(self, name: str) -> Tensor | None:
        """The tensor ``name`` (a fresh copy of its bytes), or None if the file has none."""
        info = self._info.get(name)
        if info is None:
            return None
        dtype = DTYPES.get(info["dtype"])
        if dtype is None:
            raise UnsupportedFormat(f"safetensors dtype {info['dtype']} is not supported")
        start, end = info["data_offsets"]
        shape = info["shape"]
        expected = math.prod(shape) * torch.tensor([], dtype=dtype).element_size()
        if not 0 <= start <= end or end - start != expected:
            raise UnsupportedFormat(f"tensor {name}: its byte range does not fit its shape")
        data = bytearray(self._reader.read(self._base + start, end - start))
        if not data:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(data, dtype=dtype).reshape(shape)

    def close(self) -> None:
        self._reader.close()
