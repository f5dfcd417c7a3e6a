"""What speculative decoding buys on natural text, and on the random prompts that
bench/llm_serving.py sends: the demo SmolLM2-135M-Instruct in float32 with its int8 draft,
in-process, one greedy sequence at a time.

    .venv/bin/python bench/speculation.py [--rounds 2] [--max-tokens 128]

Three prompt sets: chat questions as a user would ask them (through the model's chat
template); 128-token windows of this repository's documentation, as the serving benchmark
sends with ``--prompts text``; and 128 random token ids, as it sends by default
(bench/llm_serving.py's ``text_prompts`` and ``make_prompts``). Each prompt runs without
the draft (``runner.draft`` set aside: the same weights and compiled steps) and with it in
each of ``--ways`` (K tokens a round, or at most K ending at a doubted one), one after the
other in an order that rotates from prompt to prompt, ``--rounds`` times; decode tokens/s is
the output after the first token over the time since the first token, and each way's ratio
is the median of the prompts' ratios to no draft. The outputs must be the same tokens every
way (greedy), or the script stops.

Greedy decoding after random token ids falls into short loops (one prompt's answer here is
"216, 907" over and over), which a draft model, or any guess from the text so far, predicts
almost every time; chat answers repeat far less. ``repeats`` is the share of output tokens
that continue a 2-to-4-token run seen earlier in the output the way it went there (what
prompt-lookup decoding would guess right): a measure of how loop-like the output is.

No baseline engine: this says how far the serving benchmark's one-stream speed of float32
with a draft carries over to text, not how maas compares with llama.cpp.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llm_serving import make_prompts, text_prompts  # noqa: E402

from maas.config import Settings  # noqa: E402
from maas.engine.llm_engine import LLMEngine  # noqa: E402
from maas.messages import EngineRequest, SamplingParams  # noqa: E402
from maas.registry import demo, open_registry  # noqa: E402
from maas.runtime.llm.runner import ModelRunner, RunnerOptions  # noqa: E402
from maas.runtime.llm.tokenizer import load_tokenizer  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "speculation.json"

QUESTIONS = (
    "What is the capital of France?",
    "Explain in a few sentences how a refrigerator keeps food cold.",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Give me three tips for a job interview.",
    "Why is the sky blue?",
    "Write a short story about a cat who learns to swim.",
    "What are the main differences between a virus and a bacterium?",
    "Summarise the plot of Romeo and Juliet.",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument(
        "--ways",
        default="2,8,8@0.5,8@0.8",
        help="comma list of K (a round proposes K tokens) or K@P (at most K, stopping after "
        "one the draft gives less than probability P: MAAS_LLM_DRAFT_MIN_CONFIDENCE)",
    )
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    ways = args.ways.split(",")
    model = demo.DEMO_MODELS[0]
    with tempfile.TemporaryDirectory() as home:
        registry = open_registry(Settings(home=Path(home)))
        registry.import_model(demo.locate(model), model.name, task=model.task)
        opened = registry.open_version(model.name)
        tokenizer = load_tokenizer(opened)
        options = RunnerOptions(
            dtype="float32",
            draft="int8",
            speculative_tokens=max(tokens_and_confidence(way)[0] for way in ways),
            max_sequences=32,  # as served: compiled steps wide enough for a round
            max_model_len=512,
        )
        runner = ModelRunner(opened, options)
        registry.close()
    engine = LLMEngine(runner, max_batch_tokens=512)
    engine.warm_up()
    draft = runner.draft
    prompt_sets = {
        "chat questions": [
            tokenizer.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS
        ],
        "documentation text": text_prompts(len(QUESTIONS), 128, demo.locate(model)),
        "random token ids": make_prompts(len(QUESTIONS), 128, runner.config.vocab_size),
    }
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    modes = ["none", *ways]
    sets = {}
    for name, prompts in prompt_sets.items():
        rates = {k: [] for k in modes}
        proposed = dict.fromkeys(ways, 0)
        accepted = dict.fromkeys(ways, 0)
        outputs = []
        for round_ in range(args.rounds):
            for i, prompt in enumerate(prompts):
                turn = (round_ * len(prompts) + i) % len(modes)
                produced = []
                for way in modes[turn:] + modes[:turn]:  # each way first in turn
                    if way == "none":
                        runner.draft, runner.speculative_tokens = None, 0
                    else:
                        runner.draft = draft
                        runner.speculative_tokens, draft.min_confidence = tokens_and_confidence(way)
                    counts = engine.speculation
                    before = (counts.draft_tokens, counts.accepted_tokens)
                    tokens, rate = generate(engine, prompt, params)
                    rates[way].append(rate)
                    if way != "none":
                        proposed[way] += counts.draft_tokens - before[0]
                        accepted[way] += counts.accepted_tokens - before[1]
                    produced.append(tokens)
                if any(tokens != produced[0] for tokens in produced):
                    raise SystemExit(f"{name}: a draft changed the output")
                if round_ == 0:
                    outputs.append(produced[0])
        sets[name] = summary(rates, proposed, accepted, outputs)
        print(name, json.dumps(sets[name]), flush=True)
    body = {
        "benchmark": "speculation",
        "model": model.name,
        "dtype": "float32",
        "draft": "int8",
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "sets": sets,
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(body, indent=2) + "\n")
    print(f"\nfloat32 with an int8 draft, one greedy sequence, {args.max_tokens} tokens at most")
    print(f"{'prompts':<18} {'way':>7} {'tok/s':>6} {'ratio':>6} {'accepted':>9} {'repeats':>8}")
    for name, row in sets.items():
        for way, line in row["by_way"].items():
            print(
                f"{name:<18} {way:>7} {line['tokens_per_s']:>6} {line['ratio']:>5}x "
                f"{line['acceptance']:>9.1%} {row['repeats']:>8.1%}"
            )


def generate(
    engine: LLMEngine, prompt: list[int], params: SamplingParams
) -> tuple[list[int], float]:
    """The greedy output of ``prompt`` alone, and its decode tokens/s."""
    tokens: list[int] = []
    times: list[float] = []

    def sink(delta) -> None:
        tokens.extend(delta.token_ids)
        times.append(time.perf_counter())

    engine.add_request(EngineRequest(f"r{time.monotonic_ns()}", tuple(prompt), params), sink)
    steps = 0
    while engine.has_work() and steps < 10_000:
        engine.step()
        steps += 1
    first = times[0]
    rate = (len(tokens) - 1) / (times[-1] - first) if len(tokens) > 1 and times[-1] > first else 0.0
    return tokens, rate


def tokens_and_confidence(way: str) -> tuple[int, float]:
    """ "K" or "K@P" as (K, P)."""
    tokens, _, confidence = way.partition("@")
    return int(tokens), float(confidence or 0)


def summary(rates: dict, proposed: dict, accepted: dict, outputs: list[list[int]]) -> dict:
    """Per way ("none": no draft): median decode tokens/s, the median of the prompts' ratios
    to no draft, and the share of proposals accepted."""
    by_way = {}
    for way, values in rates.items():
        pairs = [r / plain for r, plain in zip(values, rates["none"], strict=True) if plain > 0]
        by_way[way] = {
            "tokens_per_s": round(statistics.median(values), 1),
            "ratio": round(statistics.median(pairs), 2),
            "acceptance": round(accepted[way] / proposed[way], 3) if proposed.get(way) else 0.0,
            "proposed": proposed.get(way, 0),
            "accepted": accepted.get(way, 0),
        }
    return {
        "by_way": by_way,
        "repeats": round(repeat_share(outputs), 3),
        "output_tokens": [len(o) for o in outputs],
    }


def repeat_share(outputs: list[list[int]]) -> float:
    """Share of output tokens (after the first 4) that follow the latest earlier occurrence
    of the 2 to 4 tokens before them as they followed it there."""
    hits = total = 0
    for tokens in outputs:
        for i in range(4, len(tokens)):
            total += 1
            for n in (4, 3, 2):
                tail = tokens[i - n : i]
                found = next(
                    (s for s in range(i - n - 1, -1, -1) if tokens[s : s + n] == tail), None
                )
                if found is not None:
                    hits += tokens[found + n] == tokens[i]
                    break
    return hits / total if total else 0.0


if __name__ == "__main__":
    main()
