"""A small convolutional image classifier: conv blocks, then a two-layer head."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from typing import Any

from torch import Tensor, nn


class SmallCNN(nn.Module):
    """``len(channels)`` blocks of 3x3 Conv2d + ReLU + 2x2 MaxPool, then Linear layers.

    The head's input size depends on ``image_size``, so every image must be
    ``in_channels x image_size x image_size``; preprocessing resizes to that.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        channels: Sequence[int] = (16, 32),
        hidden: int = 64,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        side = image_size // 2 ** len(channels)
        if side < 1:
            raise ValueError(
                f"image_size {image_size} is too small for {len(channels)} pooling blocks"
            )
        blocks: list[nn.Module] = []
        for in_c, out_c in pairwise([in_channels, *channels]):
            blocks += [nn.Conv2d(in_c, out_c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*blocks)
        last_channels = channels[-1] if channels else in_channels
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(last_channels * side * side, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, input: Tensor) -> Tensor:
        """``input`` float32 [N, C, H, W] -> logits [N, num_classes]."""
        return self.classifier(self.features(input))

    def pipeline_layers(self) -> list[tuple[str, nn.Module]]:
        """The layers ``forward`` runs, in order, named as in the state dict (for pipeline
        stages, maas.distributed.classic)."""
        return [
            *((f"features.{i}", layer) for i, layer in enumerate(self.features)),
            *((f"classifier.{i}", layer) for i, layer in enumerate(self.classifier)),
        ]

    @staticmethod
    def tensor_signature(arguments: dict[str, Any]) -> tuple[list[dict], list[dict]]:
        """Open Inference Protocol v2 inputs and outputs; ``arguments`` has every argument."""
        size = arguments["image_size"]
        shape = [-1, arguments["in_channels"], size, size]
        return (
            [{"name": "input", "datatype": "FP32", "shape": shape}],
            [{"name": "logits", "datatype": "FP32", "shape": [-1, arguments["num_classes"]]}],
        )
