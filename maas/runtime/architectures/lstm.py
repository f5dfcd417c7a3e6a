"""An LSTM text classifier over token ids, read at each sequence's last real token."""

from __future__ import annotations

from typing import Any

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
