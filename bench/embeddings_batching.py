"""Embeddings over HTTP with dynamic batching on and off, in one run.

A real `maas serve` process serves the demo all-MiniLM-L6-v2; 32 concurrent clients each send
64 requests of one short sentence. The clients are greenlets with ``geventhttpclient`` (the
client tritonclient and Locust use), so the load generator takes little of the 2 cores the
server also runs on. The model's batching is switched through the management API between
rounds: on is max_batch_size=32, max_delay_ms=5; off is max_batch_size=1. Rounds alternate
(on, off, on, off) so drift hits both alike; figures are per mode over all its rounds.

    .venv/bin/python bench/embeddings_batching.py [--clients 32] [--requests 64] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
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

RESULTS = Path(__file__).parent / "results" / "embeddings_batching.json"
MODEL = "all-minilm-l6-v2"
MODES = {"on": {"max_batch_size": 32, "max_delay_ms": 5}, "off": {"max_batch_size": 1}}
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "near", "river"]


def sentence(client: int, number: int) -> str:
    words = [WORDS[(client * 7 + number * 3 + i) % len(WORDS)] for i in range(6 + number % 5)]
    return " ".join(words).capitalize() + "."


def one_client(server: Server, client: int, requests: int, latencies: list[float]) -> None:
    http = HTTPClient("127.0.0.1", server.port, concurrency=1, network_timeout=120)
    headers = {"Authorization": f"Bearer {server.admin_key}", "Content-Type": "application/json"}
    try:
        for number in range(requests):
            body = json.dumps({"model": MODEL, "input": sentence(client, number)})
            started = time.perf_counter()
            response = http.post("/v1/embeddings", body=body, headers=headers)
            data = response.read()
            latencies.append(time.perf_counter() - started)
            if response.status_code != 200:
                raise RuntimeError(f"{response.status_code}: {data[:200]!r}")
    finally:
        http.close()


def one_round(server: Server, clients: int, requests: int) -> tuple[float, list[float]]:
    latencies: list[float] = []
    pool = Pool(clients)
    started = time.perf_counter()
    for client in range(clients):
        pool.spawn(one_client, server, client, requests, latencies)
    pool.join(raise_error=True)
    return time.perf_counter() - started, latencies


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=64, help="requests per client")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per mode")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        home = Path(root) / "home"
        registry = open_registry(Settings(home=home))
        minilm = demo.DEMO_MODELS[1]
        registry.import_model(demo.locate(minilm), MODEL, task="embeddings")
        registry.close()
        server = Server(home)
        try:
            server.wait_ready()
            warm = {"model": MODEL, "input": "warm up"}
            server.admin.post("/v1/embeddings", json=warm).raise_for_status()
            totals: dict[str, list] = {mode: [0.0, []] for mode in MODES}
            for _ in range(args.rounds):
                for mode, serving in MODES.items():
                    path = f"/api/v1/models/{MODEL}"
                    server.admin.patch(path, json={"serving": serving}).raise_for_status()
                    elapsed, latencies = one_round(server, args.clients, args.requests)
                    totals[mode][0] += elapsed
                    totals[mode][1] += latencies
        finally:
            server.stop()
    report(totals, args)


def report(totals: dict, args) -> None:
    rows = {}
    for mode, (elapsed, latencies) in totals.items():
        latencies.sort()
        rows[mode] = {
            "requests": len(latencies),
            "requests_per_second": round(len(latencies) / elapsed, 1),
            "p50_ms": round(statistics.median(latencies) * 1000, 1),
            "p99_ms": round(latencies[int(0.99 * (len(latencies) - 1))] * 1000, 1),
        }
    ratio = rows["on"]["requests_per_second"] / rows["off"]["requests_per_second"]
    print(f"{args.clients} clients x {args.requests} requests x {args.rounds} rounds per mode")
    print(f"{'batching':<9} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'requests':>9}")
    for mode, row in rows.items():
        figures = f"{row['requests_per_second']:>8} {row['p50_ms']:>8} {row['p99_ms']:>8}"
        print(f"{mode:<9} {figures} {row['requests']:>9}")
    print(f"throughput with batching on / off: {ratio:.2f}x")
    RESULTS.parent.mkdir(exist_ok=True)
    report_json = {
        "benchmark": "embeddings_batching",
        "model": MODEL,
        "clients": args.clients,
        "requests_per_client": args.requests,
        "rounds_per_mode": args.rounds,
        "modes": MODES,
        "results": rows,
        "throughput_ratio_on_over_off": round(ratio, 2),
    }
    RESULTS.write_text(json.dumps(report_json, indent=2) + "\n")


if __name__ == "__main__":
    main()
