"""Decode attention that reads the paged KV cache in place (``paged_attention.c``).

The reference form gathers each sequence's blocks into one tensor before PyTorch's fused
attention; that copy is most of decode attention's cost once a batch is large (a layer of 32
demo sequences of about 180 positions: 0.8 ms of gathering beside 0.4 ms of attention). The
C kernel reads each key and value once where it lies, for all the query heads that share it.
It is built at first use (native.py) and called as the operator
``maas::paged_decode_attention`` (torch_ops.py), so a compiled step calls it too. Where it
cannot be built, or for a dtype it does not take, ``available`` is false and the gathering
form runs.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
from torch import Tensor

from maas.runtime.llm import torch_ops
from maas.runtime.llm.native import NativeLibrary

DTYPES = (torch.float32, torch.bfloat16)


def _declare(library: ctypes.CDLL) -> None:
    fn = library.paged_decode_attention
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int] * 2 + [ctypes.c_int64] * 7 + [ctypes.c_int]


NATIVE = NativeLibrary(
    Path(__file__).with_name("paged_attention.c"),
    _declare,
    libraries=("-lmvec",),  # glibc's vector math
    fallback="blocks are gathered",
)


def library() -> ctypes.CDLL | None:
    """The built kernel, building it on first use; None if it cannot be built."""
    library = NATIVE.load()
    if library is not None:
        _register_operator()
    return library


@functools.cache
def _register_operator() -> None:
    """The operator's CPU kernel (torch_ops.py), once."""
    torch_ops.register_cpu("paged_decode_attention", _run)


def built_name() -> str:
    """The built kernel's file name, which names its source, flags, compiler and machine
    ("" if it is not built)."""
    return NATIVE.built_name()


def available(dtype: torch.dtype) -> bool:
    return dtype in DTYPES and library() is not None


def paged_decode_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, lengths: Tensor
) -> Tensor:
    """[S, heads, head_dim] attention of one query per sequence over its first ``lengths``
    cached positions (see model.decode_attention); the kernel must be ``available``. Inside
    a compiled step, through the registered operator; eagerly, called directly (the
    operator's dispatch costs time for nothing there)."""
    if torch.compiler.is_compiling():
        return torch.ops.maas.paged_decode_attention(q, k_cache, v_cache, block_tables, lengths)
    return _run(q, k_cache, v_cache, block_tables, lengths)


def _run(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, lengths: Tensor
) -> Tensor:
    lib = library()
    if lib is None:
        raise RuntimeError("the paged attention kernel is not built")
    blocks, block_size, kv_heads, head_dim = k_cache.shape
    sequences, heads = q.shape[0], q.shape[1]
    if not (k_cache.dtype == v_cache.dtype and {q.dtype, k_cache.dtype} <= set(DTYPES)):
        raise ValueError(
            f"paged attention takes float32 or bfloat16, not {q.dtype} queries over a "
            f"{k_cache.dtype} and {v_cache.dtype} cache"
        )
    if heads % kv_heads or q.shape[2] != head_dim or v_cache.shape != k_cache.shape:
        raise ValueError("queries and cache do not match")
    if block_tables.dim() != 2 or block_tables.shape[0] != sequences:
        raise ValueError("block_tables must be [sequences, blocks]")
    if lengths.shape != (sequences,):
        raise ValueError("lengths must be [sequences]")
    if any(t.device.type != "cpu" for t in (q, k_cache, v_cache, block_tables, lengths)):
        raise ValueError("paged attention runs on the CPU")
    q, tables = q.contiguous(), block_tables.to(torch.int64).contiguous()
    lengths = lengths.to(torch.int64).contiguous()
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("the KV cache must be contiguous")
    out = q.new_empty(q.shape)
    status = lib.paged_decode_attention(
        q.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        tables.data_ptr(),
        lengths.data_ptr(),
        out.data_ptr(),
        int(q.dtype == torch.bfloat16),
        int(k_cache.dtype == torch.bfloat16),
        sequences,
        heads,
        kv_heads,
        head_dim,
        blocks,
        block_size,
        tables.shape[1],
        torch.get_num_threads(),
    )
    if status == -2:
        raise IndexError("a sequence's length or block ids lie outside the KV cache")
    if status != 0:
        raise MemoryError("paged attention ran out of memory")
    return out
