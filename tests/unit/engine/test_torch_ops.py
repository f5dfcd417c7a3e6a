"""The kernels' PyTorch operators (torch_ops.py): C++ kernels where the library builds, giving
what the Python ones give and refusing what they refuse; the Python ones wherever it does not."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from maas.runtime.llm import int8_matmul, paged_attention, torch_ops
from tests.unit.engine.test_paged_attention import cache_and_batch

OPERATORS = ("int8_matmul", "paged_decode_attention")


@pytest.fixture(autouse=True)
def _built():
    """Built (once, into the run's cache) when a test first needs it, not at collection."""
    if not (int8_matmul.available() and paged_attention.available(torch.float32)):
        pytest.skip("no C compiler to build the kernels")
    if torch_ops.OPS.load() is None:
        pytest.skip("no C++ compiler or torch headers to build the operators")


def codes(*shape: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(-128, 128, shape, dtype=torch.int8, generator=generator)


def test_the_operators_cpu_kernels_are_the_cpp_ones():
    for name in OPERATORS:
        assert torch_ops.kernel_of(name) == "c++"
        dump = torch._C._dispatch_dump(f"maas::{name}")
        cpu = next(line for line in dump.splitlines() if line.startswith("CPU:"))
        assert "torch_ops.cpp" in cpu


@pytest.mark.parametrize("rows", [1, 2, 5, 8, 9, 17])  # past rows_max: torch._int_mm
@pytest.mark.parametrize(("outputs", "inputs"), [(960, 576), (13, 1536), (7, 45), (1, 1)])
def test_int8_products_are_the_python_kernels_integers(rows, outputs, inputs):
    x, weight = codes(rows, inputs, seed=rows), codes(outputs, inputs, seed=inputs)
    sums = int8_matmul.row_sums(weight)
    expected = x.int() @ weight.int().t()
    assert torch.equal(torch.ops.maas.int8_matmul(x, weight, sums), expected)
    assert torch.equal(int8_matmul._run(x, weight, sums), expected)


def test_int8_products_of_rows_too_long_for_the_kernel_are_exact():
    inputs = int8_matmul.LONGEST + 32
    x, weight = codes(1, inputs, seed=1), codes(2, inputs, seed=2)
    got = torch.ops.maas.int8_matmul(x, weight, int8_matmul.row_sums(weight))
    assert torch.equal(got, torch._int_mm(x, weight.t()))


@pytest.mark.parametrize(("queries", "cache"), [(torch.float32,) * 2, (torch.bfloat16,) * 2,
                                                (torch.float32, torch.bfloat16)])  # fmt: skip
def test_attention_is_the_python_kernels_to_the_bit(queries, cache):
    q, k, v, tables, held = cache_and_batch(cache, lengths=(1, 17, 40, 200))
    q = q.to(queries)
    got = torch.ops.maas.paged_decode_attention(q, k, v, tables, held)
    assert got.dtype == queries and got.shape == q.shape
    assert torch.equal(got, paged_attention._run(q, k, v, tables, held))
    # int32 tables and lengths, as a caller may hold them, read the same
    same = torch.ops.maas.paged_decode_attention(q, k, v, tables.int(), held.int())
    assert torch.equal(same, got)


def _attention_inputs():
    return cache_and_batch(torch.float32, lengths=(20, 9))


def _with(index: int, value):
    parts = list(_attention_inputs())
    parts[index] = value(parts)
    return parts


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        (lambda: _with(2, lambda p: p[2].half()), ValueError, "float32 or bfloat16"),
        (lambda: _with(0, lambda p: p[0][:, :4]), ValueError, "queries and cache do not match"),
        (lambda: _with(0, lambda p: p[0][:, :, :8]), ValueError, "queries and cache"),
        (lambda: _with(3, lambda p: p[3][:1]), ValueError, "block_tables must be"),
        (lambda: _with(4, lambda p: p[4][:1]), ValueError, "lengths must be"),
        (lambda: _with(1, lambda p: p[1].mT.contiguous().mT), ValueError, "must be contiguous"),
        (lambda: _with(4, lambda p: torch.tensor([20, 10_000])), IndexError, "outside the KV"),
        (lambda: _with(4, lambda p: torch.tensor([20, 0])), IndexError, "outside the KV cache"),
    ],
)
def test_attention_refuses_what_the_python_kernel_refuses(arguments, error, message):
    for kernel in (torch.ops.maas.paged_decode_attention, paged_attention._run):
        with pytest.raises(error, match=message):
            kernel(*arguments())


