"""Pipeline stages on one machine: what splitting SmolLM2 across processes costs, and what a
hop between stages costs (the figure that decides it on separate machines).

LLM: a real ``maas serve`` serves the demo SmolLM2-135M-Instruct with
``MAAS_LLM_PIPELINE_STAGES`` = 1, 2 and 3 (float32 weights, the compiled step), driven by
bench/llm_serving.py's streaming client: ``--clients`` streams of ``--prompt-len`` +
``--output-len`` tokens, then single streams; output tokens/s, TTFT and ITL, failures and the
peak RSS of the server's whole process tree (server, engine and stage processes). Rounds
alternate the stage counts (1, 2, 3, 1, 2, 3, ...) and the table gives each one's median and
its ratio to one stage within each round (the median of those ratios).

Training: the digits CNN (bench/training.py's job: scikit-learn's digits, small-cnn 16/32/64
at 16x16, batch 64) as a real ``train`` job run by an in-process worker, alone and in each
strategy: data parallel on 2 processes, pipeline on 2 stages (4 micro-batches), hybrid
2 x 2, and a parameter server with 2 workers, sync and async. Training samples/s are the
epochs' images over the job's time after its data is loaded; each strategy's ratio is to the
lone job of the same round (median over rounds), with its validation accuracy.

Hops: two processes in a gloo group on 127.0.0.1 (as the stages are) send a step's hidden
states ([tokens, 576] float32, what each boundary carries forward) and logits ([rows, 49152]
float32, what the last stage sends back) back and forth; half the median round trip is the
time per hop. The bytes per token per boundary are computed from the model's shape.

    .venv/bin/python bench/distributed.py [--part llm|training|both] [--rounds 2]
        [--clients 32] [--requests 64] [--epochs 10]

The LLM part takes about 10 minutes a round, training about 3; run it with nothing else
busy. Needs the bench extra.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import llm_serving  # noqa: E402

from maas.config import Settings  # noqa: E402
from maas.registry import demo, open_registry  # noqa: E402
from maas.runtime.llm.config import LlamaConfig  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "distributed.json"
HOP_ROWS = (1, 32, 512)
HOP_REPEATS = 50


STRATEGIES = {
    "alone": {},
    "data x2": {"world_size": 2},
    "pipeline x2": {"strategy": "pipeline", "world_size": 2, "micro_batches": 4},
    "hybrid 2x2": {
        "strategy": "hybrid",
        "world_size": 4,
        "pipeline_stages": 2,
        "micro_batches": 2,
    },
    "ps sync, 2 workers": {"strategy": "parameter-server", "world_size": 3},
    "ps async, 2 workers": {"strategy": "parameter-server", "world_size": 3, "ps_mode": "async"},
}


def bench_training(args) -> dict:
    import training

    from maas.training.demo_data import write_digits_archive

    runs: dict[str, list[dict]] = {name: [] for name in STRATEGIES}
    with tempfile.TemporaryDirectory() as root:
        archive = Path(root) / "digits.zip"
        write_digits_archive(archive)
        for round_index in range(args.rounds):
            for name, extra in STRATEGIES.items():
                home = Path(root) / f"home-{round_index}-{list(STRATEGIES).index(name)}"
                row = training.run_maas(home, archive, args.epochs, extra)
                runs[name].append(row)
                print(name, row, flush=True)
    summary = []
    for name, rows in runs.items():
        ratios = [
            row["samples_per_s"] / alone["samples_per_s"]
            for row, alone in zip(rows, runs["alone"], strict=True)
        ]
        summary.append(
            {
                "strategy": name,
                "samples_per_s": round(statistics.median(r["samples_per_s"] for r in rows), 1),
                "ratio": round(statistics.median(ratios), 3),
                "val_accuracy": round(statistics.median(r["val_accuracy"] for r in rows), 4),
            }
        )
    print(f"\ndigits CNN, {args.epochs} epochs, medians of {args.rounds} rounds\n")
    print(f"{'strategy':<22} {'samples/s':>10} {'ratio':>6} {'val acc':>8}")
    for line in summary:
        print(
            f"{line['strategy']:<22} {line['samples_per_s']:>10} {line['ratio']:>6} "
            f"{line['val_accuracy']:>8}"
        )
    return {"epochs": args.epochs, "training": summary, "training_runs": runs}


def run_llm(home: Path, stages: int, prompts, args) -> dict:
    row = llm_serving.run_maas(
        home, args.dtype, prompts, args, extra_env={"MAAS_LLM_PIPELINE_STAGES": str(stages)}
    )
    return {"stages": stages, **row}


def _hop_peer(rank: int, address: str, shapes, repeats: int, out) -> None:
    import torch
    import torch.distributed as dist

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://{address}",
        rank=rank,
        world_size=2,
        timeout=timedelta(seconds=120),
    )
    torch.set_num_threads(1)
    results = {}
    for name, shape in shapes:
        tensor = torch.randn(*shape)
        times = []
        for _ in range(repeats + 5):
            started = time.perf_counter()
            if rank == 0:
                dist.send(tensor, 1)
                dist.recv(tensor, 1)
            else:
                dist.recv(tensor, 0)
                dist.send(tensor, 0)
            times.append(time.perf_counter() - started)
        results[name] = statistics.median(times[5:]) / 2 * 1000  # ms per one-way hop
    if rank == 0:
        out.put(results)
    dist.destroy_process_group()


def measure_hops(config: LlamaConfig) -> dict:
    """Median one-way time of each message between two gloo processes on loopback."""
    from maas.distributed.stages import free_address

    shapes = [(f"hidden x{n}", (n, config.hidden_size)) for n in HOP_ROWS]
    shapes += [(f"logits x{n}", (n, config.vocab_size)) for n in (1, 32)]
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    address = free_address()
    peers = [
        context.Process(target=_hop_peer, args=(rank, address, shapes, HOP_REPEATS, queue))
        for rank in (0, 1)
    ]
    for peer in peers:
        peer.start()
    results = queue.get(timeout=300)
    for peer in peers:
        peer.join(60)
    return {name: round(ms, 3) for name, ms in results.items()}


def report_llm(rows: list[dict], hops: dict, config: LlamaConfig, args) -> dict:
    by_stages: dict[int, list[dict]] = {}
    for row in rows:
        by_stages.setdefault(row["stages"], []).append(row)
    keys = ("output_tokens_per_s", "single_stream_tokens_per_s", "peak_rss_mib")
    summary = []
    for stages, runs in sorted(by_stages.items()):
        line = {"stages": stages, "rounds": len(runs)}
        for key in (*keys, "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms"):
            line[key] = round(statistics.median(r[key] for r in runs), 1)
        line["failed"] = sum(r["failed"] for r in runs)
        for key in keys:
            ratios = [
                run[key] / base[key]
                for run, base in zip(runs, by_stages[1], strict=False)
                if base[key]
            ]
            line[f"{key}_ratio"] = round(statistics.median(ratios), 3) if ratios else None
        summary.append(line)
    print(
        f"\nSmolLM2-135M-Instruct, {args.dtype}, {args.clients} streams, {args.requests} requests "
        f"of {args.prompt_len} + {args.output_len} tokens; medians of {args.rounds} rounds\n"
    )
    print(
        f"{'stages':>6} {'tok/s':>7} {'ratio':>6} {'1-stream':>8} {'ratio':>6} {'TTFT p50':>9} "
        f"{'ITL p50':>8} {'ITL p99':>8} {'failed':>6} {'peak RSS':>9}"
    )
    for line in summary:
        print(
            f"{line['stages']:>6} {line['output_tokens_per_s']:>7} "
            f"{line['output_tokens_per_s_ratio']:>6} {line['single_stream_tokens_per_s']:>8} "
            f"{line['single_stream_tokens_per_s_ratio']:>6} {line['ttft_p50_ms']:>9} "
            f"{line['itl_p50_ms']:>8} {line['itl_p99_ms']:>8} {line['failed']:>6} "
            f"{line['peak_rss_mib']:>6} MiB"
        )
    per_token = {
        "hidden state forward, per token per boundary": config.hidden_size * 4,
        "logits back to rank 0, per sampled token": config.vocab_size * 4,
    }
    print("\nbytes:", json.dumps(per_token))
    print("one-way hop, median ms (gloo, loopback):", json.dumps(hops))
    return {
        "model": llm_serving.MODEL,
        "dtype": args.dtype,
        "clients": args.clients,
        "requests": args.requests,
        "prompt_len": args.prompt_len,
        "output_len": args.output_len,
        "rounds": args.rounds,
        "cpu_count": os.cpu_count(),
        "llm": summary,
        "runs": rows,
        "bytes": per_token,
        "hop_ms": hops,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--stages", default="1,2,3")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--single-runs", type=int, default=3)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--part", choices=("llm", "training", "both"), default="both")
    parser.add_argument("--epochs", type=int, default=10)
    llm_serving.add_maas_options(parser)
    args = parser.parse_args()
    result = {"benchmark": "distributed", "cpu_count": os.cpu_count(), "rounds": args.rounds}
    if args.part in ("llm", "both"):
        result["llm"] = bench_llm(args)
    if args.part in ("training", "both"):
        result["training"] = bench_training(args)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2) + "\n")


def bench_llm(args) -> dict:
    model = demo.DEMO_MODELS[0]
    gguf = demo.locate(model)
    from gguf import GGUFReader

    vocab = len(GGUFReader(gguf).fields["tokenizer.ggml.tokens"].data)
    prompts = llm_serving.make_prompts(args.requests, args.prompt_len, vocab)
    rows = []
    with tempfile.TemporaryDirectory() as root:
        home = Path(root) / "home"
        registry = open_registry(Settings(home=home))
        registry.import_model(gguf, llm_serving.MODEL, task=model.task)
        opened = registry.open_version(llm_serving.MODEL)
        from maas.runtime.llm.weights import read_config

        config = read_config(opened)
        registry.close()
        hops = measure_hops(config)
        print("hops:", hops, flush=True)
        for _ in range(args.rounds):
            for stages in (int(s) for s in args.stages.split(",")):
                rows.append(run_llm(home, stages, prompts, args))
                print(rows[-1], flush=True)
    return report_llm(rows, hops, config, args)


if __name__ == "__main__":
    main()
