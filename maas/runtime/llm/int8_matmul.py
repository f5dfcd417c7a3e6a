"""W8A8 products of a step with few rows (``int8_matmul.c``): the same int32 sums as
``torch._int_mm``, read from the weights at memory speed.

A decode step of one sequence multiplies one int8 row by every weight matrix; torch._int_mm
read SmolLM2-135M's 134 MB of int8 weights at about 11.5 GB/s there, this kernel at about 19
(7.1 against 11.8 ms a step, 2-core Intel VM), and at about 33 with AVX-512 VNNI (4.1 ms), for
which the caller keeps each weight row's sum (``row_sums``). Its sums are exact integers, equal
to torch._int_mm's, so a sequence's output does not change with the rows beside it or with the
path taken. Above ``rows_max()`` rows, torch._int_mm is as fast and runs instead. Inside a
compiled step it is called as the operator ``maas::int8_matmul`` (torch_ops.py).
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
from torch import Tensor

from maas.runtime.llm import torch_ops
from maas.runtime.llm.native import NativeLibrary

ROWS_MAX = 8
"""Products of at most this many rows use the kernel where the CPU has AVX-512 VNNI
(``ROWS_MAX_WITHOUT_VNNI`` elsewhere: see ``rows_max``). Over the demo's weights (a step's 121
products, ms, 2-core Intel VM with AVX-512 VNNI), kernel against torch._int_mm: 1 row 4.8
against 11.4, 2 rows 6.1 against 11.2, 4 rows 9.4 against 12.6, 8 rows 10.9 against 12.7,
12 rows 12.1 against 13.0, 16 rows 16.5 against 13.6. (Without VNNI, AVX-512BW: 1 row 7.1
against 11.8, 2 rows 9.1 against 10.8, 4 rows 11.7 against 11.3; there the kernel's lead ends
near two rows.)"""
ROWS_MAX_WITHOUT_VNNI = 2


LONGEST = 65536
"""Rows of more inputs go to torch._int_mm: the kernel's int32 sums are exact up to here."""


def _declare(library: ctypes.CDLL) -> None:
    fn = library.int8_row_matmul
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int, ctypes.c_int]
    library.int8_best_level.restype = ctypes.c_int
    library.int8_best_level.argtypes = []


NATIVE = NativeLibrary(
    Path(__file__).with_name("int8_matmul.c"), _declare, fallback="torch._int_mm runs"
)


def available() -> bool:
    if NATIVE.load() is None:
        return False
    _register_operator()
    return True


@functools.cache
def _register_operator() -> None:
    """The operator's CPU kernel (torch_ops.py), once; a C++ one is told which products to
    send to torch._int_mm, as ``_run`` does."""
    if torch_ops.register_cpu("int8_matmul", _run) == "c++":
        torch_ops.OPS.load().maas_set_int8_limits(rows_max(), LONGEST)


@functools.cache
def rows_max() -> int:
    """The most rows a product sends to the kernel on this CPU (0 if it is not built); asked
    once (each product asks)."""
    library = NATIVE.load()
    if library is None:
        return 0
    return ROWS_MAX if library.int8_best_level() >= VNNI else ROWS_MAX_WITHOUT_VNNI


VNNI = 3
"""The kernel's level for AVX-512 VNNI (int8_matmul.c)."""


def row_sums(weight: Tensor) -> Tensor:
    """Each row's sum of int8 weights [out, in], int32 [out]: what ``int8_matmul`` takes
    beside them (computed once, at load, not each step)."""
    return weight.sum(dim=1, dtype=torch.int32)


def int8_matmul(x: Tensor, weight: Tensor, sums: Tensor) -> Tensor:
    """``torch._int_mm(x, weight.t())``: int8 rows [rows, in] by int8 weights [out, in], int32
    [rows, out], ``sums`` being ``row_sums(weight)``; through the kernel (which must be
    ``available``) for at most ``rows_max()`` rows. Inside a compiled step, through the registered
    operator, which decides by the rows itself: a branch on them in the step would make Dynamo
    compile the step once per side (and reach its recompile limit); eagerly, called directly."""
    if torch.compiler.is_compiling():
        return torch.ops.maas.int8_matmul(x, weight, sums)
    return _run(x, weight, sums)


def _run(x: Tensor, weight: Tensor, sums: Tensor, level: int = -1) -> Tensor:
    """``level``: the kernel's instruction set, -1 the best this CPU runs (3 AVX-512 VNNI,
    2 AVX-512BW, 1 AVX2, 0 a plain loop); tests name each."""
    if x.dtype != torch.int8 or weight.dtype != torch.int8:
        raise ValueError(f"int8 rows and weights, not {x.dtype} and {weight.dtype}")
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"rows {tuple(x.shape)} do not match weights {tuple(weight.shape)}")
    if sums.dtype != torch.int32 or tuple(sums.shape) != (weight.shape[0],):
        raise ValueError(
            f"row sums are int32 [{weight.shape[0]}], not {sums.dtype} {tuple(sums.shape)}"
        )
    if x.device.type != "cpu" or weight.device.type != "cpu":
        raise ValueError("the int8 kernel runs on the CPU")
    if x.shape[0] > rows_max() or x.shape[1] > LONGEST:
        return torch._int_mm(x, weight.t())
    library = NATIVE.load()
    if library is None:
        raise RuntimeError("the int8 kernel is not built")
    x, weight, sums = x.contiguous(), weight.contiguous(), sums.contiguous()
    out = torch.empty(x.shape[0], weight.shape[0], dtype=torch.int32)
    status = library.int8_row_matmul(
        x.data_ptr(),
        weight.data_ptr(),
        sums.data_ptr(),
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
