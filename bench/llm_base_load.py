"""How long a fine-tuning job takes to load its base model from the demo GGUF (SmolLM2-135M,
Q4_1) in float32: through ``transformers``' own GGUF loader (what fine-tuning used before
2026-12-06), and through maas's reader into ``transformers``' model of the same shape
(``maas/runtime/llm/hf_model.py``, what it uses now). Both ways load in turn, each round
in a fresh process (as a job's process starts cold), and the medians are compared.

    .venv/bin/python bench/llm_base_load.py [--rounds 3]

Takes about 2 minutes; run it with nothing else busy. Writes
bench/results/llm_base_load.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "llm_base_load.json"

LOAD = """
import sys, tempfile, time
from pathlib import Path
import torch
import transformers
from maas.config import Settings
from maas.registry import demo, open_registry

model = demo.DEMO_MODELS[0]
registry = open_registry(Settings(home=Path(tempfile.mkdtemp()) / "home"))
registry.import_model(demo.locate(model), model.name, task="chat")
opened = registry.open_version(model.name)
transformers.utils.logging.disable_progress_bar()
started = time.perf_counter()
if sys.argv[1] == "transformers":
    gguf = demo.locate(model)
    transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
else:
    from maas.runtime.llm.hf_model import load_hf_model

    load_hf_model(opened)
print(time.perf_counter() - started)
"""

WAYS = ("transformers", "maas")


def load_seconds(way: str) -> float:
    done = subprocess.run(
        [sys.executable, "-c", LOAD, way],
        capture_output=True,
        text=True,
        check=False,
        cwd=tempfile.gettempdir(),
    )
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return float(done.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    seconds: dict[str, list[float]] = {way: [] for way in WAYS}
    for round_ in range(args.rounds):
        for way in WAYS if round_ % 2 == 0 else WAYS[::-1]:
            seconds[way].append(round(load_seconds(way), 2))
            print(f"round {round_ + 1}: {way:<12} {seconds[way][-1]:6.2f} s", flush=True)
    medians = {way: statistics.median(times) for way, times in seconds.items()}
    ratio = medians["transformers"] / medians["maas"]
    print(f"median: transformers {medians['transformers']:.2f} s, maas {medians['maas']:.2f} s")
    print(f"maas's reader is {ratio:.2f}x faster")
    RESULTS.write_text(
        json.dumps(
            {"benchmark": "llm_base_load", "seconds": seconds, "medians": medians, "ratio": ratio},
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
