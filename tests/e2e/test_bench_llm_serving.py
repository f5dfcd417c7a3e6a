"""bench/llm_serving.py still runs: issue 10's measuring tool, run as docs/performance.md
runs it, but small (maas alone, float32 eagerly, 2 streams of 8 + 4 tokens, prompts from
the documentation's text). Nothing here times anything; speed is measured by running the
benchmark itself, alone on the machine.
Its server start once broke with a KeyError that no test saw (fixed in 439d486)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]


def test_the_serving_benchmark_runs_maas_and_writes_its_row(tmp_path):
    results = tmp_path / "llm_serving.json"
    command = [
        sys.executable,
        str(ROOT / "bench" / "llm_serving.py"),
        "--engines", "maas",
        "--dtypes", "float32",
        "--stored", "",
        "--eager",
        "--cache-dir", os.environ["MAAS_CACHE_DIR"],  # the kernels the suite built
        "--clients", "2",
        "--requests", "3",
        "--prompt-len", "8",
        "--output-len", "4",
        "--prompts", "text",  # windows of docs/*.md through the demo's tokenizer
        "--single-runs", "1",
        "--results", str(results),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]
    body = json.loads(results.read_text())
    assert (body["clients"], body["prompt_len"], body["output_len"]) == (2, 8, 4)
    assert body["prompts"] == "text"
    (row,) = body["results"]
    assert (row["engine"], row["dtype"], row["runs"]) == ("maas", "float32", "float32")
    assert row["compiled_rows"] == 0  # --eager reached the server
    assert (row["requests"], row["failed"]) == (3, 0), row["errors"]
    assert row["output_tokens_per_s"] > 0 and row["single_stream_tokens_per_s"] > 0
    assert row["ttft_p50_ms"] > 0 and row["itl_p99_ms"] >= row["itl_p50_ms"] > 0
    roles = [role for role, _ in row["peak_rss_by_process_mib"]]
    assert "server" in roles and len(roles) >= 2  # the server and its engine process
    parts = [mib for _, mib in row["peak_rss_by_process_mib"]]  # each rounded to a MiB
    assert abs(row["peak_rss_mib"] - sum(parts)) <= len(parts) and row["peak_rss_mib"] > 100
    assert "maas" in done.stdout and "float32" in done.stdout
