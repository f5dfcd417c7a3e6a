"""Weights for ``LlamaModel`` from Hugging Face safetensors or a GGUF file.

GGUF tensors are found through the checked header walk (``read_header``) and read from a memory
map of the file, then dequantised with the ``gguf`` package (Q4_0, Q4_1, Q8_0, Q4_K, Q6_K, F16,
F32 and the rest it knows). llama.cpp stores the q and k projections of ``llama`` models permuted
for its interleaved rotary layout; they are permuted back to the half-split layout.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from gguf.quants import dequantize, quant_shape_to_byte_shape
from torch import Tensor

from maas.errors import UnsupportedFormat
from maas.registry.formats.gguf_header import TensorInfo, read_header
from maas.registry.records import OpenedVersion
from maas.runtime.llm.config import LlamaConfig
from maas.runtime.llm.model import LlamaModel


def load_model(opened: OpenedVersion, dtype: torch.dtype) -> LlamaModel:
    """The model of a version, in eval mode, weights cast to ``dtype``."""
    if opened.manifest.format == "gguf":
        config, state = _from_gguf(opened)
    else:
        config, state = _from_safetensors(opened)
    with torch.device("meta"):
        model = LlamaModel(config)
    model = model.to_empty(device="cpu")
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [
        name for name in missing if not (config.tie_word_embeddings and name == "lm_head.weight")
    ]
    if missing or unexpected:
        raise UnsupportedFormat(
            f"weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight
    model.inv_freq = _rope(model)
    return model.to(dtype).eval()


def _rope(model: LlamaModel) -> Tensor:
    from maas.runtime.llm.model import rope_frequencies

    return rope_frequencies(model.config)


def _from_safetensors(opened: OpenedVersion) -> tuple[LlamaConfig, dict[str, Tensor]]:
    from safetensors.torch import load

    config = LlamaConfig.from_hf(json.loads(opened.read_bytes("config.json")))
    raw: dict[str, Tensor] = {}
    for entry in opened.manifest.files:
        if entry.path.endswith(".safetensors"):
            raw.update(load(opened.read_bytes(entry.path)))
    return config, _fuse(config, lambda name: raw.get(_HF_NAMES[name[0]].format(*name[1:])))


_HF_NAMES = {
    "embed": "model.embed_tokens.weight",
    "norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
    "input_norm": "model.layers.{}.input_layernorm.weight",
    "q": "model.layers.{}.self_attn.q_proj.weight",
    "k": "model.layers.{}.self_attn.k_proj.weight",
    "v": "model.layers.{}.self_attn.v_proj.weight",
    "q_bias": "model.layers.{}.self_attn.q_proj.bias",
    "k_bias": "model.layers.{}.self_attn.k_proj.bias",
    "v_bias": "model.layers.{}.self_attn.v_proj.bias",
    "q_norm": "model.layers.{}.self_attn.q_norm.weight",
    "k_norm": "model.layers.{}.self_attn.k_norm.weight",
    "o": "model.layers.{}.self_attn.o_proj.weight",
    "post_norm": "model.layers.{}.post_attention_layernorm.weight",
    "gate": "model.layers.{}.mlp.gate_proj.weight",
    "up": "model.layers.{}.mlp.up_proj.weight",
    "down": "model.layers.{}.mlp.down_proj.weight",
}

_GGUF_NAMES = {
    "embed": "token_embd.weight",
    "norm": "output_norm.weight",
    "lm_head": "output.weight",
    "input_norm": "blk.{}.attn_norm.weight",
    "q": "blk.{}.attn_q.weight",
    "k": "blk.{}.attn_k.weight",
    "v": "blk.{}.attn_v.weight",
    "q_bias": "blk.{}.attn_q.bias",
    "k_bias": "blk.{}.attn_k.bias",
    "v_bias": "blk.{}.attn_v.bias",
    "q_norm": "blk.{}.attn_q_norm.weight",
    "k_norm": "blk.{}.attn_k_norm.weight",
    "o": "blk.{}.attn_output.weight",
    "post_norm": "blk.{}.ffn_norm.weight",
    "gate": "blk.{}.ffn_gate.weight",
    "up": "blk.{}.ffn_up.weight",
    "down": "blk.{}.ffn_down.weight",
}


def _fuse(config: LlamaConfig, get) -> dict[str, Tensor]:
    """Our state dict (fused qkv and gate/up) from a lookup of the checkpoint's tensors."""

    def need(*name):
        tensor = get(name)
        if tensor is None:
            raise UnsupportedFormat(f"the checkpoint has no tensor for {name[0]} {name[1:] or ''}")
        return tensor

    state = {"embed.weight": need("embed"), "norm.weight": need("norm")}
    if not config.tie_word_embeddings:
        state["lm_head.weight"] = need("lm_head")
    for i in range(config.num_layers):
        prefix = f"blocks.{i}."
        state[prefix + "input_norm.weight"] = need("input_norm", i)
        state[prefix + "qkv.weight"] = torch.cat([need("q", i), need("k", i), need("v", i)])
        if config.attention_bias:
            state[prefix + "qkv.bias"] = torch.cat(
                [need("q_bias", i), need("k_bias", i), need("v_bias", i)]
            )
        if config.qk_norm:
            state[prefix + "q_norm.weight"] = need("q_norm", i)
            state[prefix + "k_norm.weight"] = need("k_norm", i)
        state[prefix + "o.weight"] = need("o", i)
        state[prefix + "post_norm.weight"] = need("post_norm", i)
        state[prefix + "gate_up.weight"] = torch.cat([need("gate", i), need("up", i)])
        state[prefix + "down.weight"] = need("down", i)
    return state


