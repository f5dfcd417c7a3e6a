"""W8A8 products of a step with few rows (``int8_matmul.c``): the same int32 sums as
``torch._int_mm``, read from the weights at memory speed.

A decode step of one sequence multiplies one int8 row by every weight matrix; torch._int_mm
read SmolLM2-135M's 134 MB of int8 weights at about 11.5 GB/s there, this kernel at about 19
(7.1 against 11.8 ms a step, 2-core Intel VM). Its sums are exact integers, equal to
torch._int_mm's, so a sequence's output does not change with the rows beside it or with the
path taken. Above ``ROWS_MAX`` rows, torch._int_mm is as fast and runs instead. Inside a
compiled step it is called as an operator registered with ``torch.library.Library``: about
6 us a call there, against 17 for a ``torch.library.custom_op``.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
from torch import Tensor

from maas.runtime.llm.native import NativeLibrary

ROWS_MAX = 2
"""Products of at most this many rows use the kernel (measured: 1 row 7.1 against 11.8 ms
over the demo's weights, 2 rows 9.1 against 10.8, 4 rows 11.7 against 11.3)."""


LONGEST = 65536
"""Rows of more inputs go to torch._int_mm: the kernel's int32 sums are exact up to here."""


def _declare(library: ctypes.CDLL) -> None:
    fn = library.int8_row_matmul
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_int, ctypes.c_int]
    library.int8_best_level.restype = ctypes.c_int
    library.int8_best_level.argtypes = []


NATIVE = NativeLibrary(
    Path(__file__).with_name("int8_matmul.c"), _declare, fallback="torch._int_mm runs"
)


def available() -> bool:
    return NATIVE.load() is not None


def int8_matmul(x: Tensor, weight: Tensor) -> Tensor:
    """``torch._int_mm(x, weight.t())``: int8 rows [rows, in] by int8 weights [out, in],
    int32 [rows, out]; through the kernel (which must be ``available``) for at most
    ``ROWS_MAX`` rows. Inside a compiled step, through the registered operator, which
    decides by the rows itself: a branch on them in the step would make Dynamo compile the
    step once per side (and reach its recompile limit); eagerly, called directly."""
    if torch.compiler.is_compiling():
        return torch.ops.maas.int8_matmul(x, weight)
    return _run(x, weight)


def _run(x: Tensor, weight: Tensor, level: int = -1) -> Tensor:
    """``level``: the kernel's instruction set, -1 the best this CPU runs (2 AVX-512BW, 1
    AVX2, 0 a plain loop); tests name each."""
    if x.dtype != torch.int8 or weight.dtype != torch.int8:
        raise ValueError(f"int8 rows and weights, not {x.dtype} and {weight.dtype}")
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"rows {tuple(x.shape)} do not match weights {tuple(weight.shape)}")
    if x.device.type != "cpu" or weight.device.type != "cpu":
        raise ValueError("the int8 kernel runs on the CPU")
    if x.shape[0] > ROWS_MAX or x.shape[1] > LONGEST:
        return torch._int_mm(x, weight.t())
    library = NATIVE.load()
    if library is None:
        raise RuntimeError("the int8 kernel is not built")
    x, weight = x.contiguous(), weight.contiguous()
    out = torch.empty(x.shape[0], weight.shape[0], dtype=torch.int32)
    status = library.int8_row_matmul(
        x.data_ptr(),
        weight.data_ptr(),
        out.data_ptr(),
        x.shape[0],
        weight.shape[0],
        weight.shape[1],
        torch.get_num_threads(),
        level,
    )
    if status == -2:
        raise ValueError(f"this CPU does not run the int8 kernel's level {level}")
    if status != 0:
        raise MemoryError("the int8 kernel ran out of memory")
    return out


_LIBRARY = torch.library.Library("maas", "FRAGMENT")
_LIBRARY.define("int8_matmul(Tensor x, Tensor weight) -> Tensor")
_LIBRARY.impl("int8_matmul", _run, "CPU")


@torch.library.register_fake("maas::int8_matmul")
def _(x: Tensor, weight: Tensor) -> Tensor:
    return x.new_empty((x.shape[0], weight.shape[0]), dtype=torch.int32)