@pytest.mark.parametrize(
    ("x", "weight", "sums", "message"),
    [
        (torch.zeros(1, 8), codes(4, 8, seed=0), torch.zeros(4, dtype=torch.int32), "int8 rows"),
        (codes(1, 8, seed=0), codes(4, 9, seed=0), torch.zeros(4, dtype=torch.int32), "match"),
        (codes(8, seed=0), codes(4, 8, seed=0), torch.zeros(4, dtype=torch.int32), "match"),
        (codes(1, 8, seed=0), codes(4, 8, seed=0), torch.zeros(4), r"row sums are int32 \[4\]"),
        (codes(1, 8, seed=0), codes(4, 8, seed=0), torch.zeros(5, dtype=torch.int32), "row sums"),
    ],
)
def test_int8_products_refuse_what_the_python_kernel_refuses(x, weight, sums, message):
    for kernel in (torch.ops.maas.int8_matmul, int8_matmul._run):
        with pytest.raises(ValueError, match=message):
            kernel(x, weight, sums)


FALLBACK = """
import torch
from maas.runtime.llm import int8_matmul, paged_attention, torch_ops
torch_ops.OPS._failed = True  # as if the C++ could not be built here
assert int8_matmul.available() and paged_attention.available(torch.float32)
assert [torch_ops.kernel_of(n) for n in {operators!r}] == ["python", "python"]
dump = torch._C._dispatch_dump("maas::int8_matmul")
assert "torch_ops.cpp" not in dump, dump
x = torch.randint(-128, 128, (2, 64), dtype=torch.int8)
w = torch.randint(-128, 128, (32, 64), dtype=torch.int8)
step = torch.compile(lambda x, w, s: torch.ops.maas.int8_matmul(x, w, s) + 1, fullgraph=True)
assert torch.equal(step(x, w, int8_matmul.row_sums(w)), x.int() @ w.int().t() + 1)
print("python kernels")
"""


def test_without_the_cpp_library_the_python_kernels_run():
    """In a process of its own: a kernel once registered stays for the process."""
    done = subprocess.run(
        [sys.executable, "-c", FALLBACK.format(operators=OPERATORS)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "python kernels"


def test_each_operator_returns_what_it_was_traced_to_return():
    """A compiled step leaves out inductor's checks of the operators' outputs (compiled.py's
    WITHOUT_ASSERTS): their sizes, strides and dtypes must be their traced (fake) forms'."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    int8_cases = []
    for rows in (1, 8, 9, 33):  # the kernel, and torch._int_mm past rows_max
        x, weight = codes(rows, 576, seed=rows), codes(960, 576, seed=1)
        int8_cases.append((torch.ops.maas.int8_matmul, (x, weight, int8_matmul.row_sums(weight))))
    attention_cases = []
    for queries, cache in [(torch.float32,) * 2, (torch.bfloat16,) * 2]:
        q, k, v, tables, held = cache_and_batch(cache, lengths=(1, 17, 40))
        attention_cases.append(
            (torch.ops.maas.paged_decode_attention, (q.to(queries), k, v, tables, held))
        )
    for operator, arguments in int8_cases + attention_cases:
        real = operator(*arguments)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = operator(*(mode.from_tensor(a) for a in arguments))
        assert (real.shape, real.stride(), real.dtype) == (fake.shape, fake.stride(), fake.dtype)
        assert real.data_ptr() % 64 == 0  # aligned as inductor assumes of fresh outputs
