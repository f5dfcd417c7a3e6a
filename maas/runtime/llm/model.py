"""A Llama-family decoder in plain PyTorch, for batches that mix decoding and prefill.

Tokens of every sequence in a step are flattened into one batch, so the matmuls (q/k/v, o,
gate/up, down: fused where the shapes allow) run once per layer over all of them; only
attention is split: decoding tokens attend together over their KV slots, each prefill chunk
attends over its own slot with a lower-right causal mask. Keys and values live in a
preallocated slot cache (``KVCache``): one slot per sequence, ``max_len`` positions each.
"""

from __future__ import annotations

import math
import mmap
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
    """Keys and values of every layer. Values are [slots, kv_heads, max_len, head_dim]; keys
    are stored transposed, [slots, kv_heads, head_dim, max_len], so that a decoding query's
    scores are a plain matrix product over contiguous rows (measured 1.7x faster)."""

    def __init__(
        self,
        config: LlamaConfig,
        num_slots: int,
        max_len: int,
        dtype: torch.dtype,
        *,
        commit: bool = False,
    ):
        values = (num_slots, config.num_kv_heads, max_len, config.head_dim)
        keys = (num_slots, config.num_kv_heads, config.head_dim, max_len)
        self.k = [_zeros(keys, dtype, commit) for _ in range(config.num_layers)]
        self.v = [_zeros(values, dtype, commit) for _ in range(config.num_layers)]
        self.num_slots = num_slots
        self.max_len = max_len

    @staticmethod
    def bytes_per_slot(config: LlamaConfig, max_len: int, dtype: torch.dtype) -> int:
        element = torch.tensor([], dtype=dtype).element_size()
        return 2 * config.num_layers * config.num_kv_heads * max_len * config.head_dim * element

    def copy_prefix(self, source: int, target: int, length: int) -> None:
        """Reuse ``length`` cached positions of one slot in another (a shared prompt prefix)."""
        for k, v in zip(self.k, self.v, strict=True):
            k[target, :, :, :length] = k[source, :, :, :length]
            v[target, :, :length] = v[source, :, :length]


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

    def forward(
        self, x: Tensor, rope: Rope, plan: AttentionPlan, k_cache: Tensor, v_cache: Tensor
    ) -> Tensor:
        tokens = x.shape[0]
        qkv = self.qkv(self.input_norm(x))
        v = qkv[:, self.sizes[0] + self.sizes[1] :].view(tokens, self.kv_heads, self.head_dim)
        qk = qkv[:, : self.sizes[0] + self.sizes[1]].view(tokens, -1, self.head_dim)
        if self.q_norm is not None:
            qk = torch.cat((self.q_norm(qk[:, : self.heads]), self.k_norm(qk[:, self.heads :])), 1)
        qk = rope.apply(qk)  # q and k in one go
        q, k = qk[:, : self.heads], qk[:, self.heads :]
        plan.write(k, v, k_cache, v_cache)
        attended = attention(q, plan, k_cache, v_cache)
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
        rope = Rope(step.positions, self.inv_freq, x.dtype)
        plan = AttentionPlan(step)
        for layer, block in enumerate(self.blocks):
            x = block(x, rope, plan, cache.k[layer], cache.v[layer])
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

    def apply(self, x: Tensor) -> Tensor:
        """``x``: [tokens, heads, head_dim]."""
        swapped = x.roll(x.shape[-1] // 2, dims=-1)  # (x2, x1)
        return torch.addcmul(x * self.cos, swapped, self.sin)


class AttentionPlan:
    """What every layer's attention needs to know about the step, worked out once per step."""

    def __init__(self, step: StepInput) -> None:
        self.decode = _DecodePlan(step.decode) if step.decode is not None else None
        rows = step.decode.count if step.decode is not None else 0
        self.decode_slots, self.decode_positions = step.slots[:rows], step.positions[:rows]
        self.prefills = step.prefills

    def write(self, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor) -> None:
        """Put the step's new keys and values ([T, kv_heads, head_dim]) into the cache: one
        scattered write for the decoding tokens, a slice copy for each prompt chunk."""
        if self.decode is not None:
            rows = self.decode.count
            k_cache[self.decode_slots, :, :, self.decode_positions] = k[:rows]
            v_cache[self.decode_slots, :, self.decode_positions] = v[:rows]
        for chunk in self.prefills:
            begin, end = chunk.past, chunk.past + chunk.end - chunk.start
            k_cache[chunk.slot, :, :, begin:end] = k[chunk.start : chunk.end].permute(1, 2, 0)
            v_cache[chunk.slot, :, begin:end] = v[chunk.start : chunk.end].transpose(0, 1)


class _DecodePlan:
    """The decoding sequences read a contiguous range of slots (a view of the cache, never a
    copy); slots in the range that are not decoding, and positions past each sequence's
    length, are masked out."""

    def __init__(self, decode: DecodeRows) -> None:
        self.count = decode.count
        slots = decode.slots.tolist()
        self.low, self.high = min(slots), max(slots) + 1
        span = self.high - self.low
        self.longest = int(decode.lengths.max())
        rows = decode.slots - self.low
        contiguous = span == self.count and slots == list(range(self.low, self.high))
        self.rows = None if contiguous else rows
        lengths = torch.ones(span, dtype=torch.long)
        lengths[rows] = decode.lengths
        self.bias = None
        if bool((lengths < self.longest).any()):
            visible = torch.arange(self.longest)[None, :] < lengths[:, None]
            bias = torch.zeros(span, 1, 1, self.longest)
            self.bias = bias.masked_fill_(~visible[:, None, None, :], float("-inf"))


def attention(q: Tensor, plan: AttentionPlan, k_cache: Tensor, v_cache: Tensor) -> Tensor:
    """[T, heads, head_dim] attention outputs for the flattened batch."""
    if plan.decode is not None and not plan.prefills:
        return _decode_attention(q, plan.decode, k_cache, v_cache)
    out = torch.empty_like(q)
    if plan.decode is not None:
        rows = plan.decode.count
        out[:rows] = _decode_attention(q[:rows], plan.decode, k_cache, v_cache)
    for chunk in plan.prefills:
        out[chunk.start : chunk.end] = _prefill_attention(
            q[chunk.start : chunk.end], chunk, k_cache, v_cache
        )
    return out


def _decode_attention(q: Tensor, plan: _DecodePlan, k_cache: Tensor, v_cache: Tensor) -> Tensor:
    """One query per sequence: two batched matrix products over (slot, kv head), each kv
    head's group of query heads together. Much cheaper than SDPA for a single query."""
    keys = k_cache[plan.low : plan.high, :, :, : plan.longest]  # [S, kv_heads, D, L]
    values = v_cache[plan.low : plan.high, :, : plan.longest]  # [S, kv_heads, L, D]
    span, kv_heads, head_dim, _ = keys.shape
    heads = q.shape[1]
    if plan.rows is not None:
        q = q.new_zeros((span, heads, head_dim)).index_copy_(0, plan.rows, q)
    q = (q * head_dim**-0.5).view(span, kv_heads, heads // kv_heads, head_dim)
    scores = torch.matmul(q, keys)  # [S, kv_heads, group, L]
    if plan.bias is not None:
        scores = scores + plan.bias
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)
    out = torch.matmul(probs, values).view(span, heads, head_dim)
    return out if plan.rows is None else out.index_select(0, plan.rows)


def _prefill_attention(q: Tensor, chunk: PrefillRows, k_cache: Tensor, v_cache: Tensor) -> Tensor:
    """A chunk of one prompt against everything its sequence has cached, causally: per kv
    head, one product for all the queries of its group."""
    tokens = chunk.end - chunk.start
    length = chunk.past + tokens
    keys = k_cache[chunk.slot, :, :, :length]  # [kv_heads, D, L]
    values = v_cache[chunk.slot, :, :length]  # [kv_heads, L, D]
    kv_heads, head_dim, _ = keys.shape
    heads = q.shape[1]
    group = heads // kv_heads
    q = (q * head_dim**-0.5).transpose(0, 1).reshape(kv_heads, group * tokens, head_dim)
    scores = torch.bmm(q, keys).view(kv_heads, group, tokens, length)
    if tokens > 1:
        future = torch.ones(tokens, length, dtype=torch.bool).triu_(chunk.past + 1)
        scores = scores.masked_fill(future, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)
    out = torch.bmm(probs.view(kv_heads, group * tokens, length), values)
    return out.view(heads, tokens, head_dim).transpose(0, 1)


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
