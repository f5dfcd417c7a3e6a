"""A transformers Llama, with a LoRA adapter, run as its sequence of layers (what pipeline
stages run) gives the whole model's logits at every real position, padded rows included, and
each layer can be freed without touching the others (a tied LM head keeps its weight)."""

from __future__ import annotations

import pytest
import torch

from maas.distributed.classic import Chain
from maas.training.llm_stages import llama_layers

pytest.importorskip("peft")


def tiny_lora_llama(tied: bool):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )
    model = get_peft_model(
        LlamaForCausalLM(config),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False),
    )
    return model.eval()


@pytest.mark.parametrize("tied", [False, True])
def test_the_layers_in_a_chain_compute_the_whole_model(tied):
    model = tiny_lora_llama(tied)
    ids = torch.randint(0, 50, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0  # right padding, as collate pads
    mask[2, 2:] = 0
    with torch.no_grad():
        whole = model(input_ids=ids, attention_mask=mask).logits
        chained = Chain(layer for _, layer in llama_layers(model))(ids, mask)
    assert chained.shape == whole.shape
    real = mask.bool()
    torch.testing.assert_close(chained[real], whole[real], rtol=1e-5, atol=1e-5)


def test_the_layers_are_named_and_freed_one_by_one():
    model = tiny_lora_llama(tied=True)
    layers = llama_layers(model)
    assert [name for name, _ in layers] == [
        "model.embed_tokens",
        "model.layers.0",
        "model.layers.1",
        "model.layers.2",
        "lm_head",
    ]
    layers[0][1].to_empty(device="meta")  # a later stage frees the embeddings
    layers[1][1].to_empty(device="meta")
    head = layers[-1][1]
    assert not head.head.weight.is_meta  # the tied head keeps its copy
    carried = torch.randn(2, 4, 33)
    carried[..., -1] = 1
    with torch.no_grad():
        out = Chain([layers[2][1], layers[3][1], head])(carried)
    assert out.shape == (2, 4, 50) and torch.isfinite(out).all()
    assert not layers[2][1].rotary.inv_freq.is_meta  # shared by every block, never freed
