"""A Llama-family decoder in plain PyTorch, for batches that mix decoding and prefill.

Tokens of every sequence in a step are flattened into one batch, so the matmuls (q/k/v, o,
gate/up, down: fused where the shapes allow) run once per layer over all of them; only
attention is split: decoding tokens attend together over their blocks, each prefill chunk
attends over its own with a lower-right causal mask. Keys and values live in a paged cache
(``KVCache``): a pool of fixed-size blocks; each sequence's block table says which hold it.

A step of decoding tokens only (the steady state) can run each layer through one compiled
function (``Block.decode``, see runtime/llm/compiled.py); decode attention reads the cached
blocks in place with a C kernel (paged_attention.py) or, without it, gathers them for
PyTorch's fused attention. The general ``Block.forward`` is the reference and the fallback.
"""

from __future__ import annotations

import math
import mmap
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maas.runtime.llm import paged_attention
from maas.runtime.llm.config import LlamaConfig


@dataclass
class DecodeRows:
    """The first ``count`` tokens of a batch: one decoding token per sequence."""

    count: int
    block_tables: Tensor
    """int64 [count, blocks]: each decoding sequence's blocks, padded with block 0."""
    lengths: Tensor
    """int64 [count]: tokens each sequence has in cache after this step."""


@dataclass
class PrefillRows:
    """Tokens ``start:end`` of a batch: a chunk of one sequence's prompt."""

    start: int
    end: int
    blocks: Tensor
    """int64 [n]: the sequence's blocks, enough for every position up to the chunk's end."""
    past: int
    """Tokens of this sequence already in the cache before the chunk."""


@dataclass
class StepInput:
    input_ids: Tensor
    """int64 [T]: decoding tokens first, then prefill chunks."""
    positions: Tensor
    """int64 [T]."""
    cache_index: Tensor
    """int64 [T]: where each token's key and value go (block * block_size + offset)."""
    decode: DecodeRows | None
    prefills: list[PrefillRows]
    logits_rows: Tensor
    """int64 [N]: the tokens whose next-token logits are wanted."""


class KVCache:
    """Keys and values of every layer: [blocks, block_size, kv_heads, head_dim] each, block 0
    the null block that padding rows use (see maas.engine.kv_cache)."""

    def __init__(
        self,
        config: LlamaConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        *,
        commit: bool = False,
        num_layers: int | None = None,
    ):
        """``num_blocks`` usable blocks; one more, the null block, is made. ``num_layers``:
        the layers this cache serves (a pipeline stage's), all of the model's by default."""
        shape = (num_blocks + 1, block_size, config.num_kv_heads, config.head_dim)
        layers = config.num_layers if num_layers is None else num_layers
        self.k = [_zeros(shape, dtype, commit) for _ in range(layers)]
        self.v = [_zeros(shape, dtype, commit) for _ in range(layers)]
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.dtype = dtype

    @staticmethod
    def bytes_per_block(config: LlamaConfig, block_size: int, dtype: torch.dtype) -> int:
        element = torch.tensor([], dtype=dtype).element_size()
        return 2 * config.num_layers * config.num_kv_heads * block_size * config.head_dim * element

    @property
    def nbytes(self) -> int:
        """What the cache's tensors take, the null block included."""
        return sum(t.nbytes for t in self.k + self.v)

    @property
    def capacity(self) -> int:
        """Positions the pool holds in all."""
        return self.num_blocks * self.block_size


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, commit: bool) -> Tensor:
    """Zeros in fresh anonymous memory (the kernel's pages read as zero until written).

    ``commit`` touches every page now, at load, as vLLM and llama.cpp do: first writes into
    fresh pages cost ~3 s a GiB on the development VM, which then never fall on a request, and
    transparent huge pages are asked for (fewer faults, fewer TLB misses). Otherwise pages are
    committed as tokens fill them, in 4 KiB steps (huge pages are refused: one token would
    commit 2 MiB), so an idle model holds no KV memory and a busy one only what it has used."""
    element = torch.tensor([], dtype=dtype).element_size()
    size = max(1, math.prod(shape) * element)
    memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    advice = "MADV_HUGEPAGE" if commit else "MADV_NOHUGEPAGE"
    if hasattr(mmap, advice):
        memory.madvise(getattr(mmap, advice))
    with warnings.catch_warnings():  # torch warns about any Python buffer; this one is ours
        warnings.simplefilter("ignore")
        raw = torch.frombuffer(memory, dtype=torch.uint8)
    if commit:
        raw.zero_()
    return raw.view(dtype).view(shape)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        normed = F.rms_norm(x.float(), self.weight.shape, None, self.eps)  # as transformers:
        return self.weight * normed.to(x.dtype)  # normalise in float32, scale in the dtype


