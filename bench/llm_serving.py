"""LLM serving over HTTP, measured the way `vllm bench serve` does, beside three baselines.

maas: a real `maas serve` process serves the demo SmolLM2-135M-Instruct (GGUF). C clients
(greenlets with ``geventhttpclient``, light on the 2 cores the server also uses) each keep one
streaming ``/v1/completions`` request open at a time until ``--requests`` have been sent; every
prompt is ``--prompt-len`` random token ids and every request produces exactly
``--output-len`` tokens (greedy, ``ignore_eos``; the final usage chunk must report that many
completion tokens and the prompt's length, or the request counts as failed). Output tokens/s
is counted over the whole run, prefill included; time to first token (TTFT) and inter-token
latency (ITL, the gap between streamed chunks) are per request, reported as p50 and p99. A
single stream is then timed alone (decode tokens/s, median of ``--single-runs``). The peak
resident memory of the server's whole process tree (maas and its engine process) is sampled
from /proc every 100 ms during the C-stream run, with each process's part at the peak.

Baselines, in the same run, on the same weights and the same prompts:

- llama.cpp's ``llama-server``, a server like maas, driven by the same client code with the
  same requests, on Q8_0 and F16 GGUF files made from the demo GGUF with ``llama-quantize
  --allow-requantize``. It is built once from the llama.cpp that the ``llama-cpp-python`` sdist
  vendors, into ``~/.cache/maas-bench/llama.cpp/<version>/`` (see bench/llama_cpp.py for the
  build and its CPU flags), and started with ``-t <cores> -np C --cont-batching`` and a context
  of C slots of prompt + output + 16 tokens, rounded up to 256 as llama.cpp does per slot
  (its KV cache is written at start, so its RSS counts all of it); ``--cache-ram 0`` turns
  off its host-memory prompt cache, which random prompts never hit and which would count
  saved slots in its resident memory (maas reuses prefixes only in its KV slots, as
  llama.cpp still does).
- ``transformers`` continuous batching (``generate_batch``) on the GGUF loaded by
  ``transformers`` and saved as a Hugging Face folder, its KV cache bounded with
  ``ContinuousBatchingConfig(num_blocks, max_batch_tokens)``, under ``torch.no_grad()``, EOS
  off; per-token times from ``record_timestamps``, TTFT counted from when a request is
  scheduled. Single stream: ``generate`` with ``min_new_tokens``.
- CTranslate2 ``Generator.generate_batch`` in float32 and int8 (default backend), converted
  from that folder, in batches of C; per-token times from its ``callback``, TTFT counted from
  when the example's batch could start (the run's start, or the end of the batch before it).
  Single stream: ``generate_tokens``.

``transformers`` and CTranslate2 get all prompts at once, with no HTTP, tokenizer or streaming
cost: they are the easier case. Their memory is that of this process, not measured.

    .venv/bin/python bench/llm_serving.py [--clients 32] [--requests 64]
        [--dtypes auto,float32,bfloat16,int8-weight,int8] [--stored int4]
        [--engines maas,llama.cpp,transformers,ctranslate2] [--thread-engine]

Single streams are also taken in turn (``--alternate-single`` rounds, default 5; 0 for none)
when maas and llama.cpp both run: every maas dtype and every llama.cpp file served at once,
each server one stream a round in an order that rotates, so that the one-stream ratios do
not depend on which engine ran in a faster minute of the machine (a VM's speed drifts: one
maas single stream ranged from 112 to 181 tokens/s within ten minutes). The median of the
rounds' ratios is reported beside the rows' own.

``--prompts text`` sends windows of this repository's documentation (docs/*.md) as the
prompts instead of random token ids: greedy answers to random ids fall into short loops
(bench/speculation.py), the best case for maas's speculative decoding.

``--kv-cache-dtype bfloat16`` keeps maas's KV cache in bfloat16 whatever the activations
(``MAAS_LLM_KV_CACHE_DTYPE``; by default, ``auto``, the activations' dtype).

``--thread-engine`` adds, after each maas row, the same dtype with the engine on a thread of
the server (``MAAS_LLM_ENGINE_PROCESS=false``): one process instead of two.

``--stored`` also serves versions whose weights are stored quantized, as ``maas optimize
quantize int4`` (or ``int8``) writes them from the demo GGUF, each in a home of its own under
the demo's model name, with ``MAAS_LLM_DTYPE=auto`` (which then picks the activations' dtype).

Needs the bench extra (``pip install -e .[bench]``): ctranslate2, accelerate (transformers'
GGUF loader) and geventhttpclient; cmake and a C++ compiler for the first llama.cpp build
(about 5 minutes on 2 cores). Takes about 20 minutes; run it with nothing else busy.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import random
import re
import statistics
import sys
import tempfile
import time
from itertools import pairwise
from operator import itemgetter
from pathlib import Path

from gevent.pool import Pool
from geventhttpclient import HTTPClient

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import llama_cpp  # noqa: E402
from process_memory import PeakRss  # noqa: E402

from maas.config import Settings  # noqa: E402
from maas.registry import demo, open_registry  # noqa: E402
from tests.e2e.conftest import Server, free_port  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "llm_serving.json"
MODEL = "smollm2-135m-instruct"
THREADS = os.cpu_count() or 2
ENGINES = ("maas", "llama.cpp", "transformers", "ctranslate2")
LLAMA_CPP_TYPES = ("Q8_0", "F16")
MiB = 1024**2


# ----------------------------------------------------------------------------- workload


def make_prompts(count: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """Random token ids, away from the special tokens at the start of the vocabulary."""
    rng = random.Random(seed)
    return [[rng.randrange(1000, vocab - 1000) for _ in range(length)] for _ in range(count)]


DOCS = Path(__file__).resolve().parents[1] / "docs"


def text_prompts(count: int, length: int, gguf: Path) -> list[list[int]]:
    """``count`` windows of ``length`` tokens, evenly spaced, of the prose of this
    repository's documentation (docs/*.md in name order, without tables and code blocks) as
    the model's tokenizer reads it: natural text, whose greedy continuations repeat far less
    than those of random ids (bench/speculation.py)."""
    from tokenizers import Tokenizer

    from maas.runtime.llm.gguf_tokenizer import converted

    tokenizer = Tokenizer.from_file(str(converted(gguf) / "tokenizer.json"))
    text = "\n\n".join(prose(page.read_text()) for page in sorted(DOCS.glob("*.md")))
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    stride = (len(ids) - length) // max(1, count - 1)
    if stride < 1:
        raise SystemExit(f"the documentation holds too few tokens for {count} prompts")
    return [ids[i * stride : i * stride + length] for i in range(count)]


def prose(markdown: str) -> str:
    """``markdown`` without its tables and fenced code blocks."""
    kept, fenced = [], False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and not line.startswith("|"):
            kept.append(line)
    return "\n".join(kept)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def latencies(ttfts: list[float], gaps: list[float]) -> dict:
    """TTFT and ITL p50 and p99, in milliseconds."""
    return {
        "ttft_p50_ms": round(percentile(ttfts, 0.5) * 1000, 1),
        "ttft_p99_ms": round(percentile(ttfts, 0.99) * 1000, 1),
        "itl_p50_ms": round(percentile(gaps, 0.5) * 1000, 1),
        "itl_p99_ms": round(percentile(gaps, 0.99) * 1000, 1),
    }


def median_or_nan(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# ----------------------------------------------------------------------------- HTTP servers


class StreamResult:
    def __init__(self) -> None:
        self.ok = False
        self.error = ""
        self.ttft = 0.0
        self.gaps: list[float] = []
        self.output_tokens = 0
        self.prompt_tokens = 0
        self.decode_seconds = 0.0


def stream_one(port: int, key: str | None, prompt: list[int], output_len: int) -> StreamResult:
    """One streaming completion; ok when the final usage reports ``output_len`` completion
    tokens and the prompt's length (the token ids were taken as they are)."""
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
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
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
                result.ok = (result.output_tokens, result.prompt_tokens) == (
                    output_len,
                    len(prompt),
                )
                if not result.ok:
                    result.error = (
                        f"{result.output_tokens} of {output_len} tokens, "
                        f"prompt {result.prompt_tokens} of {len(prompt)}"
                    )
                break
            chunk = json.loads(data)
            if "error" in chunk:
                result.error = str(chunk["error"])[:200]
                break
            if chunk.get("usage"):
                result.output_tokens = chunk["usage"]["completion_tokens"]
                result.prompt_tokens = chunk["usage"]["prompt_tokens"]
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
    port: int, key: str | None, prompts: list[list[int]], clients: int, output_len: int
) -> tuple[list[StreamResult], float]:
    """``clients`` streams, each sending the next prompt when its last one ends; the results
    and the seconds the whole load took."""
    results: list[StreamResult] = []
    queue = list(prompts)

    def client() -> None:
        while queue:
            prompt = queue.pop()
            results.append(stream_one(port, key, prompt, output_len))

    pool = Pool(clients)
    started = time.perf_counter()
    for _ in range(clients):
        pool.spawn(client)
    pool.join()
    return results, time.perf_counter() - started


