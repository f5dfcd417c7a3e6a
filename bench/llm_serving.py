"""LLM serving over HTTP, measured the way `vllm bench serve` does, beside two baselines.

maas: a real `maas serve` process serves the demo SmolLM2-135M-Instruct (GGUF). C clients
(greenlets with ``geventhttpclient``, light on the 2 cores the server also uses) each keep one
streaming ``/v1/completions`` request open at a time until ``--requests`` have been sent; every
prompt is ``--prompt-len`` random token ids and every request produces exactly
``--output-len`` tokens (greedy, ``ignore_eos``). Output tokens/s is counted over the whole run,
prefill included; time to first token (TTFT) and inter-token latency (ITL, the gap between
streamed chunks) are per request, reported as p50 and p99. A single stream is then timed alone.

Baselines, in the same run, on the same weights (the GGUF loaded by ``transformers`` and saved
as a Hugging Face folder) and the same prompts:

- ``transformers`` continuous batching (``generate_batch``), its KV cache bounded with
  ``ContinuousBatchingConfig(num_blocks, max_batch_tokens)``, under ``torch.no_grad()``, EOS off;
  single stream: ``generate`` with ``min_new_tokens``.
- CTranslate2 ``Generator.generate_batch`` in float32 and int8 (default backend), converted
  from that folder; single stream: ``generate_tokens``.

Offline baselines get all prompts at once, with no HTTP, tokenizer or streaming cost: they are
the easier case.

    .venv/bin/python bench/llm_serving.py [--clients 32] [--requests 64]
        [--dtypes float32,bfloat16,int8]

Needs the bench extra (``pip install -e .[bench]``): ctranslate2, accelerate (transformers'
GGUF loader) and geventhttpclient. Takes about 15 minutes; run it with nothing else busy.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from gevent.pool import Pool
from geventhttpclient import HTTPClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maas.config import Settings  # noqa: E402
from maas.registry import demo, open_registry  # noqa: E402
from tests.e2e.conftest import Server  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "llm_serving.json"
MODEL = "smollm2-135m-instruct"
THREADS = os.cpu_count() or 2


# ----------------------------------------------------------------------------- workload


def make_prompts(count: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """Random token ids, away from the special tokens at the start of the vocabulary."""
    rng = random.Random(seed)
    return [[rng.randrange(1000, vocab - 1000) for _ in range(length)] for _ in range(count)]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# ----------------------------------------------------------------------------- maas


class StreamResult:
    def __init__(self) -> None:
        self.ok = False
        self.error = ""
        self.ttft = 0.0
        self.gaps: list[float] = []
        self.output_tokens = 0
        self.decode_seconds = 0.0


def stream_one(port: int, key: str, prompt: list[int], output_len: int) -> StreamResult:
    result = StreamResult()
    body = json.dumps(
        {
            "model": MODEL,
            "prompt": prompt,
            "max_tokens": output_len,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    http = HTTPClient("127.0.0.1", port, concurrency=1, network_timeout=600)
    started = time.perf_counter()
    last = None
    try:
        response = http.post("/v1/completions", body=body, headers=headers)
        if response.status_code != 200:
            result.error = f"{response.status_code}: {response.read()[:200]!r}"
            return result
        while True:
            line = response.readline(b"\n")
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data: "):
                continue
            data = line[6:]
            if data == b"[DONE]":
                result.ok = result.output_tokens == output_len
                if not result.ok:
                    result.error = f"{result.output_tokens} of {output_len} tokens"
                break
            chunk = json.loads(data)
            if "error" in chunk:
                result.error = str(chunk["error"])[:200]
                break
            if chunk.get("usage"):
                result.output_tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                now = time.perf_counter()
                if last is None:
                    result.ttft = now - started
                    first = now
                else:
                    result.gaps.append(now - last)
                last = now
        if last is not None:
            result.decode_seconds = last - first
    except Exception as err:  # a failed request is counted, not fatal to the run
        result.error = f"{type(err).__name__}: {err}"
    finally:
        http.close()
    return result


def drive(
    server: Server, prompts: list[list[int]], clients: int, output_len: int
) -> tuple[list[StreamResult], float]:
    """``clients`` streams, each sending the next prompt when its last one ends; the results
    and the seconds the whole load took."""
    results: list[StreamResult] = []
    queue = list(prompts)

    def client() -> None:
        while queue:
            prompt = queue.pop()
            results.append(stream_one(server.port, server.admin_key, prompt, output_len))

    pool = Pool(clients)
    started = time.perf_counter()
    for _ in range(clients):
        pool.spawn(client)
    pool.join()
    return results, time.perf_counter() - started


def run_maas(home: Path, dtype: str, prompts: list[list[int]], args) -> dict:
    env = {
        "MAAS_LLM_DTYPE": dtype,
        "MAAS_LLM_MAX_SEQUENCES": str(max(32, args.clients)),
        # Slots only as long as the workload needs, as in the runs docs/performance.md quotes
        # (when the cache was committed at load), so that new runs compare with them.
        "MAAS_LLM_MAX_MODEL_LEN": str(args.prompt_len + args.output_len + 16),
    }
    server = Server(home, env=env)
    try:
        server.wait_ready(timeout=120)
        warm = stream_one(server.port, server.admin_key, prompts[0], 8)
        if not warm.ok:
            raise SystemExit(f"maas warm-up failed: {warm.error}\n{server.log.read_text()}")
        results, elapsed = drive(server, prompts, args.clients, args.output_len)
        single = [
            stream_one(server.port, server.admin_key, prompts[i], args.output_len)
            for i in range(args.single_runs)
        ]
    finally:
        server.stop()
    good = [r for r in results if r.ok]
    failures = [r.error for r in results if not r.ok] + [r.error for r in single if not r.ok]
    gaps = [gap for r in good for gap in r.gaps]
    return {
        "engine": "maas",
        "dtype": dtype,
        "requests": len(results),
        "failed": len(failures),
        "errors": failures[:5],
        "output_tokens_per_s": round(sum(r.output_tokens for r in good) / elapsed, 1),
        "ttft_p50_ms": round(percentile([r.ttft for r in good], 0.5) * 1000, 1),
        "ttft_p99_ms": round(percentile([r.ttft for r in good], 0.99) * 1000, 1),
        "itl_p50_ms": round(percentile(gaps, 0.5) * 1000, 1),
        "itl_p99_ms": round(percentile(gaps, 0.99) * 1000, 1),
        "single_stream_tokens_per_s": round(
            statistics.median((r.output_tokens - 1) / r.decode_seconds for r in single if r.ok), 1
        ),
        "seconds": round(elapsed, 1),
    }


# ----------------------------------------------------------------------------- baselines


def export_hf_folder(gguf: Path, folder: Path) -> None:
    """The GGUF as transformers reads it (dequantised to float32), saved as safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The tensors are plain float32 once loaded; drop the GGUF marker so they can be saved.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def run_transformers(folder: Path, dtype: str, prompts: list[list[int]], args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    torch.set_num_threads(THREADS)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
    blocks_per_sequence = -(-(args.prompt_len + args.output_len) // 256)
    config = ContinuousBatchingConfig(
        num_blocks=blocks_per_sequence * args.clients + 4,
        max_batch_tokens=512,
        max_requests_per_batch=args.clients,
    )
    generation = GenerationConfig(
        max_new_tokens=args.output_len,
        do_sample=False,
        eos_token_id=None,  # EOS off: generate_batch has no min_new_tokens
        pad_token_id=0,
    )
    with torch.no_grad():
        model.generate_batch(prompts[:2], generation, config, max_new_tokens=4)  # warm-up
        started = time.perf_counter()
        outputs = model.generate_batch(prompts, generation, config)
        elapsed = time.perf_counter() - started
        produced = sum(len(o.generated_tokens) for o in outputs.values())
        single = []
        for prompt in prompts[: args.single_runs]:
            ids = torch.tensor([prompt])
            begun = time.perf_counter()
            model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=args.output_len,
                min_new_tokens=args.output_len,
                do_sample=False,
                pad_token_id=0,
            )
            single.append(args.output_len / (time.perf_counter() - begun))
    return {
        "engine": "transformers (generate_batch)",
        "dtype": dtype,
        "requests": len(outputs),
        "failed": sum(len(o.generated_tokens) != args.output_len for o in outputs.values()),
        "output_tokens_per_s": round(produced / elapsed, 1),
        "single_stream_tokens_per_s": round(statistics.median(single), 1),
        "seconds": round(elapsed, 1),
    }


def run_ctranslate2(folder: Path, compute_type: str, prompts: list[list[int]], args) -> dict:
    import ctranslate2
    from transformers import AutoTokenizer

    converted = folder.parent / f"ct2-{compute_type}"
    if not converted.exists():
        converter = ctranslate2.converters.TransformersConverter(str(folder))
        converter.convert(str(converted), quantization=compute_type)
    generator = ctranslate2.Generator(
        str(converted), device="cpu", compute_type=compute_type, intra_threads=THREADS
    )
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokens = [tokenizer.convert_ids_to_tokens(prompt) for prompt in prompts]
    options = {
        "max_length": args.output_len,
        "min_length": args.output_len,
        "sampling_topk": 1,
        "include_prompt_in_result": False,
        "max_batch_size": args.clients,
    }
    generator.generate_batch(tokens[:2], **{**options, "max_length": 4, "min_length": 4})
    started = time.perf_counter()
    results = generator.generate_batch(tokens, **options)
    elapsed = time.perf_counter() - started
    produced = sum(len(r.sequences_ids[0]) for r in results)
    single = []
    for prompt in tokens[: args.single_runs]:
        begun = time.perf_counter()
        count = sum(
            1
            for _ in generator.generate_tokens(
                prompt, max_length=args.output_len, min_length=args.output_len, sampling_topk=1
            )
        )
        single.append(count / (time.perf_counter() - begun))
    return {
        "engine": "CTranslate2 (generate_batch)",
        "dtype": compute_type,
        "requests": len(results),
        "failed": sum(len(r.sequences_ids[0]) != args.output_len for r in results),
        "output_tokens_per_s": round(produced / elapsed, 1),
        "single_stream_tokens_per_s": round(statistics.median(single), 1),
        "seconds": round(elapsed, 1),
    }


# ----------------------------------------------------------------------------- report


def report(rows: list[dict], args) -> None:
    print(
        f"\n{args.clients} concurrent streams, {args.requests} requests, "
        f"{args.prompt_len} prompt + {args.output_len} output tokens\n"
    )
    header = (
        f"{'engine':<30} {'dtype':<9} {'tok/s':>7} {'TTFT p50':>9} {'p99':>7} "
        f"{'ITL p50':>8} {'p99':>6} {'failed':>6} {'1-stream':>8}"
    )
    print(header)
    for row in rows:
        print(
            f"{row['engine']:<30} {row['dtype']:<9} {row['output_tokens_per_s']:>7} "
            f"{row.get('ttft_p50_ms', '-'):>9} {row.get('ttft_p99_ms', '-'):>7} "
            f"{row.get('itl_p50_ms', '-'):>8} {row.get('itl_p99_ms', '-'):>6} "
            f"{row['failed']:>6} {row['single_stream_tokens_per_s']:>8}"
        )
    best = max((r for r in rows if r["engine"] == "maas"), key=lambda r: r["output_tokens_per_s"])
    ratios = {}
    for row in rows:
        if row["engine"] != "maas":
            ratio = best["output_tokens_per_s"] / row["output_tokens_per_s"]
            ratios[f"{row['engine']} {row['dtype']}"] = round(ratio, 2)
            print(f"maas {best['dtype']} / {row['engine']} {row['dtype']}: {ratio:.2f}x")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "benchmark": "llm_serving",
                "model": MODEL,
                "clients": args.clients,
                "requests": args.requests,
                "prompt_len": args.prompt_len,
                "output_len": args.output_len,
                "results": rows,
                "maas_best_over_baseline": ratios,
            },
            indent=2,
        )
        + "\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--dtypes", default="float32,bfloat16,int8", help="maas dtypes to run")
    parser.add_argument("--single-runs", type=int, default=3)
    parser.add_argument("--skip-baselines", action="store_true")
    args = parser.parse_args()
    model = demo.DEMO_MODELS[0]
    gguf = demo.locate(model)
    rows = []
    with tempfile.TemporaryDirectory() as root:
        home = Path(root) / "home"
        registry = open_registry(Settings(home=home))
        registry.import_model(gguf, MODEL, task=model.task)
        registry.close()
        from gguf import GGUFReader

        vocab = len(GGUFReader(gguf).fields["tokenizer.ggml.tokens"].data)
        prompts = make_prompts(args.requests, args.prompt_len, vocab)
        for dtype in args.dtypes.split(","):
            rows.append(run_maas(home, dtype, prompts, args))
            print(rows[-1], flush=True)
        if not args.skip_baselines:
            folder = Path(root) / "hf"
            export_hf_folder(gguf, folder)
            for dtype in ("float32", "bfloat16"):
                rows.append(run_transformers(folder, dtype, prompts, args))
                print(rows[-1], flush=True)
            for compute_type in ("float32", "int8"):
                rows.append(run_ctranslate2(folder, compute_type, prompts, args))
                print(rows[-1], flush=True)
    report(rows, args)


if __name__ == "__main__":
    main()
