"""The KV cache's size is derived from what the sequences need, and its memory is taken as
blocks are first written unless it is committed at load."""

from __future__ import annotations

import os

import torch

from maas.runtime.llm.model import KVCache
from maas.runtime.llm.runner import KV_CACHE_SHARE, RunnerOptions, kv_cache_budget

MiB = 1024**2
CONFIG = type("C", (), {"num_kv_heads": 4, "head_dim": 64, "num_layers": 4})()


def rss() -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def test_the_budget_is_what_the_sequences_need_or_the_set_value_and_never_past_a_share():
    per_sequence = 10 * MiB
    assert kv_cache_budget(RunnerOptions(max_sequences=8), per_sequence) == 80 * MiB
    set_budget = RunnerOptions(max_sequences=8, kv_cache_bytes=30 * MiB)
    assert kv_cache_budget(set_budget, per_sequence) == 30 * MiB
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    huge = kv_cache_budget(RunnerOptions(max_sequences=1024), memory // 100)
    assert huge == memory // KV_CACHE_SHARE


def test_an_uncommitted_cache_takes_memory_only_where_tokens_are_written():
    blocks = 2048  # 4 layers x 2 x 2048 blocks x 16 positions x 4 heads x 64 x 4 B = 256 MiB
    before = rss()
    cache = KVCache(CONFIG, blocks, 16, torch.float32)
    assert rss() - before < 16 * MiB, "an idle cache must not hold its memory"
    for layer in range(CONFIG.num_layers):  # one sequence of 112 tokens in blocks 1 to 7
        cache.k[layer][1:8] = 1.0
        cache.v[layer][1:8] = 1.0
    assert rss() - before < 16 * MiB
    assert float(cache.k[0][8:].abs().sum()) == 0.0  # untouched blocks read as zeros
    assert float(cache.k[0][1:8].mean()) == 1.0


def test_a_committed_cache_holds_its_memory_from_the_start():
    before = rss()
    cache = KVCache(CONFIG, 511, 16, torch.float32, commit=True)  # 512 blocks: 64 MiB
    assert rss() - before > 56 * MiB
    assert float(cache.v[3].abs().sum()) == 0.0