def measure_server(port: int, key: str | None, pid: int, prompts: list[list[int]], args) -> dict:
    """A warm-up request, the C-stream load (with the peak RSS of ``pid``'s process tree),
    then single streams: the row's figures."""
    warm = stream_one(port, key, prompts[0], 8)
    if not warm.ok:
        raise RuntimeError(f"warm-up failed: {warm.error}")
    with PeakRss(pid) as rss:
        results, elapsed = drive(port, key, prompts, args.clients, args.output_len)
    single = [stream_one(port, key, prompts[i], args.output_len) for i in range(args.single_runs)]
    good = [r for r in results if r.ok]
    failures = [r.error for r in results if not r.ok] + [r.error for r in single if not r.ok]
    return {
        "requests": len(results),
        "failed": len(failures),
        "errors": failures[:5],
        "output_tokens_per_s": round(sum(r.output_tokens for r in good) / elapsed, 1),
        **latencies([r.ttft for r in good], [gap for r in good for gap in r.gaps]),
        "single_stream_tokens_per_s": round(
            median_or_nan([(r.output_tokens - 1) / r.decode_seconds for r in single if r.ok]), 1
        ),
        "peak_rss_mib": round(rss.peak / MiB),
        "peak_rss_by_process_mib": [
            [role, round(size / MiB)]
            for role, size in sorted(rss.at_peak.values(), key=itemgetter(1), reverse=True)
        ],
        "seconds": round(elapsed, 1),
    }


