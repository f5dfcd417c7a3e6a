"""Weights for ``LlamaModel`` from Hugging Face safetensors or a GGUF file.

Only the tensors the model (or a pipeline stage of it, ``layers``) holds are read, each from
its own byte range of the file (``RangeReader``), so a stage never reads the whole model first.
Safetensors ranges come from the file's JSON header; GGUF tensors are found through the checked
header walk (``read_header``) and dequantised with the ``gguf`` package (Q4_0, Q4_1, Q8_0, Q4_K,
Q6_K, F16, F32 and the rest it knows). llama.cpp stores the q and k projections of ``llama``
models permuted for its interleaved rotary layout; they are permuted back to the half-split
layout.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator

import numpy as np
import torch
from gguf.quants import dequantize, quant_shape_to_byte_shape
from torch import Tensor

from maas.errors import UnsupportedFormat
from maas.registry.formats.gguf_header import TensorInfo, read_header
from maas.registry.records import OpenedVersion
from maas.runtime.llm import quantized
from maas.runtime.llm.config import LlamaConfig
from maas.runtime.llm.model import LlamaModel
from maas.runtime.llm.quantized import KEY as QUANTIZATION_KEY
from maas.runtime.llm.quantized import METHODS, QuantizedWeight, install
from maas.runtime.safetensors_ranges import RangeReader, SafetensorsFile


def load_model(
    opened: OpenedVersion, dtype: torch.dtype, layers: range | None = None
) -> LlamaModel:
    """The model of a version (or the pipeline stage of decoder blocks ``layers``), in eval
    mode, weights cast to ``dtype``."""
    config, state = read_state(opened, layers)
    layers = range(config.num_layers) if layers is None else layers
    with torch.device("meta"):
        model = LlamaModel(config, layers)
    model = model.to_empty(device="cpu")
    tied = config.tie_word_embeddings and model.embed is not None and model.lm_head is not None
    if tied and isinstance(state.get("embed.weight"), QuantizedWeight):
        state["lm_head.weight"] = state["embed.weight"]  # both read the same stored codes
    state = install(model, state)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [name for name in missing if not (tied and name == "lm_head.weight")]
    if missing or unexpected:
        raise UnsupportedFormat(
            f"weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    if tied and isinstance(model.lm_head, torch.nn.Linear):
        model.lm_head.weight = model.embed.weight
    model.inv_freq = _rope(model)
    return model.to(dtype).eval()


def read_state(
    opened: OpenedVersion, layers: range | None = None
) -> tuple[LlamaConfig, dict[str, Tensor | QuantizedWeight]]:
    """The model's shape and the state dict of the blocks ``layers`` (all by default), reading
    only their tensors; weights stored quantized stay so (``QuantizedWeight``)."""
    config = read_config(opened)
    layers = range(config.num_layers) if layers is None else layers
    if not (0 <= layers.start < layers.stop <= config.num_layers and layers.step == 1):
        raise ValueError(f"layers {layers} are not a run of the model's {config.num_layers}")
    with contextlib.ExitStack() as files:
        return config, _fuse(config, _lookup(opened, config, files), layers)


def hf_tensors(opened: OpenedVersion) -> Iterator[tuple[str, Tensor | QuantizedWeight]]:
    """Every tensor of the version by its Hugging Face name, one at a time (a GGUF's
    dequantised to float32 and its q and k rows in Hugging Face's order)."""
    config = read_config(opened)
    with contextlib.ExitStack() as files:
        get = _lookup(opened, config, files)
        for key, pattern in _HF_NAMES.items():
            for layer in range(config.num_layers) if "{}" in pattern else [None]:
                tensor = get((key,) if layer is None else (key, layer))
                if tensor is not None:
                    yield pattern.format(layer), tensor


def _lookup(
    opened: OpenedVersion, config: LlamaConfig, files: contextlib.ExitStack
) -> Callable[[tuple], Tensor | QuantizedWeight | None]:
    """A tensor by our key (``("q", 3)``), read from the version's files when asked."""
    if opened.manifest.format == "gguf":
        return _from_gguf(opened, config, files)
    return _from_safetensors(opened, files)


def _rope(model: LlamaModel) -> Tensor:
    from maas.runtime.llm.model import rope_frequencies

    return rope_frequencies(model.config)


def read_config(opened: OpenedVersion) -> LlamaConfig:
    """The model's shape, from config.json or the GGUF header (no weights read)."""
    if opened.manifest.format != "gguf":
        return LlamaConfig.from_hf(json.loads(opened.read_bytes("config.json")))
    with opened.open_file(_gguf_file(opened)) as path:
        header = read_header(path)
    tensors = {t.name: t for t in header.tensors}
    if "token_embd.weight" not in tensors:
        raise UnsupportedFormat("the checkpoint has no tensor for embed")
    vocab = tensors["token_embd.weight"].dims[-1]
    return LlamaConfig.from_gguf(opened.manifest.config, vocab, tied="output.weight" not in tensors)


def _from_safetensors(opened: OpenedVersion, files: contextlib.ExitStack) -> Callable:
    where: dict[str, SafetensorsFile] = {}
    for entry in opened.manifest.files:
        if entry.path.endswith(".safetensors"):
            weights = SafetensorsFile(files.enter_context(opened.open_file(entry.path)))
            files.callback(weights.close)
            where.update(dict.fromkeys(weights.names, weights))

    stored = opened.manifest.config.get(QUANTIZATION_KEY) or {}

    def get(name) -> Tensor | QuantizedWeight | None:
        tensor_name = _HF_NAMES[name[0]].format(*name[1:])
        found = where.get(tensor_name)
        if found is None:
            return None
        tensor = found.get(tensor_name)
        if tensor.dtype not in (torch.int8, torch.uint8):
            return tensor
        method = stored.get("method")
        if method not in METHODS:
            raise UnsupportedFormat(
                f"{tensor_name} holds integers but config.json names no {QUANTIZATION_KEY} "
                f"method ({', '.join(METHODS)})"
            )
        scale = _beside(where, tensor_name, "scale")
        zero = _beside(where, tensor_name, "zero") if method == "int4" else None
        group_size = stored.get("group_size", 0)
        return QuantizedWeight(method, tensor, scale, zero, group_size).check(tensor_name)

    return get


def _beside(where: dict[str, SafetensorsFile], name: str, part: str) -> Tensor:
    """A quantized matrix's scales or zeros (``name_scale``, ``name_zero``)."""
    found = where.get(f"{name}_{part}")
    if found is None:
        raise UnsupportedFormat(f"{name} is stored quantized but {name}_{part} is missing")
    return found.get(f"{name}_{part}")


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


def _fuse(
    config: LlamaConfig, get: Callable[[tuple], Tensor | None], layers: range
) -> dict[str, Tensor]:
    """Our state dict (fused qkv and gate/up) of the blocks ``layers`` (numbered from 0), with
    the embedding if they start the model and the norm and head if they end it, from a lookup
    of the checkpoint's tensors (only these are looked up)."""

    def need(*name):
        tensor = get(name)
        if tensor is None:
            raise UnsupportedFormat(f"the checkpoint has no tensor for {name[0]} {name[1:] or ''}")
        return tensor

    state = {}
    first, last = layers.start == 0, layers.stop == config.num_layers
    if first:
        state["embed.weight"] = need("embed")
    if last:
        state["norm.weight"] = need("norm")
        if not config.tie_word_embeddings:
            state["lm_head.weight"] = need("lm_head")
        elif not first:  # a later stage holds its own copy of the tied embedding
            state["lm_head.weight"] = need("embed")
    for local, i in enumerate(layers):
        prefix = f"blocks.{local}."
        state[prefix + "input_norm.weight"] = need("input_norm", i)
        state[prefix + "qkv.weight"] = _cat([need("q", i), need("k", i), need("v", i)])
        if config.attention_bias:
            state[prefix + "qkv.bias"] = torch.cat(
                [need("q_bias", i), need("k_bias", i), need("v_bias", i)]
            )
        if config.qk_norm:
            state[prefix + "q_norm.weight"] = need("q_norm", i)
            state[prefix + "k_norm.weight"] = need("k_norm", i)
        state[prefix + "o.weight"] = need("o", i)
        state[prefix + "post_norm.weight"] = need("post_norm", i)
        state[prefix + "gate_up.weight"] = _cat([need("gate", i), need("up", i)])
        state[prefix + "down.weight"] = need("down", i)
    return state


def _cat(parts: list) -> Tensor | QuantizedWeight:
    """Matrices stacked by rows, stored quantized if all of them are, else as floats."""
    if all(isinstance(p, QuantizedWeight) for p in parts):
        return quantized.cat(parts)
    return torch.cat([p.dequantize() if isinstance(p, QuantizedWeight) else p for p in parts])


def _gguf_file(opened: OpenedVersion) -> str:
    return next(e.path for e in opened.manifest.files if e.path.endswith(".gguf"))


def _from_gguf(opened: OpenedVersion, config: LlamaConfig, files: contextlib.ExitStack) -> Callable:
    path = files.enter_context(opened.open_file(_gguf_file(opened)))
    header = read_header(path)
    tensors = {t.name: t for t in header.tensors}
    permute = opened.manifest.config.get("general.architecture") == "llama"
    reader = RangeReader(path)
    files.callback(reader.close)

    def get(name) -> Tensor | None:
        tensor = tensors.get(_GGUF_NAMES[name[0]].format(*name[1:]))
        if tensor is None:
            return None
        raw = np.frombuffer(
            reader.read(header.data_offset + tensor.offset, tensor.num_bytes), np.uint8
        )
        array = dequantize(shaped_bytes(raw, tensor), tensor.ggml_type)
        array = array.astype(np.float32, copy=False)
        if permute and name[0] in ("q", "k"):
            heads = config.num_heads if name[0] == "q" else config.num_kv_heads
            array = _unpermute(array, heads)
        return torch.from_numpy(np.array(array, dtype=np.float32, order="C"))

    return get


def shaped_bytes(raw: np.ndarray, tensor: TensorInfo) -> np.ndarray:
    """A tensor's bytes shaped (rows..., bytes per row), as ``gguf.quants.dequantize`` takes
    quantised tensors. ``gguf.GGUFReader`` hands it F32 and F16 ones as float arrays (rows...,
    row) instead, which it only views as floats: the same bits."""
    return raw.reshape(quant_shape_to_byte_shape(tensor.dims[::-1] or (1,), tensor.ggml_type))


def tensor_bytes(data: np.ndarray, data_offset: int, tensor: TensorInfo) -> np.ndarray:
    """The tensor's bytes in ``data`` (the whole file), shaped as ``shaped_bytes`` does."""
    start = data_offset + tensor.offset
    return shaped_bytes(data[start : start + tensor.num_bytes], tensor)


def _unpermute(weights: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's permutation of q/k rows (interleaved rotary back to half-split)."""
    half = weights.shape[0] // heads // 2
    return weights.reshape(heads, half, 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)
