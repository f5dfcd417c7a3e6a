"""The C kernels as PyTorch operators, which compiled steps call: ``maas::int8_matmul`` and
``maas::paged_decode_attention``.

Declared here (their schemas, and the shapes they return, for tracing). Their CPU kernels are
C++ (``torch_ops.cpp``), built at first use with the two C kernels into one library against
the torch that runs (native.py): a compiled step calls them about 150 times a step, and a
kernel written in Python costs about 7 us more a call (13.1 against 5.9 us a product and its
quantising, in a compiled loop). Where the C++ cannot be built (no C++ compiler, no torch
headers), each module registers its Python kernel instead (``register_cpu``), which computes
the same. Registered with ``torch.library.Library``, not ``custom_op``: its Python wrappers
cost about 11 us more a call.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from maas.runtime.llm.native import NativeLibrary

HERE = Path(__file__).parent

LIBRARY = torch.library.Library("maas", "FRAGMENT")
LIBRARY.define("int8_matmul(Tensor x, Tensor weight, Tensor sums) -> Tensor")
LIBRARY.define(
    "paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
    "Tensor lengths) -> Tensor"
)


@torch.library.register_fake("maas::int8_matmul")
def _(x: Tensor, weight: Tensor, sums: Tensor) -> Tensor:
    return x.new_empty((x.shape[0], weight.shape[0]), dtype=torch.int32)


@torch.library.register_fake("maas::paged_decode_attention")
def _(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, lengths: Tensor):
    return q.new_empty(q.shape)  # contiguous, as the kernel's


def _declare(library: ctypes.CDLL) -> None:
    library.maas_set_int8_limits.restype = None
    library.maas_set_int8_limits.argtypes = [ctypes.c_int64, ctypes.c_int64]


def _torch_flags() -> tuple[str, ...]:
    root = Path(torch.__file__).parent
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return (
        "-std=c++20",  # torch's headers use C++20's bit-field initialisers
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        f"-I{root / 'include'}",
    )


def _torch_libraries() -> tuple[str, ...]:
    lib = Path(torch.__file__).parent / "lib"
    return ("-lmvec", f"-L{lib}", f"-Wl,-rpath,{lib}", "-lc10", "-ltorch_cpu")


OPS = NativeLibrary(
    HERE / "torch_ops.cpp",
    _declare,
    c_sources=(HERE / "int8_matmul.c", HERE / "paged_attention.c"),
    flags=_torch_flags(),
    libraries=_torch_libraries(),
    made_for=torch.__version__,
    fallback="the operators run their Python kernels",
)

_lock = threading.Lock()
_python_kernels: set[str] = set()


def register_cpu(name: str, python_kernel: Callable[..., Tensor]) -> str:
    """Give operator ``name`` its CPU kernel, once: the C++ one if the library builds (loading
    it registers both operators'), else ``python_kernel``. Returns which: "c++" or "python"."""
    with _lock:
        if OPS.load() is not None:
            return "c++"
        if name not in _python_kernels:
            LIBRARY.impl(name, python_kernel, "CPU")
            _python_kernels.add(name)
        return "python"


def kernel_of(name: str) -> str:
    """Which CPU kernel operator ``name`` has now: "c++", "python", or "" (none yet)."""
    if name in _python_kernels:
        return "python"
    return "c++" if OPS.built_name() else ""