THREAD_ENGINE = {"MAAS_LLM_ENGINE_PROCESS": "false"}
"""The engine on a thread of the server: one Python process instead of two (the server's
memory less), the engine then sharing the server's GIL."""


def run_maas(
    home: Path, dtype: str, prompts: list[list[int]], args, extra_env: dict | None = None
) -> dict:
    server = start_maas(home, dtype, args, extra_env)
    try:
        row = measure_server(server.port, server.admin_key, server.process.pid, prompts, args)
        engine = running_engine(server.port, server.admin_key)
        row["runs"] = engine["dtype"]
        row["kv_cache"] = engine.get("kv_cache_dtype", "")
        row["compiled_rows"] = engine.get("compiled_rows", 0)
        row["draft"] = engine.get("draft", "")
        if row["draft"]:
            row["speculation"] = speculation(server.port, server.admin_key)
    except RuntimeError as err:
        raise SystemExit(f"maas {dtype}: {err}\n{server.log.read_text()}") from None
    finally:
        server.stop()
    return {"engine": "maas", "dtype": dtype, **row}


def start_maas(home: Path, dtype: str, args, extra_env: dict | None = None) -> Server:
    """``maas serve`` on ``home``'s demo model in ``dtype``, loaded and ready."""
    env = {
        "MAAS_LLM_DTYPE": dtype,
        "MAAS_LLM_MAX_SEQUENCES": str(max(32, args.clients)),
        # Slots only as long as the workload needs, as in the runs docs/performance.md quotes
        # (when the cache was committed at load), so that new runs compare with them.
        "MAAS_LLM_MAX_MODEL_LEN": str(args.prompt_len + args.output_len + 16),
        # serving only, as in the runs before job workers existed: an idle worker would add
        # its memory to the server's process tree (and nothing to its speed)
        "MAAS_JOB_WORKERS": "0",
        # a cache of the run's own (beside the home): auto measures at this run's first load
        # instead of taking a choice kept from an earlier run
        "MAAS_CACHE_DIR": str(args.cache_dir or home.parent / "maas-cache"),
        **({"MAAS_LLM_COMPILE": "false"} if args.eager else {}),
        "MAAS_LLM_KV_CACHE_DTYPE": args.kv_cache_dtype,
        **(extra_env or {}),
    }
    server = Server(home, env=env)
    try:
        server.wait_ready(timeout=900)  # auto times each dtype and compiles at load
    except AssertionError as err:  # Server's way of saying it exited or never became ready
        server.stop()
        raise SystemExit(f"maas {dtype}: {err}\n{server.log.read_text()}") from None
    return server


