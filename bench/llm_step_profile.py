"""Where an engine step's time goes: the demo SmolLM2-135M-Instruct in-process, C sequences of
128 prompt tokens decoding greedily, one step timed then profiled with ``torch.profiler``.

    .venv/bin/python bench/llm_step_profile.py [--dtype int8] [--sequences 32] [--rows 25]
        [--eager] [--no-profile]

Prints the median decode step (and the tokens/s it implies) and the ops that took the most
time over 10 steps. No baseline: this explains the figures of bench/llm_serving.py, it does
not compete with them.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maas.config import Settings  # noqa: E402
from maas.engine.llm_engine import LLMEngine  # noqa: E402
from maas.messages import EngineRequest, SamplingParams  # noqa: E402
from maas.registry import demo, open_registry  # noqa: E402
from maas.runtime.llm.runner import ModelRunner, RunnerOptions  # noqa: E402

WARM_STEPS, TIMED_STEPS, PROFILED_STEPS = 30, 20, 10


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--dtype", default="int8", choices=("float32", "bfloat16", "int8-weight", "int8")
    )
    parser.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--rows", type=int, default=25, help="ops to list")
    parser.add_argument("--threads", type=int, default=0, help="0: every core")
    parser.add_argument("--eager", action="store_true", help="do not compile the decode step")
    parser.add_argument("--no-profile", action="store_true", help="only time the step")
    args = parser.parse_args()
    model = demo.DEMO_MODELS[0]
    with tempfile.TemporaryDirectory() as home:
        registry = open_registry(Settings(home=Path(home)))
        registry.import_model(demo.locate(model), model.name, task=model.task)
        options = RunnerOptions(
            dtype=args.dtype,
            kv_cache_dtype=args.kv_cache_dtype,
            max_sequences=args.sequences,
            max_model_len=512,
            threads=args.threads,
            compile=not args.eager,
        )
        runner = ModelRunner(registry.open_version(model.name), options)
        registry.close()
    engine = LLMEngine(runner, max_batch_tokens=512)
    rng = random.Random(0)
    params = SamplingParams(max_tokens=256, temperature=0.0, ignore_eos=True)
    for i in range(args.sequences):
        prompt = [rng.randrange(100, runner.config.vocab_size) for _ in range(128)]
        engine.add_request(EngineRequest(f"r{i}", tuple(prompt), params), lambda _: None)
    for _ in range(WARM_STEPS):  # prefill done, decoding under way
        engine.step()
    steps, forwards = [], []
    forward = runner.forward

    def timed_forward(step_input):
        started = time.perf_counter()
        try:
            return forward(step_input)
        finally:
            forwards.append(time.perf_counter() - started)

    runner.forward = timed_forward
    for _ in range(TIMED_STEPS):
        started = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - started)
    runner.forward = forward
    step, model = statistics.median(steps), statistics.median(forwards)
    mode = "compiled" if runner.compiled else "eager"
    print(
        f"{args.dtype}, {args.sequences} sequences, {mode}: decode step {step * 1000:.1f} ms "
        f"({args.sequences / step:.0f} tokens/s decoding), {torch.get_num_threads()} threads; "
        f"the model's forward {model * 1000:.1f} ms, the engine's own work (scheduling, "
        f"inputs, sampling, text) {(step - model) * 1000:.1f} ms"
    )
    if args.no_profile:
        return
    with torch.profiler.profile() as profile:
        for _ in range(PROFILED_STEPS):
            engine.step()
    print(f"over {PROFILED_STEPS} steps (the profiler adds its own overhead):")
    print(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