class Block(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        c = config
        self.heads, self.kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        q_size, kv_size = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        self.sizes = (q_size, kv_size, kv_size)
        self.input_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.qkv = nn.Linear(c.hidden_size, q_size + 2 * kv_size, bias=c.attention_bias)
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps) if c.qk_norm else None
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps) if c.qk_norm else None
        self.o = nn.Linear(q_size, c.hidden_size, bias=False)
        self.post_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.gate_up = nn.Linear(c.hidden_size, 2 * c.intermediate_size, bias=False)
        self.down = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)
        self.paged = False
        """Decode attention reads the cache in place (paged_attention.py); set at load."""

    def forward(
        self,
        x: Tensor,
        rope: Rope,
        plan: AttentionPlan,
        k_cache: Tensor,
        v_cache: Tensor,
        parts: tuple[Callable, Callable] | None = None,
    ) -> Tensor:
        """Any step. ``parts``: ``layer_qkv`` and ``layer_out`` compiled, around attention
        (which stays eager: its prompt chunks vary in number)."""
        qkv, out = parts or (layer_qkv, layer_out)
        q, k, v = qkv(self, x, rope.cos, rope.sin)
        write_cache(k_cache, v_cache, plan.cache_index, k, v)
        return out(self, x, attention(q, plan, k_cache, v_cache, paged=self.paged))

    def decode(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
        cache_index: Tensor,
        block_tables: Tensor,
        lengths: Tensor,
    ) -> Tensor:
        """One decoding token per sequence, all tensors in and out, so that torch.compile can
        fuse the layer whole, attention through PyTorch's fused kernel (``fused``)."""
        q, k, v = self._qkv(x, cos, sin)
        write_cache(k_cache, v_cache, cache_index, k, v)
        attended = decode_attention(q, k_cache, v_cache, block_tables, lengths, self.paged)
        return self._out(x, attended)

    def _qkv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys and values ([tokens, heads, head_dim]), rotated."""
        tokens = x.shape[0]
        qkv = self.qkv(self.input_norm(x))
        v = qkv[:, self.sizes[0] + self.sizes[1] :].view(tokens, self.kv_heads, self.head_dim)
        qk = qkv[:, : self.sizes[0] + self.sizes[1]].view(tokens, -1, self.head_dim)
        if self.q_norm is not None:
            qk = torch.cat((self.q_norm(qk[:, : self.heads]), self.k_norm(qk[:, self.heads :])), 1)
        qk = rotate(qk, cos, sin)  # q and k in one go
        return qk[:, : self.heads], qk[:, self.heads :], v

    def _out(self, x: Tensor, attended: Tensor) -> Tensor:
        x = x + self.o(attended.reshape(x.shape[0], -1))
        gate, up = self.gate_up(self.post_norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


def layer_qkv(block: Block, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """A layer's part before attention, as a free function: compiled once for every layer."""
    return block._qkv(x, cos, sin)


def layer_out(block: Block, x: Tensor, attended: Tensor) -> Tensor:
    """A layer's part after attention, as a free function: compiled once for every layer."""
    return block._out(x, attended)


def decode_layers(
    blocks: tuple[Block, ...],
    x: Tensor,
    cos: Tensor,
    sin: Tensor,
    k_caches: tuple[Tensor, ...],
    v_caches: tuple[Tensor, ...],
    cache_index: Tensor,
    block_tables: Tensor,
    lengths: Tensor,
) -> Tensor:
    """Consecutive layers' ``decode`` as one free function: compiled once, it serves every
    group of as many layers (see compiled.LAYERS_PER_CALL)."""
    for block, k_cache, v_cache in zip(blocks, k_caches, v_caches, strict=True):
        x = block.decode(x, cos, sin, k_cache, v_cache, cache_index, block_tables, lengths)
    return x