def running_engine(port: int, key: str) -> dict:
    """How the loaded LLM runs, as ``GET /api/v1/deployments`` says (what auto chose, its KV
    cache's dtype, up to how many sequences steps run compiled)."""
    client = HTTPClient("127.0.0.1", port, network_timeout=30)
    try:
        response = client.get("/api/v1/deployments", {"Authorization": f"Bearer {key}"})
        body = json.loads(response.read())
    finally:
        client.close()
    engines = [d["engine"] for d in body["data"] if (d.get("engine") or {}).get("dtype")]
    if not engines:
        raise RuntimeError(f"no LLM deployment in {body}")
    return engines[0]


def speculation(port: int, key: str) -> dict:
    """The server's speculative decoding so far (vLLM's counters on /metrics): rounds,
    proposed and accepted tokens, and the share accepted."""
    client = HTTPClient("127.0.0.1", port, network_timeout=30)
    try:
        text = client.get("/metrics", {"Authorization": f"Bearer {key}"}).read().decode()
    finally:
        client.close()
    counts = {}
    for name in ("drafts", "draft_tokens", "accepted_tokens"):
        found = re.findall(rf"^vllm:spec_decode_num_{name}_total{{[^}}]*}} (\S+)$", text, re.M)
        counts[name] = int(sum(float(value) for value in found))
    counts["acceptance"] = round(counts["accepted_tokens"] / max(1, counts["draft_tokens"]), 3)
    return counts


def stored_home(root: Path, source: Path, method: str, task: str) -> Path:
    """A home whose demo model is the demo GGUF stored quantized by ``method`` (int4 in
    groups of 32, or int8), written as ``maas optimize quantize`` writes it."""
    from maas.optimize import llm_quantize

    home = root / f"home-{method}"
    folder = root / f"stored-{method}"
    registry = open_registry(Settings(home=source))
    try:
        note = llm_quantize.write(registry.open_version(MODEL), method, 32, folder)
    finally:
        registry.close()
    print(f"stored {method}: {note}", flush=True)
    registry = open_registry(Settings(home=home))
    try:
        registry.import_model(folder, MODEL, task=task)
    finally:
        registry.close()
    return home


def run_llama_cpp(binaries: Path, gguf: Path, kind: str, prompts: list[list[int]], args) -> dict:
    server = start_llama_cpp(binaries, gguf, kind, args)
    try:
        row = measure_server(server.port, None, server.process.pid, prompts, args)
    except RuntimeError as err:
        raise SystemExit(f"llama.cpp {kind}: {err}\n{server.log.read_text()}") from None
    finally:
        server.stop()
    return {"engine": "llama.cpp (llama-server)", "dtype": kind, **row}


