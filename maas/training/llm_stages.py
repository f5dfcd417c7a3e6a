"""A ``transformers`` Llama-family model (with its LoRA adapter) as a sequence of layers, so
that the training strategies can cut it into pipeline stages: the token embeddings, each
decoder block, then the final norm and the LM head.

Between layers travels one tensor: the hidden states with the attention mask appended as
their last feature, so that every block can rebuild the causal mask (``transformers``'
own ``create_causal_mask``) and the rotary position embeddings for itself. The rotary module
and the config are not submodules of the blocks: a stage that frees the other stages' layers
keeps them. The blocks call the model's own decoder layers, so a stage computes what the
whole model computes for its layers.
"""

from __future__ import annotations

import torch
from torch import nn


class TokenEmbedding(nn.Module):
    def __init__(self, embed: nn.Module) -> None:
        super().__init__()
        self.embed = embed

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(ids)
        return torch.cat([hidden, mask.unsqueeze(-1).to(hidden.dtype)], dim=-1)


class DecoderBlock(nn.Module):
    def __init__(self, layer: nn.Module, rotary: nn.Module, config) -> None:
        super().__init__()
        self.layer = layer
        self.__dict__["rotary"] = rotary  # shared by every block: not a submodule
        self.__dict__["config"] = config

    def forward(self, carried: torch.Tensor) -> torch.Tensor:
        from transformers.masking_utils import create_causal_mask

        hidden, mask = carried[..., :-1], carried[..., -1]
        positions = torch.arange(hidden.shape[1]).unsqueeze(0)
        attention = create_causal_mask(
            config=self.config,
            inputs_embeds=hidden,
            attention_mask=mask.long(),
            cache=None,
            position_ids=positions,
        )
        hidden = self.layer(
            hidden,
            attention_mask=attention,
            position_ids=positions,
            position_embeddings=self.rotary(hidden, positions),
        )
        return torch.cat([hidden, mask.unsqueeze(-1)], dim=-1)


class LanguageModelHead(nn.Module):
    def __init__(self, norm: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.norm, self.head = norm, head

    def forward(self, carried: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(carried[..., :-1]))


def llama_layers(causal_lm: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers of a ``LlamaForCausalLM`` (bare or inside a ``peft`` model), in run order,
    named by where they sit."""
    inner = causal_lm.get_base_model() if hasattr(causal_lm, "get_base_model") else causal_lm
    body = inner.model
    layers: list[tuple[str, nn.Module]] = [
        ("model.embed_tokens", TokenEmbedding(body.embed_tokens))
    ]
    layers += [
        (f"model.layers.{i}", DecoderBlock(block, body.rotary_emb, inner.config))
        for i, block in enumerate(body.layers)
    ]
    layers.append(("lm_head", LanguageModelHead(body.norm, inner.lm_head)))
    return layers
