"""A Llama-family decoder in plain PyTorch, for batches that mix decoding and prefill.

Tokens of every sequence in a step are flattened into one batch, so the matmuls (q/k/v, o,
gate/up, down: fused where the shapes allow) run once per layer over all of them; only
attention is split: decoding tokens attend together over their KV slots, each prefill chunk
attends over its own slot with a lower-right causal mask. Keys and values live in a
preallocated slot cache (``KVCache``): one slot per sequence, ``max_len`` positions each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.bias import causal_lower_right

from maas.runtime.llm.config import LlamaConfig


@dataclass
class DecodeRows:
    """The first ``count`` tokens of a batch: one decoding token per sequence."""

    count: int
    slots: Tensor
    """Slot of each decoding sequence (int64 [count])."""
    lengths: Tensor
    """Tokens each sequence has in cache after this step (int64 [count])."""


@dataclass
class PrefillRows:
    """Tokens ``start:end`` of a batch: a chunk of one sequence's prompt."""

    start: int
    end: int
    slot: int
    past: int
    """Tokens of this sequence already in the cache before the chunk."""


@dataclass
class StepInput:
    input_ids: Tensor
    """int64 [T]: decoding tokens first, then prefill chunks."""
    positions: Tensor
    """int64 [T]."""
    slots: Tensor
    """int64 [T]: the slot each token's keys and values go to."""
    decode: DecodeRows | None
    prefills: list[PrefillRows]
    logits_rows: Tensor
    """int64 [N]: the tokens whose next-token logits are wanted."""


class KVCache:
    """Keys and values of every layer: [slots, kv_heads, max_len, head_dim] each."""

    def __init__(self, config: LlamaConfig, num_slots: int, max_len: int, dtype: torch.dtype):
        shape = (num_slots, config.num_kv_heads, max_len, config.head_dim)
        self.k = [_untouched_zeros(shape, dtype) for _ in range(config.num_layers)]
        self.v = [_untouched_zeros(shape, dtype) for _ in range(config.num_layers)]
        self.num_slots = num_slots
        self.max_len = max_len

    @staticmethod
    def bytes_per_slot(config: LlamaConfig, max_len: int, dtype: torch.dtype) -> int:
        element = torch.tensor([], dtype=dtype).element_size()
        return 2 * config.num_layers * config.num_kv_heads * max_len * config.head_dim * element

    def copy_prefix(self, source: int, target: int, length: int) -> None:
        """Reuse ``length`` cached positions of one slot in another (a shared prompt prefix)."""
        for k, v in zip(self.k, self.v, strict=True):
            k[target, :, :length] = k[source, :, :length]
            v[target, :, :length] = v[source, :, :length]


def _untouched_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """Zeros whose pages are committed only when written (calloc), unlike ``torch.zeros``,
    which writes every byte: a cache sized for long sequences costs only what is used."""
    element = torch.tensor([], dtype=dtype).element_size()
    count = math.prod(shape)
    raw = torch.from_numpy(np.zeros(count * element, dtype=np.uint8))
    return raw.view(dtype).view(shape)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


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

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, step: StepInput, k_cache: Tensor, v_cache: Tensor
    ) -> Tensor:
        tokens = x.shape[0]
        q, k, v = self.qkv(self.input_norm(x)).split(self.sizes, dim=-1)
        q = q.view(tokens, self.heads, self.head_dim)
        k = k.view(tokens, self.kv_heads, self.head_dim)
        v = v.view(tokens, self.kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        k_cache[step.slots, :, step.positions] = k
        v_cache[step.slots, :, step.positions] = v
        attended = attention(q, step, k_cache, v_cache)
        x = x + self.o(attended.reshape(tokens, -1))
        gate, up = self.gate_up(self.post_norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        inv_freq = rope_frequencies(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.inference_mode()
    def forward(self, step: StepInput, cache: KVCache) -> Tensor:
        """Logits (float32) of the tokens in ``step.logits_rows``, writing every token's
        keys and values into the cache."""
        x = self.embed(step.input_ids)
        angles = step.positions.to(torch.float32)[:, None] * self.inv_freq[None, :]
        cos = torch.cos(angles).to(x.dtype)
        sin = torch.sin(angles).to(x.dtype)
        for layer, block in enumerate(self.blocks):
            x = block(x, cos, sin, step, cache.k[layer], cache.v[layer])
        x = self.norm(x[step.logits_rows])
        return self.lm_head(x).float()


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary position embedding, in the half-split layout of Hugging Face checkpoints."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def attention(q: Tensor, step: StepInput, k_cache: Tensor, v_cache: Tensor) -> Tensor:
    """[T, heads, head_dim] attention outputs for the flattened batch."""
    out = torch.empty_like(q)
    if step.decode is not None:
        rows = step.decode.count
        out[:rows] = _decode_attention(q[:rows], step.decode, k_cache, v_cache)
    for chunk in step.prefills:
        out[chunk.start : chunk.end] = _prefill_attention(
            q[chunk.start : chunk.end], chunk, k_cache, v_cache
        )
    return out


def _decode_attention(q: Tensor, decode: DecodeRows, k_cache: Tensor, v_cache: Tensor) -> Tensor:
    """All decoding sequences in one call, over the range of slots they use (a view of the
    cache, not a copy), masking positions past each sequence's length."""
    low = int(decode.slots.min())
    high = int(decode.slots.max()) + 1
    longest = int(decode.lengths.max())
    keys = k_cache[low:high, :, :longest]
    values = v_cache[low:high, :, :longest]
    rows = decode.slots - low
    span = high - low
    lengths = torch.ones(span, dtype=torch.long)  # slots in the range that are not decoding
    lengths[rows] = decode.lengths
    mask = torch.arange(longest)[None, :] < lengths[:, None]
    queries = q.new_zeros((span, q.shape[1], q.shape[2]))
    queries[rows] = q
    result = F.scaled_dot_product_attention(
        queries[:, :, None, :], keys, values, attn_mask=mask[:, None, None, :], enable_gqa=True
    )
    return result[rows, :, 0, :]


def _prefill_attention(q: Tensor, chunk: PrefillRows, k_cache: Tensor, v_cache: Tensor) -> Tensor:
    length = chunk.past + (chunk.end - chunk.start)
    keys = k_cache[chunk.slot : chunk.slot + 1, :, :length]
    values = v_cache[chunk.slot : chunk.slot + 1, :, :length]
    mask = causal_lower_right(chunk.end - chunk.start, length)
    result = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], keys, values, attn_mask=mask, enable_gqa=True
    )
    return result[0].transpose(0, 1)


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
