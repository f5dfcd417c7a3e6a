"""The shape of a Llama-family model, read from a Hugging Face config.json or GGUF metadata."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from maas.errors import UnsupportedFormat

LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    """Qwen2 has biases on q, k and v."""
    qk_norm: bool = False
    """Qwen3 normalises q and k per head."""
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> LlamaConfig:
        model_type = config.get("model_type")
        if model_type not in LLAMA_FAMILY:
            raise UnsupportedFormat(
                f"maas's engine runs {', '.join(LLAMA_FAMILY)}, not {model_type!r}"
            )
        heads = config["num_attention_heads"]
        hidden = config["hidden_size"]
        return cls(
            vocab_size=config["vocab_size"],
            hidden_size=hidden,
            intermediate_size=config["intermediate_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or hidden // heads,
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=config.get("rope_theta", 10000.0),
            rope_scaling=config.get("rope_scaling"),
            max_position_embeddings=config.get("max_position_embeddings", 2048),
            tie_word_embeddings=config.get("tie_word_embeddings", False),
            attention_bias=model_type == "qwen2" or config.get("attention_bias", False),
            qk_norm=model_type == "qwen3",
        )

    @classmethod
    def from_gguf(cls, metadata: dict[str, Any], vocab_size: int, tied: bool) -> LlamaConfig:
        arch = metadata["general.architecture"]
        if arch not in LLAMA_FAMILY:
            raise UnsupportedFormat(f"maas's engine runs {', '.join(LLAMA_FAMILY)}, not {arch!r}")

        def get(key: str, default: Any = None) -> Any:
            return metadata.get(f"{arch}.{key}", default)

        heads = get("attention.head_count")
        hidden = get("embedding_length")
        scaling = None
        if get("rope.scaling.type") in ("linear", "yarn"):
            scaling = {
                "rope_type": get("rope.scaling.type"),
                "factor": get("rope.scaling.factor", 1.0),
            }
        return cls(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=get("feed_forward_length"),
            num_layers=get("block_count"),
            num_heads=heads,
            num_kv_heads=get("attention.head_count_kv") or heads,
            head_dim=get("attention.key_length") or hidden // heads,
            rms_norm_eps=get("attention.layer_norm_rms_epsilon", 1e-5),
            rope_theta=get("rope.freq_base", 10000.0),
            rope_scaling=scaling,
            max_position_embeddings=get("context_length", 2048),
            tie_word_embeddings=tied,
            attention_bias=arch == "qwen2",
            qk_norm=arch == "qwen3",
        )
