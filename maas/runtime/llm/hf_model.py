"""A Llama-family version as ``transformers`` builds it, from maas's own reader of its weights
(a GGUF dequantised, its q and k rows in Hugging Face's order): the model that fine-tuning
and the optimize jobs train, and the config.json of what they register.

``transformers``' own GGUF loader took 15.7 s for the demo (SmolLM2-135M, Q4_1) on two
cores, where this takes 3.4 (bench/llm_base_load.py, docs/performance.md): it dequantises
every tensor its own slower way, and ``from_config`` first fills the new model with random
weights (6 s of the demo's load) that the stored ones replace; here they are never drawn.
Both give the same weights, bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from maas.registry.records import OpenedVersion
from maas.runtime.llm.weights import hf_tensors, read_config

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
"""The ``transformers`` class of each GGUF ``general.architecture`` maas's engine runs."""


def hf_config(opened: OpenedVersion, dtype: str = "bfloat16") -> dict[str, Any]:
    """The version's config.json as ``transformers`` reads it: its own, or one written from a
    GGUF's shape; ``torch_dtype`` is ``dtype``."""
    if opened.manifest.format == "huggingface":
        config = dict(opened.manifest.config)
        config["torch_dtype"] = dtype
        return config
    shape = read_config(opened)
    model_type = opened.manifest.config["general.architecture"]
    config = {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": shape.vocab_size,
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_layers,
        "num_attention_heads": shape.num_heads,
        "num_key_value_heads": shape.num_kv_heads,
        "head_dim": shape.head_dim,
        "rms_norm_eps": shape.rms_norm_eps,
        "rope_theta": shape.rope_theta,
        "max_position_embeddings": shape.max_position_embeddings,
        "tie_word_embeddings": shape.tie_word_embeddings,
        "hidden_act": "silu",
        "torch_dtype": dtype,
    }
    if shape.rope_scaling:
        config["rope_scaling"] = shape.rope_scaling
    if model_type == "llama":
        config["attention_bias"] = shape.attention_bias
    return config


def empty_hf_model(config: dict[str, Any]) -> nn.Module:
    """``transformers``' float32 model of ``config``, its weights allocated but not drawn (to
    be loaded), a head tied to the embedding if ``config`` says so; it keeps the config.json
    dict as ``maas_config``."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    fields = {k: v for k, v in config.items() if k not in ("model_type", "architectures")}
    built = AutoConfig.for_model(config["model_type"], **fields)
    with torch.device("cpu"), no_init_weights():
        model = AutoModelForCausalLM.from_config(built, dtype=torch.float32)
    model.tie_weights()  # which no_init_weights skips along with the drawing
    model.maas_config = dict(config)
    return model


def load_hf_model(opened: OpenedVersion) -> nn.Module:
    """The version in float32 as ``transformers`` builds it, in eval mode (a head tied to the
    embedding stays tied: its weight is not stored)."""
    config = hf_config(opened, "float32")
    model = empty_hf_model(config)
    state = {name: tensor.float() for name, tensor in hf_tensors(opened)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = config.get("tie_word_embeddings", False)
    missing = [name for name in missing if not (tied and name == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(
            f"the weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    return model.eval()
