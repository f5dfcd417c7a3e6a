"""``empty_hf_model``: transformers' model of a config.json, its weights not drawn (they are
loaded next), with a tied head still tied, as transformers ties it."""

from __future__ import annotations

import torch

from maas.runtime.llm.hf_model import empty_hf_model

CONFIG = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 64,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
}


def test_a_tied_head_stays_tied_and_an_untied_one_does_not():
    tied = empty_hf_model({**CONFIG, "tie_word_embeddings": True})
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    untied = empty_hf_model({**CONFIG, "tie_word_embeddings": False})
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    assert tied.maas_config["tie_word_embeddings"] is True
    assert all(p.dtype == torch.float32 for p in tied.parameters())
