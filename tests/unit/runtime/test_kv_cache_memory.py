"""The KV cache's size is derived from what the slots need, and its memory is taken as tokens
fill it unless it is committed at load."""

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


def test_the_budget_is_what_the_slots_need_or_the_set_value_and_never_past_a_share_of_memory():
    per_slot = 10 * MiB
    assert kv_cache_budget(RunnerOptions(max_sequences=8), per_slot) == 80 * MiB
    assert kv_cache_budget(RunnerOptions(max_sequences=8, kv_cache_bytes=30 * MiB), per_slot) == (
        30 * MiB
    )
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    huge = kv_cache_budget(RunnerOptions(max_sequences=1024), memory // 100)
    assert huge == memory // KV_CACHE_SHARE


def test_an_uncommitted_cache_takes_memory_only_where_tokens_are_written():
    slots, max_len = 16, 2048  # 4 layers x 2 x 16 slots x 4 heads x 2048 x 64 x 4 B = 256 MiB
    before = rss()
    cache = KVCache(CONFIG, slots, max_len, torch.float32)
    assert rss() - before < 16 * MiB, "an idle cache must not hold its memory"
    for layer in range(CONFIG.num_layers):  # one sequence of 100 tokens in slot 0
        cache.k[layer][0, :, :, :100] = 1.0
        cache.v[layer][0, :, :100] = 1.0
    assert rss() - before < 16 * MiB
    assert float(cache.k[0][1].abs().sum()) == 0.0  # untouched slots read as zeros
    assert float(cache.k[0][0, :, :, :100].mean()) == 1.0


def test_a_committed_cache_holds_its_memory_from_the_start():
    before = rss()
    cache = KVCache(CONFIG, 4, 2048, torch.float32, commit=True)  # 64 MiB
    assert rss() - before > 56 * MiB
    assert float(cache.v[3].abs().sum()) == 0.0