def _from_gguf(opened: OpenedVersion) -> tuple[LlamaConfig, dict[str, Tensor]]:
    gguf_file = next(e.path for e in opened.manifest.files if e.path.endswith(".gguf"))
    with opened.open_file(gguf_file) as path:
        header = read_header(path)
        tensors = {t.name: t for t in header.tensors}
        if "token_embd.weight" not in tensors:
            raise UnsupportedFormat("the checkpoint has no tensor for embed")
        metadata = opened.manifest.config
        vocab = tensors["token_embd.weight"].dims[-1]
        config = LlamaConfig.from_gguf(metadata, vocab, tied="output.weight" not in tensors)
        permute = metadata.get("general.architecture") == "llama"
        data = np.memmap(path, mode="r")

        def get(name) -> Tensor | None:
            tensor = tensors.get(_GGUF_NAMES[name[0]].format(*name[1:]))
            if tensor is None:
                return None
            rows = tensor_bytes(data, header.data_offset, tensor)
            array = dequantize(rows, tensor.ggml_type).astype(np.float32, copy=False)
            if permute and name[0] in ("q", "k"):
                heads = config.num_heads if name[0] == "q" else config.num_kv_heads
                array = _unpermute(array, heads)
            return torch.from_numpy(np.array(array, dtype=np.float32, order="C"))

        return config, _fuse(config, get)


def tensor_bytes(data: np.ndarray, data_offset: int, tensor: TensorInfo) -> np.ndarray:
    """The tensor's bytes in ``data`` (the whole file) shaped (rows..., bytes per row), as
    ``gguf.quants.dequantize`` takes quantised tensors. ``gguf.GGUFReader`` hands it F32 and F16
    ones as float arrays (rows..., row) instead, which it only views as floats: the same bits."""
    start = data_offset + tensor.offset
    shape = quant_shape_to_byte_shape(tensor.dims[::-1] or (1,), tensor.ggml_type)
    return data[start : start + tensor.num_bytes].reshape(shape)


def _unpermute(weights: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's permutation of q/k rows (interleaved rotary back to half-split)."""
    half = weights.shape[0] // heads // 2
    return weights.reshape(heads, half, 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)
