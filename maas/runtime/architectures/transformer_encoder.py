"""A Transformer encoder text classifier: mean of the real tokens' final states."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class TransformerClassifier(nn.Module):
    """Token + learned position embeddings -> nn.TransformerEncoder -> masked mean -> Linear.

    Padded positions are masked out of attention and of the mean, so a right-padded sequence
    gives the same logits alone or in a batch with longer ones.
    """

    def __init__(
        self,
        vocab_size: int,
        num_classes: int = 2,
        d_model: int = 64,
        nhead: int = 4,
        num_layers: int = 2,
        dim_feedforward: int = 128,
        max_length: int = 512,
        padding_idx: int = 0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0 <= padding_idx < vocab_size:
            raise ValueError(f"padding_idx {padding_idx} is not below vocab_size {vocab_size}")
        if nhead < 1 or d_model % nhead:
            raise ValueError(f"d_model {d_model} is not divisible by nhead {nhead}")
        self.padding_idx = padding_idx
        self.max_length = max_length
        self.token_embedding = nn.Embedding(vocab_size, d_model, padding_idx=padding_idx)
        self.position_embedding = nn.Embedding(max_length, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model, nhead, dim_feedforward, dropout=dropout, batch_first=True
        )
        # Nested tensors would skip the padding's compute, but torch still calls them a prototype.
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.classifier = nn.Linear(d_model, num_classes)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """``input_ids`` int64 [N, T], right-padded -> logits [N, num_classes].

        ``attention_mask`` [N, T] marks real tokens with 1; without it, every token other than
        ``padding_idx`` is real. An empty sequence is read as its first token. Raises
        ValueError when T is over ``max_length``.
        """
        length = input_ids.shape[1]
        if length > self.max_length:
            raise ValueError(f"sequence of {length} tokens is over max_length {self.max_length}")
        # Comparing gives a new tensor, so the edit below leaves the caller's mask alone.
        real = input_ids != self.padding_idx if attention_mask is None else attention_mask != 0
        # A row with no real token would make attention softmax over nothing (NaN).
        real[:, 0] = True
        positions = torch.arange(length, device=input_ids.device)
        hidden = self.token_embedding(input_ids) + self.position_embedding(positions)
        hidden = self.encoder(hidden, src_key_padding_mask=~real)
        hidden = hidden.masked_fill(~real.unsqueeze(-1), 0.0)
        pooled = hidden.sum(dim=1) / real.sum(dim=1, keepdim=True)
        return self.classifier(pooled)

    def pipeline_layers(self) -> list[tuple[str, nn.Module]]:
        """``forward`` as a sequence of steps for pipeline stages (maas.distributed): the
        embeddings, each encoder layer, then the masked mean and the head; each step holds
        this model's own modules. The real-token mask rides along as the hidden states' last
        feature, so that one tensor crosses between stages."""
        blocks = enumerate(self.encoder.layers)
        layers = [(f"encoder.layers.{i}", _Layer(layer)) for i, layer in blocks]
        return [("embeddings", _Embed(self)), *layers, ("classifier", _Pool(self))]

    @staticmethod
    def tensor_signature(arguments: dict[str, Any]) -> tuple[list[dict], list[dict]]:
        """Open Inference Protocol v2 inputs and outputs; ``arguments`` has every argument."""
        return (
            [
                {"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]},
                {"name": "attention_mask", "datatype": "INT64", "shape": [-1, -1]},
            ],
            [{"name": "logits", "datatype": "FP32", "shape": [-1, arguments["num_classes"]]}],
        )


class _Embed(nn.Module):
    def __init__(self, model: TransformerClassifier) -> None:
        super().__init__()
        self.token_embedding = model.token_embedding
        self.position_embedding = model.position_embedding
        self.padding_idx, self.max_length = model.padding_idx, model.max_length

    def forward(self, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        length = input_ids.shape[1]
        if length > self.max_length:
            raise ValueError(f"sequence of {length} tokens is over max_length {self.max_length}")
        real = input_ids != self.padding_idx
        real[:, 0] = True
        positions = torch.arange(length, device=input_ids.device)
        hidden = self.token_embedding(input_ids) + self.position_embedding(positions)
        return torch.cat([hidden, real.unsqueeze(-1).to(hidden.dtype)], dim=-1)


class _Layer(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, carried: Tensor) -> Tensor:
        hidden, real = carried[..., :-1], carried[..., -1:]
        out = self.layer(hidden, src_key_padding_mask=real.squeeze(-1) == 0)
        return torch.cat([out, real], dim=-1)


class _Pool(nn.Module):
    def __init__(self, model: TransformerClassifier) -> None:
        super().__init__()
        self.classifier = model.classifier

    def forward(self, carried: Tensor) -> Tensor:
        hidden, real = carried[..., :-1], carried[..., -1]
        hidden = hidden.masked_fill((real == 0).unsqueeze(-1), 0.0)
        return self.classifier(hidden.sum(dim=1) / real.sum(dim=1, keepdim=True))
