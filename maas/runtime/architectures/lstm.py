"""An LSTM text classifier over token ids, read at each sequence's last real token."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence


class LSTMClassifier(nn.Module):
    """Embedding -> LSTM -> Linear over the final hidden state of the top layer.

    Sequences are right-padded. They are packed before the LSTM, so padding never reaches
    it: a sequence gives the same logits alone or in a batch with longer ones.
    """

    def __init__(
        self,
        vocab_size: int,
        num_classes: int = 2,
        embedding_dim: int = 64,
        hidden_size: int = 64,
        num_layers: int = 1,
        bidirectional: bool = False,
        padding_idx: int = 0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0 <= padding_idx < vocab_size:
            raise ValueError(f"padding_idx {padding_idx} is not below vocab_size {vocab_size}")
        self.padding_idx = padding_idx
        self.embedding = nn.Embedding(vocab_size, embedding_dim, padding_idx=padding_idx)
        self.lstm = nn.LSTM(
            embedding_dim,
            hidden_size,
            num_layers=num_layers,
            bidirectional=bidirectional,
            batch_first=True,
            # nn.LSTM only drops out between layers, and warns when there is just one.
            dropout=dropout if num_layers > 1 else 0.0,
        )
        self.num_directions = 2 if bidirectional else 1
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size * self.num_directions, num_classes)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """``input_ids`` int64 [N, T], right-padded -> logits [N, num_classes].

        ``attention_mask`` [N, T] marks real tokens with 1; without it, every token other than
        ``padding_idx`` is real. An empty sequence is read as its first token.
        """
        if attention_mask is None:
            attention_mask = input_ids != self.padding_idx
        lengths = attention_mask.sum(dim=1).clamp(min=1).cpu()
        packed = pack_padded_sequence(
            self.embedding(input_ids), lengths, batch_first=True, enforce_sorted=False
        )
        _, (h_n, _) = self.lstm(packed)
        # h_n is [num_layers * num_directions, N, hidden], already back in batch order; the
        # backward direction's final state is the one at each sequence's first token.
        top = h_n[-self.num_directions :].transpose(0, 1).reshape(input_ids.shape[0], -1)
        return self.classifier(self.dropout(top))

    def pipeline_layers(self) -> list[tuple[str, nn.Module]]:
        """``forward`` as a sequence of steps for pipeline stages (maas.distributed): the
        embedding, then the LSTM, then the head; each step holds this model's own modules.
        The real-token mask rides along as the embeddings' last feature, so that one tensor
        crosses between stages."""
        return [
            ("embedding", _Embed(self)),
            ("lstm", _Recur(self)),
            ("classifier", _Head(self)),
        ]

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
    def __init__(self, model: LSTMClassifier) -> None:
        super().__init__()
        self.embedding, self.padding_idx = model.embedding, model.padding_idx

    def forward(self, input_ids: Tensor) -> Tensor:
        mask = (input_ids != self.padding_idx).unsqueeze(-1)
        embedded = self.embedding(input_ids)
        return torch.cat([embedded, mask.to(embedded.dtype)], dim=-1)


class _Recur(nn.Module):
    def __init__(self, model: LSTMClassifier) -> None:
        super().__init__()
        self.lstm, self.num_directions = model.lstm, model.num_directions

    def forward(self, carried: Tensor) -> Tensor:
        embedded, mask = carried[..., :-1], carried[..., -1]
        # torch.distributed.pipelining learns a stage's output shape by running it once on
        # uninitialised tensors: lengths from such a mask must still be valid ones
        counts = mask.sum(dim=1).nan_to_num(nan=1.0, posinf=1.0, neginf=1.0)
        lengths = counts.clamp(min=1, max=mask.shape[1]).long().cpu()
        packed = pack_padded_sequence(embedded, lengths, batch_first=True, enforce_sorted=False)
        _, (h_n, _) = self.lstm(packed)
        return h_n[-self.num_directions :].transpose(0, 1).reshape(embedded.shape[0], -1)


class _Head(nn.Module):
    def __init__(self, model: LSTMClassifier) -> None:
        super().__init__()
        self.dropout, self.classifier = model.dropout, model.classifier

    def forward(self, top: Tensor) -> Tensor:
        return self.classifier(self.dropout(top))
