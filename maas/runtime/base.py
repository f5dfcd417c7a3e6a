"""The runtime interface: what a class must do to run one model version.

For implementers: subclass ``Runtime``, set ``inputs`` and ``outputs`` (Open Inference Protocol
v2 tensor specs, batch dimension first as -1), and implement ``load``, ``predict`` and
``unload``. ``predict`` gets a batch of numpy arrays keyed by input name and returns arrays
keyed by output name, with the batch dimension first. It is called from one worker thread at
a time; it never sees HTTP, keys or the database. Weights are read through
``OpenedVersion.open_file`` / ``read_bytes``, which decrypt in memory when needed.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from maas.registry.manifest import TensorSpec
from maas.registry.records import OpenedVersion


@dataclass(frozen=True)
class RuntimeOptions:
    threads: int = os.cpu_count() or 1
    """Threads one forward pass may use (torch intra-op, onnxruntime intra-op)."""


class Runtime(ABC):
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def __init__(self, opened: OpenedVersion, options: RuntimeOptions) -> None:
        self.opened = opened
        self.options = options
        self.inputs = list(opened.manifest.inputs)
        self.outputs = list(opened.manifest.outputs)

    @abstractmethod
    def load(self) -> None:
        """Read the weights and get ready to predict (may take seconds)."""

    @abstractmethod
    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch."""

    @abstractmethod
    def unload(self) -> None:
        """Free what ``load`` took."""

    @property
    def memory_bytes(self) -> int:
        """Estimated memory once loaded; the pool's budget counts this."""
        return self.opened.manifest.size_bytes

    @property
    def batchable(self) -> bool:
        """Whether inputs have a free batch dimension, so requests can be stacked."""
        return all(spec.shape and spec.shape[0] == -1 for spec in self.inputs)