class LlamaModel(nn.Module):
    """The whole model, or one pipeline stage of it: the decoder blocks ``layers`` (all by
    default), with the embedding if they start at block 0 and the final norm and LM head if
    they end at the last block. A stage without the embedding takes hidden states; one
    without the head gives them (see maas.distributed.pipeline)."""

    def __init__(self, config: LlamaConfig, layers: range | None = None) -> None:
        super().__init__()
        self.config = config
        self.layers = range(config.num_layers) if layers is None else layers
        first, last = self.layers.start == 0, self.layers.stop == config.num_layers
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size) if first else None
        self.blocks = nn.ModuleList(Block(config) for _ in self.layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if last else None
        self.lm_head = (
            nn.Linear(config.hidden_size, config.vocab_size, bias=False) if last else None
        )
        if config.tie_word_embeddings and first and last:
            self.lm_head.weight = self.embed.weight
        inv_freq = rope_frequencies(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.decode_layers = None
        """``decode_layers`` compiled (set by the runner); decode-only steps of at most
        ``compiled_rows`` sequences then use it (where it was measured faster than eager)."""
        self.compiled_rows = 0
        self.layers_per_call = 1
        """Layers each call of the compiled ``decode_layers`` runs (the last call, the rest)."""
        self.prefill_parts: tuple[Callable, Callable] | None = None
        """``layer_qkv`` and ``layer_out`` compiled (set by the runner), for every other step."""

    def use_paged_attention(self, on: bool) -> None:
        for block in self.blocks:
            block.paged = on

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (the norms stay in it whatever the linears become)."""
        return self.blocks[0].input_norm.weight.dtype

    @torch.inference_mode()
    def forward(self, step: StepInput, cache: KVCache, hidden: Tensor | None = None) -> Tensor:
        """Logits (float32) of the tokens in ``step.logits_rows``, writing every token's
        keys and values into the cache. A stage without the embedding starts from
        ``hidden`` ([T, hidden_size]); one without the head returns every token's hidden
        state."""
        x = self.embed(step.input_ids).to(self.dtype) if self.embed is not None else hidden
        rope = Rope(step.positions, self.inv_freq, x.dtype)
        decode = step.decode
        compiled = decode is not None and not step.prefills and decode.count <= self.compiled_rows
        if self.decode_layers is not None and compiled:
            group = self.layers_per_call
            blocks = tuple(self.blocks)  # a slice of the ModuleList would build a new module
            for first in range(0, len(blocks), group):
                x = self.decode_layers(
                    blocks[first : first + group],
                    x,
                    rope.cos,
                    rope.sin,
                    tuple(cache.k[first : first + group]),
                    tuple(cache.v[first : first + group]),
                    step.cache_index,
                    decode.block_tables,
                    decode.lengths,
                )
        else:
            plan = AttentionPlan(step)
            for layer, block in enumerate(self.blocks):
                x = block(x, rope, plan, cache.k[layer], cache.v[layer], self.prefill_parts)
        if self.lm_head is None:
            return x
        x = self.norm(x[step.logits_rows])
        return self.lm_head(x).float()


class Rope:
    """Rotary position embedding of one step's tokens, in the half-split layout of Hugging Face
    checkpoints: x * cos + rotate_half(x) * sin, with the sign folded into the sine table."""

    def __init__(self, positions: Tensor, inv_freq: Tensor, dtype: torch.dtype) -> None:
        angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
        cos, sin = torch.cos(angles), torch.sin(angles)
        self.cos = torch.cat((cos, cos), dim=-1)[:, None, :].to(dtype)
        self.sin = torch.cat((-sin, sin), dim=-1)[:, None, :].to(dtype)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``x``: [tokens, heads, head_dim]; ``cos``, ``sin``: [tokens, 1, head_dim] (Rope's)."""
    swapped = x.roll(x.shape[-1] // 2, dims=-1)  # (x2, x1)
    return torch.addcmul(x * cos, swapped, sin)


def write_cache(k_cache: Tensor, v_cache: Tensor, index: Tensor, k: Tensor, v: Tensor) -> None:
    """Put the step's keys and values ([T, kv_heads, head_dim]) at their flat positions, in
    the cache's dtype (a bfloat16 cache may serve float32 activations)."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, index, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, index, v.to(v_cache.dtype))


class AttentionPlan:
    """What every layer's attention needs to know about the step."""

    def __init__(self, step: StepInput) -> None:
        self.decode = step.decode
        self.prefills = step.prefills
        self.cache_index = step.cache_index


def attention(
    q: Tensor, plan: AttentionPlan, k_cache: Tensor, v_cache: Tensor, *, paged: bool = False
) -> Tensor:
    """[T, heads, head_dim] attention outputs for the flattened batch."""
    decode = plan.decode
    if decode is not None and not plan.prefills:
        return decode_attention(q, k_cache, v_cache, decode.block_tables, decode.lengths, paged)
    out = torch.empty_like(q)
    if decode is not None:
        rows = decode.count
        out[:rows] = decode_attention(
            q[:rows], k_cache, v_cache, decode.block_tables, decode.lengths, paged
        )
    for chunk in plan.prefills:
        out[chunk.start : chunk.end] = _prefill_attention(
            q[chunk.start : chunk.end], chunk, k_cache, v_cache
        )
    return out


def decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    lengths: Tensor,
    paged: bool = False,
) -> Tensor:
    """One query per sequence ([S, heads, head_dim]) over its first ``lengths`` cached
    positions. ``paged``: the C kernel reads the blocks where they lie (paged_attention.py).
    Otherwise, the reference: the sequences' blocks gathered, then PyTorch's fused attention
    (``scaled_dot_product_attention``) with a kv head's group of query heads as its query rows.

    With its CPU kernel, a compiled step of 32 demo bfloat16 sequences took 67 ms instead of
    105 with the products written as multiply-and-sum loops for inductor, and an eager
    float32 one 106 ms instead of 136 with two batched matrix products and blocks gathered by
    indexing (bench/llm_step_profile.py, Intel Xeon, 2 cores). Each
    sequence's row is computed apart from the others', and masked positions add exact zeros,
    so a sequence's result does not depend on its batch."""
    if paged:
        return paged_attention.paged_decode_attention(q, k_cache, v_cache, block_tables, lengths)
    count, blocks = block_tables.shape
    block_size, kv_heads, head_dim = k_cache.shape[1:]
    heads = q.shape[1]
    span = blocks * block_size
    blocks_held = block_tables.flatten()  # index_select copies whole blocks: 1.5x indexing's speed
    keys = k_cache.index_select(0, blocks_held).view(count, span, kv_heads, head_dim)
    values = v_cache.index_select(0, blocks_held).view(count, span, kv_heads, head_dim)
    keys, values = keys.to(q.dtype), values.to(q.dtype)  # from a cache of another dtype
    keys, values = keys.transpose(1, 2), values.transpose(1, 2)
    q = q.view(count, kv_heads, heads // kv_heads, head_dim)
    held = torch.arange(span, device=lengths.device)[None, :] < lengths[:, None]  # [S, L]
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=held[:, None, None, :])
    return out.reshape(count, heads, head_dim)  # from [S, kv_heads, group, D]


def _prefill_attention(q: Tensor, chunk: PrefillRows, k_cache: Tensor, v_cache: Tensor) -> Tensor:
    """A chunk of one prompt against everything its sequence has cached, causally (lower
    right: its first token sees the ``past`` positions and itself), through PyTorch's fused
    attention with a kv head's group of queries as its rows. A 128-token chunk of the demo
    model: 0.31 ms a layer, against 1.06 with two batched products, a mask and a softmax."""
    tokens = chunk.end - chunk.start
    length = chunk.past + tokens
    keys = k_cache.index_select(0, chunk.blocks).flatten(0, 1)[:length]  # [L, kv_heads, D]
    values = v_cache.index_select(0, chunk.blocks).flatten(0, 1)[:length]
    keys, values = keys.to(q.dtype), values.to(q.dtype)  # from a cache of another dtype
    kv_heads, head_dim = keys.shape[1:]
    heads = q.shape[1]
    group = heads // kv_heads
    q = q.transpose(0, 1).reshape(1, kv_heads, group * tokens, head_dim)
    seen = torch.ones(tokens, length, dtype=torch.bool).tril_(chunk.past).repeat(group, 1)
    out = F.scaled_dot_product_attention(
        q, keys.transpose(0, 1)[None], values.transpose(0, 1)[None], attn_mask=seen
    )
    return out.reshape(heads, tokens, head_dim).transpose(0, 1)


def rope_frequencies(config: LlamaConfig) -> Tensor:
    """Inverse frequencies with the model's rope scaling (none, linear or llama3)."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        inv_freq = _llama3_scaled(inv_freq, scaling)
    elif kind != "default":
        from maas.errors import UnsupportedFormat

        raise UnsupportedFormat(f"rope scaling {kind!r} is not supported by maas's engine")
    return inv_freq.float()


def _llama3_scaled(inv_freq: Tensor, scaling: dict) -> Tensor:
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    original = scaling.get("original_max_position_embeddings", 8192)
    wavelength = 2 * math.pi / inv_freq
    low_wavelength, high_wavelength = original / low, original / high
    smooth = (original / wavelength - low) / (high - low)
    scaled = torch.where(wavelength > low_wavelength, inv_freq / factor, inv_freq)
    middle = (wavelength <= low_wavelength) & (wavelength >= high_wavelength)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return torch.where(middle, blended, scaled)
