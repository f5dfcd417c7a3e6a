"""The paged decode attention kernel: the reference's results, read where the blocks lie, the
same whatever the batch, refusals instead of reads outside the cache, and the gathering path
wherever the kernel cannot be built."""

from __future__ import annotations

import pytest
import torch

from maas.runtime.llm import native, paged_attention
from maas.runtime.llm.model import decode_attention
from tests.unit.engine.conftest import greedy, run_to_end, submit, token_ids


@pytest.fixture(autouse=True)
def _kernel_built():
    """Built (once, into the run's cache) when a test first needs it, not at collection."""
    if not paged_attention.available(torch.float32):
        pytest.skip("no C compiler to build the kernel")


def cache_and_batch(dtype, *, kv_heads=3, group=3, head_dim=64, block_size=16, lengths=()):
    generator = torch.Generator().manual_seed(len(lengths) + head_dim)
    blocks = 1 + sum(-(-n // block_size) for n in lengths) + 5
    shape = (blocks, block_size, kv_heads, head_dim)
    k = torch.randn(shape, generator=generator).to(dtype)
    v = torch.randn(shape, generator=generator).to(dtype)
    width = max(-(-n // block_size) for n in lengths) + 1  # padded, as the engine pads
    ids = (torch.randperm(blocks - 1, generator=generator) + 1).tolist()  # out of order
    tables = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        for b in range(-(-n // block_size)):
            tables[row, b] = ids.pop()
    q = torch.randn(len(lengths), kv_heads * group, head_dim, generator=generator).to(dtype)
    return q, k, v, tables, torch.tensor(lengths)


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 2e-6), (torch.bfloat16, 1.6e-2)])
@pytest.mark.parametrize(
    "layout",
    [
        dict(kv_heads=3, group=3, head_dim=64, block_size=16),  # SmolLM2-135M's
        dict(kv_heads=2, group=4, head_dim=128, block_size=32),  # Llama's D, 2 chunks a block
        dict(kv_heads=2, group=1, head_dim=24, block_size=4),  # no grouping, a ragged D
        dict(kv_heads=1, group=4, head_dim=8, block_size=1),
    ],
)
def test_the_kernel_gives_the_reference_attention(dtype, tolerance, layout):
    # one position, whole blocks, one past, long; then split into parts (two, then the most
    # parts a sequence is split into, each longer than the shortest part)
    lengths = (1, 16, 17, 40, 3 * 16, 200, 600, 2300)
    q, k, v, tables, held = cache_and_batch(dtype, lengths=lengths, **layout)
    expected = decode_attention(q, k, v, tables, held)  # blocks gathered, PyTorch's SDPA
    got = decode_attention(q, k, v, tables, held, paged=True)
    assert got.dtype == dtype and got.shape == q.shape
    assert torch.allclose(got.float(), expected.float(), rtol=tolerance, atol=tolerance)
    # exactly what the softmax-weighted values are, written out for one sequence and head
    row, head = 3, 1
    blocks = tables[row, : -(-lengths[row] // layout["block_size"])]
    keys = k[blocks].flatten(0, 1)[: lengths[row], head // layout["group"]].float()
    values = v[blocks].flatten(0, 1)[: lengths[row], head // layout["group"]].float()
    weights = torch.softmax(keys @ q[row, head].float() / layout["head_dim"] ** 0.5, dim=0)
    assert torch.allclose(
        got[row, head].float(), weights @ values, rtol=4 * tolerance, atol=4 * tolerance
    )


@pytest.mark.parametrize(
    ("queries", "cache", "tolerance"),
    [(torch.float32, torch.bfloat16, 2e-6), (torch.bfloat16, torch.float32, 1.6e-2)],
)
def test_queries_of_one_dtype_read_a_cache_of_another(queries, cache, tolerance):
    """float32 activations over a bfloat16 cache (int8 with half the cache): the kernel reads
    the cache's rows as they are and answers in the queries' dtype, as the reference does
    with the gathered rows converted to the queries' dtype (exactly, when that widens)."""
    lengths = (1, 17, 40, 200)
    q, k, v, tables, held = cache_and_batch(cache, lengths=lengths)
    q = q.to(queries)
    expected = decode_attention(q, k, v, tables, held)
    got = decode_attention(q, k, v, tables, held, paged=True)
    assert got.dtype == queries and got.shape == q.shape
    assert torch.allclose(got.float(), expected.float(), rtol=tolerance, atol=tolerance)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        decode_attention(q, k, v.half(), tables, held, paged=True)


@pytest.fixture
def two_threads():
    """Fewer sequences than threads (each on a thread of its own, the rest idle) and more."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_sequences_attention_does_not_depend_on_its_batch(dtype, two_threads):
    q, k, v, tables, held = cache_and_batch(dtype, lengths=(37, 700, 5, 300))
    together = decode_attention(q, k, v, tables, held, paged=True)
    for row in range(4):
        width = -(-int(held[row]) // 16)
        alone = decode_attention(
            q[row : row + 1], k, v, tables[row : row + 1, :width], held[row : row + 1], True
        )
        assert torch.equal(alone[0], together[row])  # bit for bit


def test_lengths_or_blocks_outside_the_cache_are_refused_not_read():
    q, k, v, tables, held = cache_and_batch(torch.float32, lengths=(20, 9))
    outside = tables.clone()
    outside[0, 1] = k.shape[0]  # one past the last block
    with pytest.raises(IndexError, match="outside the KV cache"):
        decode_attention(q, k, v, outside, held, paged=True)
    with pytest.raises(IndexError, match="outside the KV cache"):
        decode_attention(q, k, v, tables, torch.tensor([20, tables.shape[1] * 16 + 1]), True)
    with pytest.raises(IndexError, match="outside the KV cache"):
        decode_attention(q, k, v, tables, torch.tensor([20, 0]), paged=True)
    with pytest.raises(ValueError, match="lengths must be"):
        decode_attention(q, k, v, tables, torch.tensor([20]), paged=True)
    with pytest.raises(ValueError, match="block_tables must be"):
        decode_attention(q, k, v, tables[:1], held, paged=True)


def test_a_compiled_step_calls_the_kernel():
    q, k, v, tables, held = cache_and_batch(torch.float32, lengths=(20, 9, 50))
    compiled = torch.compile(decode_attention, dynamic=True, fullgraph=True)
    got = compiled(q, k, v, tables, held, True)
    assert torch.equal(got, decode_attention(q, k, v, tables, held, paged=True))


@pytest.mark.parametrize(
    ("dtype", "kv_cache"),
    [("float32", torch.float32), ("int8", torch.bfloat16), ("bfloat16", torch.float32)],
)
def test_the_engine_gives_the_same_greedy_tokens_with_and_without_the_kernel(
    make_engine, llama_tokenizer, dtype, kv_cache
):
    prompts = [llama_tokenizer.encode(t) for t in ("the cat sat on the mat", "one two three")]
    outputs = []
    for paged in (True, False):
        kv_name = str(kv_cache).removeprefix("torch.")
        engine = make_engine(dtype=dtype, paged_attention=paged, kv_cache_dtype=kv_name)
        assert engine.runner.cache.dtype == kv_cache
        assert engine.runner.paged_attention is paged
        assert all(block.paged is paged for block in engine.runner.model.blocks)
        deltas = [submit(engine, f"r{i}", p, greedy(40)) for i, p in enumerate(prompts)]
        run_to_end(engine)  # past two blocks, decoding together
        outputs.append([token_ids(d) for d in deltas])
    assert outputs[0] == outputs[1]
    assert all(len(ids) == 40 for ids in outputs[0])


def test_without_a_compiler_the_blocks_are_gathered(make_engine, monkeypatch, tmp_path):
    monkeypatch.setattr(paged_attention.NATIVE, "_library", None)
    monkeypatch.setattr(paged_attention.NATIVE, "_failed", False)
    monkeypatch.setenv("MAAS_CACHE_DIR", str(tmp_path))  # nothing built there yet
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    assert not paged_attention.available(torch.float32)
    assert not (tmp_path / "kernels").exists()
    engine = make_engine(dtype="float32")
    assert engine.runner.paged_attention is False
    deltas = submit(engine, "r", [5, 6, 7], greedy(20))
    run_to_end(engine)
    assert len(token_ids(deltas)) == 20
