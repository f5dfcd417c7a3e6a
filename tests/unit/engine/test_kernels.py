"""The model's CPU kernels: packed and int8 linear layers, and the attention of a mixed step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from maas.runtime.llm.kernels import Int8Linear, PackedLinear, quantize_linears, weight_bytes
from maas.runtime.llm.model import (
    AttentionPlan,
    DecodeRows,
    KVCache,
    PrefillRows,
    StepInput,
    attention,
    write_cache,
)
from tests.unit.engine.conftest import greedy, run_to_end, submit, token_ids


@pytest.fixture
def linear() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(64, 48, bias=True)


def test_packed_linear_equals_the_plain_linear(linear):
    x = torch.randn(5, 64)
    expected = F.linear(x, linear.weight, linear.bias)
    assert torch.allclose(PackedLinear(linear)(x), expected, atol=1e-5)


def test_int8_linear_is_within_quantisation_error_of_the_float_one(linear):
    x = torch.randn(7, 64)
    expected = F.linear(x, linear.weight, linear.bias)
    got = Int8Linear(linear)(x)
    relative = (got - expected).norm() / expected.norm()
    assert 0 < relative < 0.02  # quantised (not equal), yet close


def test_int8_linear_rows_do_not_depend_on_the_other_rows(linear):
    """Per-token scales and exact int32 sums: batching never changes a sequence's numbers."""
    layer = Int8Linear(linear)
    batch = torch.randn(9, 64) * torch.linspace(0.1, 10, 9)[:, None]  # rows of varied scale
    together = layer(batch)
    for row in range(9):
        assert torch.equal(layer(batch[row : row + 1]), together[row : row + 1])


def test_int8_linears_are_counted_at_a_byte_a_weight(linear):
    model = nn.Sequential(linear, nn.LayerNorm(48))
    floats = weight_bytes(model)
    assert quantize_linears(model) == 1
    assert isinstance(model[0], Int8Linear)
    # 64*48 weights: 4 bytes each before, 1 after; the 48 scales and the rest stay float32,
    # and the kernel's 48 int32 row sums are added
    assert weight_bytes(model) == floats - 64 * 48 * 3 + 48 * 4 + 48 * 4


def reference_attention(q, k, v, length: int, causal_from: int | None = None):
    """Naive attention of queries [n, heads, D] over keys/values [L, kv_heads, D]."""
    heads, kv_heads = q.shape[1], k.shape[1]
    k = k[:length].repeat_interleave(heads // kv_heads, dim=1)
    v = v[:length].repeat_interleave(heads // kv_heads, dim=1)
    scores = torch.einsum("nhd,lhd->hnl", q, k) / q.shape[-1] ** 0.5
    if causal_from is not None:  # query i sits at position causal_from + i
        positions = torch.arange(q.shape[0])[:, None] + causal_from
        scores = scores.masked_fill(torch.arange(length)[None, :] > positions, float("-inf"))
    return torch.einsum("hnl,lhd->nhd", scores.softmax(-1), v)


CONFIG = type("C", (), {"num_kv_heads": 2, "head_dim": 8, "num_layers": 1})()


def test_attention_of_a_step_mixing_decodes_in_scattered_blocks_and_a_prompt_chunk():
    torch.manual_seed(1)
    cache = KVCache(CONFIG, num_blocks=12, block_size=4, dtype=torch.float32)
    cache.k[0].normal_()
    cache.v[0].normal_()
    tables = {"a": [7, 2], "b": [3, 11, 5], "c": [9, 4]}  # out of order, as a pool hands out

    def held(name):  # [positions, kv heads, D] of a sequence, in order
        blocks = torch.tensor(tables[name])
        return cache.k[0][blocks].flatten(0, 1), cache.v[0][blocks].flatten(0, 1)

    # decoding: a at length 5, b at length 9; a 3-token chunk of c after 4 cached positions
    step = StepInput(
        input_ids=torch.zeros(5, dtype=torch.long),
        positions=torch.tensor([4, 8, 4, 5, 6]),
        cache_index=torch.zeros(5, dtype=torch.long),
        decode=DecodeRows(2, torch.tensor([[7, 2, 0], [3, 11, 5]]), torch.tensor([5, 9])),
        prefills=[PrefillRows(start=2, end=5, blocks=torch.tensor(tables["c"]), past=4)],
        logits_rows=torch.tensor([0, 1, 4]),
    )
    q = torch.randn(5, 4, 8)
    got = attention(q, AttentionPlan(step), cache.k[0], cache.v[0])
    expected = torch.cat(
        [
            reference_attention(q[0:1], *held("a"), 5),
            reference_attention(q[1:2], *held("b"), 9),
            reference_attention(q[2:5], *held("c"), 7, causal_from=4),
        ]
    )
    assert torch.allclose(got, expected, atol=1e-5)


def test_keys_and_values_are_written_where_attention_reads_them():
    cache = KVCache(CONFIG, num_blocks=4, block_size=4, dtype=torch.float32)
    index = torch.tensor([2 * 4 + 3, 3 * 4 + 0, 3 * 4 + 1, 1 * 4 + 2])  # (block, offset)
    k, v = torch.randn(4, 2, 8), torch.randn(4, 2, 8)
    write_cache(cache.k[0], cache.v[0], index, k, v)
    for token, (block, offset) in enumerate([(2, 3), (3, 0), (3, 1), (1, 2)]):
        assert torch.equal(cache.k[0][block, offset], k[token])
        assert torch.equal(cache.v[0][block, offset], v[token])
    assert int((cache.k[0] != 0).sum()) == 4 * 2 * 8  # nothing else written


def test_int8_engine_greedy_output_does_not_depend_on_the_batch(make_engine, llama_tokenizer):
    prompts = [
        llama_tokenizer.encode(text)
        for text in ("the quick brown fox", "paris is the capital of", "one two three four five")
    ]

    def alone(prompt):
        engine = make_engine(dtype="int8")
        deltas = submit(engine, "r", prompt, greedy(16))
        run_to_end(engine)
        return token_ids(deltas)

    engine = make_engine(dtype="int8")
    together = [submit(engine, f"r{i}", p, greedy(16)) for i, p in enumerate(prompts)]
    run_to_end(engine)
    assert [token_ids(d) for d in together] == [alone(p) for p in prompts]