def start_llama_cpp(binaries: Path, gguf: Path, kind: str, args) -> llama_cpp.LlamaServer:
    """``llama-server`` on ``gguf`` with C slots, ready."""
    # llama-server splits -c evenly across its -np slots and pads each slot to 256 tokens.
    slot = -(-(args.prompt_len + args.output_len + 16) // 256) * 256
    server = llama_cpp.LlamaServer(
        binaries,
        gguf,
        free_port(),
        gguf.parent / f"llama-server-{kind}.log",
        *("-t", str(THREADS), "-np", str(args.clients), "--cont-batching"),
        *("-c", str(slot * args.clients), "--cache-ram", "0"),
    )
    try:
        server.wait_ready()
    except RuntimeError as err:
        server.stop()
        raise SystemExit(f"llama.cpp {kind}: {err}\n{server.log.read_text()}") from None
    return server


def alternate_single(
    servers: dict[str, tuple[int, str | None]], prompts: list[list[int]], args
) -> dict:
    """Single streams taken in turn from servers that are all up at once (idle ones use no
    CPU): in each of ``--alternate-single`` rounds every server serves one stream, the order
    rotating from round to round, so that a machine whose speed drifts from one minute to the
    next (as these VMs' does) slows every engine alike. Each engine's decode tokens/s by
    round, their medians, and for each pair of maas and llama.cpp rows the median of the
    rounds' ratios."""
    labels = list(servers)
    for label in labels:  # a warm-up stream each
        port, key = servers[label]
        if not stream_one(port, key, prompts[0], 8).ok:
            raise SystemExit(f"{label}: the warm-up stream failed")
    speeds: dict[str, list[float]] = {label: [] for label in labels}
    for round_ in range(args.alternate_single):
        shift = round_ % len(labels)
        for label in labels[shift:] + labels[:shift]:
            port, key = servers[label]
            result = stream_one(port, key, prompts[round_ % len(prompts)], args.output_len)
            if not result.ok:
                raise SystemExit(f"{label}: a single stream failed: {result.error}")
            speeds[label].append((result.output_tokens - 1) / result.decode_seconds)
    ratios = {}
    for maas in (label for label in labels if label.startswith("maas")):
        for llama in (label for label in labels if label.startswith("llama.cpp")):
            pairs = [a / b for a, b in zip(speeds[maas], speeds[llama], strict=True)]
            ratios[f"{maas} / {llama}"] = round(statistics.median(pairs), 2)
    return {
        "rounds": args.alternate_single,
        "tokens_per_s": {label: [round(v, 1) for v in values] for label, values in speeds.items()},
        "median_tokens_per_s": {
            label: round(statistics.median(values), 1) for label, values in speeds.items()
        },
        "ratios": ratios,
    }


# ----------------------------------------------------------------------------- offline baselines


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
        outputs = model.generate_batch(prompts, generation, config, record_timestamps=True)
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
    # lifespan[0] is when the request left the queue, the moment a server would take it up.
    stamps = [o.timestamps for o in outputs.values() if o.timestamps]
    ttfts = [o.timestamps[0] - o.lifespan[0] for o in outputs.values() if o.timestamps]
    return {
        "engine": "transformers (generate_batch)",
        "dtype": dtype,
        "requests": len(outputs),
        "failed": sum(len(o.generated_tokens) != args.output_len for o in outputs.values()),
        "output_tokens_per_s": round(produced / elapsed, 1),
        **latencies(ttfts, token_gaps(stamps)),
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
    stamps: dict[int, list[float]] = {i: [] for i in range(len(tokens))}

    def on_token(step) -> bool:
        stamps[step.batch_id].append(time.perf_counter())
        return False  # True would stop this example

    started = time.perf_counter()
    results = generator.generate_batch(tokens, **options, callback=on_token)
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
    streams = [times for times in stamps.values() if times]
    return {
        "engine": "CTranslate2 (generate_batch)",
        "dtype": compute_type,
        "requests": len(results),
        "failed": sum(len(r.sequences_ids[0]) != args.output_len for r in results),
        "output_tokens_per_s": round(produced / elapsed, 1),
        **latencies(batch_ttfts(streams, started), token_gaps(streams)),
        "single_stream_tokens_per_s": round(statistics.median(single), 1),
        "seconds": round(elapsed, 1),
    }


def token_gaps(streams: list[list[float]]) -> list[float]:
    """The gaps between consecutive token times of each stream."""
    return [later - earlier for times in streams for earlier, later in pairwise(times)]


def batch_ttfts(streams: list[list[float]], started: float) -> list[float]:
    """Each stream's first token time, counted from when its batch could start: the end of the
    last stream to finish before that token, or ``started``."""
    ends = sorted(times[-1] for times in streams)
    ttfts = []
    for times in streams:
        before = bisect.bisect_left(ends, times[0])
        ttfts.append(times[0] - (ends[before - 1] if before else started))
    return ttfts


# ----------------------------------------------------------------------------- report


def report(rows: list[dict], args, build: dict | None, alternated: dict | None = None) -> None:
    print(
        f"\n{args.clients} concurrent streams, {args.requests} requests, "
        f"{args.prompt_len} prompt + {args.output_len} output tokens\n"
    )
    print(
        f"{'engine':<30} {'dtype':<22} {'tok/s':>7} {'TTFT p50':>9} {'p99':>7} "
        f"{'ITL p50':>8} {'p99':>6} {'failed':>6} {'1-stream':>8} {'peak RSS':>9}"
    )
    for row in rows:
        rss = f"{row['peak_rss_mib']} MiB" if "peak_rss_mib" in row else "-"
        dtype = row["dtype"]
        if row.get("runs", dtype) != dtype:  # what auto chose
            dtype = f"{dtype} ({row['runs']})"
        print(
            f"{row['engine']:<30} {dtype:<22} {row['output_tokens_per_s']:>7} "
            f"{row['ttft_p50_ms']:>9} {row['ttft_p99_ms']:>7} "
            f"{row['itl_p50_ms']:>8} {row['itl_p99_ms']:>6} "
            f"{row['failed']:>6} {row['single_stream_tokens_per_s']:>8} {rss:>9}"
        )
    print("\npeak RSS by process (at the tree's peak):")
    for row in rows:
        parts = ", ".join(f"{role} {mib}" for role, mib in row.get("peak_rss_by_process_mib", []))
        print(f"  {row['engine']} {row['dtype']}: {parts} MiB")
    ratios = {**best_maas_ratios(rows), **llama_cpp_ratios(rows, args.clients)}
    for name, ratio in ratios.items():
        print(f"{name}: {ratio:.2f}x")
    if alternated:
        print(f"\nsingle streams taken in turn, {alternated['rounds']} rounds (median tokens/s):")
        for label, speed in alternated["median_tokens_per_s"].items():
            print(f"  {label}: {speed}")
        for name, ratio in alternated["ratios"].items():
            print(f"  {name}, 1 stream: {ratio:.2f}x (median of the rounds' ratios)")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(
        json.dumps(
            {
                "benchmark": "llm_serving",
                "model": MODEL,
                "clients": args.clients,
                "requests": args.requests,
                "prompt_len": args.prompt_len,
                "prompts": args.prompts,
                "output_len": args.output_len,
                "llama_cpp_build": build,
                "results": rows,
                "ratios": ratios,
                "alternated_single": alternated,
            },
            indent=2,
        )
        + "\n"
    )


def best_maas_ratios(rows: list[dict]) -> dict[str, float]:
    """The best maas row's tokens/s over each offline baseline's."""
    maas = [r for r in rows if r["engine"].startswith("maas")]
    if not maas:
        return {}
    best = max(maas, key=lambda r: r["output_tokens_per_s"])
    return {
        f"{best['engine']} {best['dtype']} / {r['engine']} {r['dtype']}": round(
            best["output_tokens_per_s"] / r["output_tokens_per_s"], 2
        )
        for r in rows
        if not r["engine"].startswith(("maas", "llama.cpp"))
    }


def llama_cpp_ratios(rows: list[dict], clients: int) -> dict[str, float]:
    """Each maas row against llama.cpp Q8_0 (C streams, 1 stream, peak RSS), and maas float32
    against llama.cpp F16 on one stream."""
    llama = {r["dtype"]: r for r in rows if r["engine"] == "llama.cpp (llama-server)"}
    ratios = {}
    for row in (r for r in rows if r["engine"].startswith("maas")):
        name = f"{row['engine']} {row['dtype']} / llama.cpp"
        if "Q8_0" in llama:
            q8 = llama["Q8_0"]
            for label, key in (
                (f"{clients} streams", "output_tokens_per_s"),
                ("1 stream", "single_stream_tokens_per_s"),
                ("peak RSS", "peak_rss_mib"),
            ):
                ratios[f"{name} Q8_0, {label}"] = round(row[key] / q8[key], 2)
        if "F16" in llama and row["dtype"] == "float32":
            single = row["single_stream_tokens_per_s"] / llama["F16"]["single_stream_tokens_per_s"]
            ratios[f"{name} F16, 1 stream"] = round(single, 2)
    return ratios


# ----------------------------------------------------------------------------- main


def engine_list(value: str) -> list[str]:
    engines = [name.strip() for name in value.split(",") if name.strip()]
    unknown = sorted(set(engines) - set(ENGINES))
    if unknown or not engines:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(ENGINES)}; got {value!r}")
    return engines


def add_maas_options(parser: argparse.ArgumentParser) -> None:
    """How maas's server runs (``start_maas`` reads them): also bench/distributed.py's."""
    parser.add_argument(
        "--eager",
        action="store_true",
        help="run maas's decode steps eagerly (MAAS_LLM_COMPILE=false), to see what compiling buys",
    )
    parser.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16"),
        help="maas's KV cache dtype (MAAS_LLM_KV_CACHE_DTYPE); auto: the activations'",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        help="maas's local cache (built kernels, measured dtype choices); default: one of the "
        "run's own, so that auto measures at this run's load",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument(
        "--prompts",
        choices=("random", "text"),
        default="random",
        help="random token ids (the runs docs/performance.md quotes), or windows of docs/*.md",
    )
    parser.add_argument(
        "--dtypes", default="auto,float32,bfloat16,int8-weight,int8", help="maas dtypes to run"
    )
    parser.add_argument(
        "--stored",
        default="int4",
        help="versions stored quantized to serve as well (int4, int8; empty for none)",
    )
    parser.add_argument(
        "--engines",
        type=engine_list,
        default=list(ENGINES),
        help=f"comma list of engines to run (default: all of {','.join(ENGINES)})",
    )
    parser.add_argument(
        "--thread-engine",
        action="store_true",
        help="also run each maas dtype with its engine on a thread of the server "
        "(MAAS_LLM_ENGINE_PROCESS=false), right after the row of the engine in its own process",
    )
    add_maas_options(parser)
    parser.add_argument("--single-runs", type=int, default=3)
    parser.add_argument(
        "--alternate-single",
        type=int,
        default=5,
        help="rounds of single streams taken in turn from every maas and llama.cpp server, "
        "all up at once, after the rows (0: none)",
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="where to write the JSON")
    args = parser.parse_args()
    model = demo.DEMO_MODELS[0]
    gguf = demo.locate(model)
    build = None
    if "llama.cpp" in args.engines:
        binaries = llama_cpp.build()
        build = llama_cpp.build_info()
        ggufs = {kind: llama_cpp.quantize(binaries, gguf, kind) for kind in LLAMA_CPP_TYPES}
    from gguf import GGUFReader

    vocab = len(GGUFReader(gguf).fields["tokenizer.ggml.tokens"].data)
    if args.prompts == "text":
        prompts = text_prompts(args.requests, args.prompt_len, gguf)
    else:
        prompts = make_prompts(args.requests, args.prompt_len, vocab)
    rows = []

    def add(row: dict) -> None:
        rows.append(row)
        print(row, flush=True)

    alternated = None
    with tempfile.TemporaryDirectory() as root:
        args.cache_dir = args.cache_dir or Path(root) / "maas-cache"  # every home's, by default
        if "maas" in args.engines:
            home = Path(root) / "home"
            registry = open_registry(Settings(home=home))
            registry.import_model(gguf, MODEL, task=model.task)
            registry.close()
            for dtype in args.dtypes.split(","):
                add(run_maas(home, dtype, prompts, args))
                if args.thread_engine:
                    row = run_maas(home, dtype, prompts, args, THREAD_ENGINE)
                    add({**row, "engine": "maas (engine on a thread)"})
            for method in filter(None, args.stored.split(",")):
                stored = stored_home(Path(root), home, method, model.task)
                add({**run_maas(stored, "auto", prompts, args), "dtype": f"stored {method}"})
        if "llama.cpp" in args.engines:
            for kind, path in ggufs.items():
                add(run_llama_cpp(binaries, path, kind, prompts, args))
        if args.alternate_single and {"maas", "llama.cpp"} <= set(args.engines):
            alternated = run_alternated(
                Path(root), gguf, model.task, binaries, ggufs, prompts, args
            )
        folder = Path(root) / "hf"
        if {"transformers", "ctranslate2"} & set(args.engines):
            export_hf_folder(gguf, folder)
        if "transformers" in args.engines:
            for dtype in ("float32", "bfloat16"):
                add(run_transformers(folder, dtype, prompts, args))
        if "ctranslate2" in args.engines:
            for compute_type in ("float32", "int8"):
                add(run_ctranslate2(folder, compute_type, prompts, args))
    report(rows, args, build, alternated)


def run_alternated(root: Path, gguf: Path, task: str, binaries, ggufs, prompts, args) -> dict:
    """Every maas dtype and llama.cpp file served at once, for ``alternate_single``: each
    maas server in a home of its own (a server's log lives beside its home), sharing the
    run's cache, so that ``auto`` keeps the choice it measured for its row."""
    servers: dict[str, object] = {}
    try:
        for dtype in args.dtypes.split(","):
            home = root / f"alternate-{dtype}" / "home"
            registry = open_registry(Settings(home=home))
            registry.import_model(gguf, MODEL, task=task)
            registry.close()
            servers[f"maas {dtype}"] = start_maas(home, dtype, args)
        for kind, path in ggufs.items():
            servers[f"llama.cpp {kind}"] = start_llama_cpp(binaries, path, kind, args)
        ports = {
            label: (server.port, getattr(server, "admin_key", None))
            for label, server in servers.items()
        }
        result = alternate_single(ports, prompts, args)
    finally:
        for server in servers.values():
            server.stop()
    print(f"single streams in turn: {result}", flush=True)
    return result


if __name__ == "__main__":
    main()
