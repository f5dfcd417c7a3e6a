"""What two busy PyTorch processes on the same cores cost each other, by OpenMP wait policy:
why ``maas serve``'s job workers run with ``OMP_WAIT_POLICY=PASSIVE`` (maas/jobs/worker.py)
and the test suite too (tests/conftest.py), while engines keep spinning.

    .venv/bin/python bench/omp_sharing.py [--rounds 3] [--steps 3000]

Each process runs the same decode-sized loop (32 rows through eight 576 x 576 products, the
demo SmolLM2-135M's width, 3,000 times) on every core, as an engine or a training rank does.
Cases: one process alone (spinning, then sleeping), two side by side both spinning (OpenMP's
default), both sleeping, and one spinning beside one sleeping (an engine beside a job).
Prints each process's seconds, the median over the rounds; nothing else should be running.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

LOOP = """
import sys, time, torch
torch.manual_seed(0)
weights = [torch.randn(576, 576) for _ in range(8)]
x = torch.randn(32, 576)
start = time.perf_counter()
for _ in range(int(sys.argv[1])):
    y = x
    for w in weights:
        y = torch.nn.functional.silu(y @ w) * 0.01 + y
print(time.perf_counter() - start)
"""

CASES = {
    "alone, spinning": ("ACTIVE",),
    "alone, sleeping": ("PASSIVE",),
    "two, both spinning": ("ACTIVE", "ACTIVE"),
    "two, both sleeping": ("PASSIVE", "PASSIVE"),
    "two, spinning beside sleeping": ("ACTIVE", "PASSIVE"),
}
TIMEOUT = 1200


def run(policies: tuple[str, ...], steps: int) -> list[float]:
    """Seconds of each process, started together, one per policy."""
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", LOOP, str(steps)],
            env={**os.environ, "OMP_WAIT_POLICY": policy},
            stdout=subprocess.PIPE,
            text=True,
        )
        for policy in policies
    ]
    return [float(process.communicate(timeout=TIMEOUT)[0]) for process in processes]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3000)
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores; {args.steps} steps a process; medians of {args.rounds}")
    for name, policies in CASES.items():
        rounds = [run(policies, args.steps) for _ in range(args.rounds)]
        medians = [statistics.median(times[i] for times in rounds) for i in range(len(policies))]
        spread = [
            f"{min(t[i] for t in rounds):.1f}-{max(t[i] for t in rounds):.1f}"
            for i in range(len(policies))
        ]
        shown = ", ".join(
            f"{policy.lower()} {median:.2f} s ({span})"
            for policy, median, span in zip(policies, medians, spread, strict=True)
        )
        print(f"{name:32} {shown}")


if __name__ == "__main__":
    main()
