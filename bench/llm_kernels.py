"""What the int8 kernel of a one-sequence decode step costs: how fast it reads weights, against
how fast torch reads memory at all, and what each call costs beyond its work.

    .venv/bin/python bench/llm_kernels.py

- Bandwidth: one int8 row times a weight matrix (``int8_matmul._run``), for a 268 MB matrix
  (memory speed, nothing cached) and for the demo SmolLM2-135M's 30 layers of products in a
  step's order, beside ``torch.sum`` over 1 GiB of float32 on the same threads: the
  baseline, memory read as fast as torch reads it.
- Per call: a product too small to cost anything (8 x 64) called bare through ``ctypes``,
  through ``_run`` (its checks, output allocation and the call), and through
  ``torch.ops.maas.int8_matmul``, as a compiled step calls it; a decode step of the demo
  makes 120 such calls, and 30 more of paged attention, which go the same way.

No server, no model file: random weights of the demo's shapes.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maas.runtime.llm import int8_matmul  # noqa: E402

DEMO_SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536))
"""A SmolLM2-135M layer's products (out, in): q, k and v as one, o, gate and up as one, down."""
LAYERS = 30


def seconds_per_call(call, calls: int, rounds: int = 5) -> float:
    """Median over ``rounds`` of the mean time of ``calls`` calls, after one round to warm up."""
    call()
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(calls):
            call()
        times.append((time.perf_counter() - started) / calls)
    return statistics.median(times)


def product_seconds(outputs: int, inputs: int, calls: int) -> float:
    """Seconds a call of one int8 row times an (outputs x inputs) matrix takes."""
    weight = torch.randint(-127, 128, (outputs, inputs), dtype=torch.int8)
    x, sums = torch.randint(-127, 128, (1, inputs), dtype=torch.int8), int8_matmul.row_sums(weight)
    return seconds_per_call(lambda: int8_matmul._run(x, weight, sums), calls)


def layers_seconds() -> float:
    """Seconds the demo's 30 layers of products take for one sequence, each matrix of its
    own and read in a step's order (106 MB a pass: more than the CPU's caches hold)."""
    products = []
    for _ in range(LAYERS):
        for outputs, inputs in DEMO_SHAPES:
            weight = torch.randint(-127, 128, (outputs, inputs), dtype=torch.int8)
            x = torch.randint(-127, 128, (1, inputs), dtype=torch.int8)
            products.append((x, weight, int8_matmul.row_sums(weight)))

    def one_pass() -> None:
        for x, weight, sums in products:
            int8_matmul._run(x, weight, sums)

    return seconds_per_call(one_pass, 10)


def main() -> None:
    if not int8_matmul.available():
        sys.exit("the int8 kernel is not built here (no C compiler?)")
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    gib = torch.ones(2**28)
    sum_rate = gib.nbytes / seconds_per_call(gib.sum, 3)
    del gib
    print(f"torch.sum over 1 GiB of float32: {sum_rate / 1e9:.1f} GB/s ({threads} threads)")
    big_rate = 65536 * 4096 / product_seconds(65536, 4096, calls=3)
    print(
        f"int8 kernel, one row x 65536 x 4096 (268 MB): {big_rate / 1e9:.1f} GB/s, "
        f"{big_rate / sum_rate:.2f}x torch.sum's rate"
    )
    taken = layers_seconds()
    layer_bytes = LAYERS * sum(outputs * inputs for outputs, inputs in DEMO_SHAPES)
    print(
        f"the demo's {LAYERS} layers of products ({layer_bytes / 1e6:.0f} MB), one sequence: "
        f"{taken * 1e3:.2f} ms, {layer_bytes / taken / 1e9:.1f} GB/s"
    )
    weight = torch.randint(-127, 128, (8, 64), dtype=torch.int8)
    x = torch.randint(-127, 128, (1, 64), dtype=torch.int8)
    sums, out = int8_matmul.row_sums(weight), torch.empty(1, 8, dtype=torch.int32)
    library = int8_matmul.NATIVE.load()
    pointers = (x.data_ptr(), weight.data_ptr(), sums.data_ptr(), out.data_ptr())
    bare = seconds_per_call(
        lambda: library.int8_row_matmul(*pointers, 1, 8, 64, threads, -1), 20000
    )
    checked = seconds_per_call(lambda: int8_matmul._run(x, weight, sums), 20000)
    dispatched = seconds_per_call(lambda: torch.ops.maas.int8_matmul(x, weight, sums), 20000)
    print(
        f"a call of an 8 x 64 product: ctypes {bare * 1e6:.1f} us, _run {checked * 1e6:.1f} "
        f"us, torch.ops {dispatched * 1e6:.1f} us ({dispatched / bare:.1f}x the bare call)"
    )


if __name__ == "__main__":
    main()
