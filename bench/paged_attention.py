"""Decode attention alone: the paged attention kernel beside its reference (blocks gathered,
then PyTorch's fused ``scaled_dot_product_attention``), on the demo SmolLM2-135M's shapes.

    .venv/bin/python bench/paged_attention.py [--sequences 32,1] [--positions 190,1000]

For each cache dtype, batch and context: 30 layers, each with its own cache (as a step reads
them: nothing left in the CPU's caches from the layer before), block ids shuffled as a busy
engine leaves them. Prints the median of 7 passes over the 30 layers for each way, their
ratio, and the bytes of keys and values read per second by the kernel.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maas.runtime.llm import paged_attention  # noqa: E402
from maas.runtime.llm.model import decode_attention  # noqa: E402

LAYERS, HEADS, KV_HEADS, HEAD_DIM, BLOCK = 30, 9, 3, 64, 16  # SmolLM2-135M
PASSES = 7


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sequences", default="32,1")
    parser.add_argument("--positions", default="190,1000")
    args = parser.parse_args()
    if not paged_attention.available(torch.float32):
        sys.exit("the paged attention kernel cannot be built here (no C compiler?)")
    print(f"{torch.get_num_threads()} threads, {LAYERS} layers, ms for all of them (median)")
    print("| cache | sequences | positions | gathered + SDPA | kernel | ratio | kernel GB/s |")
    print("|---|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        for sequences in (int(n) for n in args.sequences.split(",")):
            for positions in (int(n) for n in args.positions.split(",")):
                row = measure(dtype, sequences, positions)
                print("| " + " | ".join(row) + " |", flush=True)


def measure(dtype: torch.dtype, sequences: int, positions: int) -> list[str]:
    generator = torch.Generator().manual_seed(0)
    per = -(-positions // BLOCK)
    blocks = sequences * per + 1
    shape = (blocks, BLOCK, KV_HEADS, HEAD_DIM)
    caches = [
        (torch.randn(shape, generator=generator).to(dtype), torch.randn(shape).to(dtype))
        for _ in range(LAYERS)
    ]
    tables = (torch.randperm(blocks - 1, generator=generator) + 1).view(sequences, per)
    lengths = torch.full((sequences,), positions)
    q = torch.randn(sequences, HEADS, HEAD_DIM, generator=generator).to(dtype)

    def run(paged: bool) -> float:
        times = []
        for _ in range(PASSES + 1):  # the first warms up
            started = time.perf_counter()
            for k, v in caches:
                decode_attention(q, k, v, tables, lengths, paged)
            times.append((time.perf_counter() - started) * 1000)
        return statistics.median(times[1:])

    gathered, kernel = run(False), run(True)
    read = sum(k[1:].nbytes + v[1:].nbytes for k, v in caches) * positions / (per * BLOCK)
    return [
        str(dtype).removeprefix("torch."),
        str(sequences),
        str(positions),
        f"{gathered:.1f}",
        f"{kernel:.1f}",
        f"{gathered / kernel:.2f}x",
        f"{read / kernel / 1e6:.1f}",
    ]


if __name__ == "__main__":
    main()
