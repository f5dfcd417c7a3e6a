"""Memory of `make serve`'s server, idle and under load: the KV cache committed at load (the
old default: a fixed 2 GiB), the derived budget committed at load, and the derived budget
committed as tokens fill it (the new default), in one run.

Each configuration starts a real `maas serve` with both demo models pinned, as `make serve`
does, and measures the resident memory (RSS) of the server's whole process tree (the server
and its LLM engine process): once ready and idle, then its peak while C streaming clients send
``--requests`` completions of ``--prompt-len`` + ``--output-len`` tokens (the workload of
bench/llm_serving.py), then idle again after the load. Output tokens/s and time to first token
show what committing pages as they are used costs.

    .venv/bin/python bench/serve_memory.py [--clients 32] [--requests 64]

Needs the bench extra (geventhttpclient). Takes about 3 minutes; run it with nothing else busy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import gevent

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llm_serving import drive, make_prompts, percentile  # noqa: E402
from process_memory import tree_rss  # noqa: E402

from maas.config import Settings  # noqa: E402
from maas.registry import demo, open_registry  # noqa: E402
from tests.e2e.conftest import Server  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "serve_memory.json"
GiB = 1024**3
CONFIGURATIONS = {
    "committed 2 GiB (old default)": {
        "MAAS_LLM_KV_CACHE_BYTES": str(2 * GiB),
        "MAAS_LLM_KV_CACHE_COMMIT": "true",
    },
    "derived, committed at load": {"MAAS_LLM_KV_CACHE_COMMIT": "true"},
    "derived, committed on use (new default)": {},
}


def settle(pid: int, seconds: float = 3.0) -> int:
    time.sleep(seconds)
    return tree_rss(pid)


def measure(home: Path, env: dict[str, str], prompts: list[list[int]], args) -> dict:
    env = {"MAAS_PIN_MODELS": ",".join(m.name for m in demo.DEMO_MODELS), **env}
    server = Server(home, env=env)
    try:
        server.wait_ready(timeout=300)
        pid = server.process.pid
        idle = settle(pid)
        peak = [idle]
        sampling = True

        def sample() -> None:
            while sampling:
                peak.append(tree_rss(pid))
                gevent.sleep(0.25)

        sampler = gevent.spawn(sample)
        results, elapsed = drive(
            server.port, server.admin_key, prompts, args.clients, args.output_len
        )
        sampling = False
        sampler.join()
        after = settle(pid)
    finally:
        server.stop()
    good = [r for r in results if r.ok]
    return {
        "idle_rss_gib": round(idle / GiB, 2),
        "peak_rss_gib": round(max(peak) / GiB, 2),
        "idle_after_load_rss_gib": round(after / GiB, 2),
        "failed": len(results) - len(good),
        "output_tokens_per_s": round(sum(r.output_tokens for r in good) / elapsed, 1),
        "ttft_p50_ms": round(percentile([r.ttft for r in good], 0.5) * 1000, 1),
        "itl_p50_ms": round(
            statistics.median(gap for r in good for gap in r.gaps) * 1000 if good else 0.0, 1
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    args = parser.parse_args()
    prompts = make_prompts(args.requests, args.prompt_len, vocab=49152)
    rows = {}
    with tempfile.TemporaryDirectory() as scratch:
        home = Path(scratch) / "home"
        registry = open_registry(Settings(home=home))
        try:
            demo.prepare(registry)
        finally:
            registry.close()
        for name, env in CONFIGURATIONS.items():
            rows[name] = measure(home, env, prompts, args)
            print(name, rows[name], flush=True)
    old, new = rows[next(iter(rows))], rows[list(rows)[-1]]
    print(f"\n{'configuration':42} {'idle':>6} {'peak':>6} {'after':>6} {'tok/s':>7} {'TTFT':>7}")
    for name, row in rows.items():
        print(
            f"{name:42} {row['idle_rss_gib']:>5}G {row['peak_rss_gib']:>5}G "
            f"{row['idle_after_load_rss_gib']:>5}G {row['output_tokens_per_s']:>7} "
            f"{row['ttft_p50_ms']:>5}ms"
        )
    print(
        f"new/old: idle x{new['idle_rss_gib'] / old['idle_rss_gib']:.2f}, "
        f"peak x{new['peak_rss_gib'] / old['peak_rss_gib']:.2f}, "
        f"tokens/s x{new['output_tokens_per_s'] / old['output_tokens_per_s']:.2f}"
    )
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
