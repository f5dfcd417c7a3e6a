"""Built-in PyTorch architectures (``maas/runtime/architectures``) with safetensors weights."""

from __future__ import annotations

import numpy as np

from maas.runtime.classic.torch_base import TorchRuntime


class TorchModuleRuntime(TorchRuntime):
    def load(self) -> None:
        from safetensors.torch import load

        from maas.runtime.architectures.folder import load_module

        config = self.opened.manifest.config
        state = load(self.opened.read_bytes(config.get("weights", "model.safetensors")))
        module = load_module(
            config["architecture"],
            config.get("arguments", {}),
            state,
            config.get("quantization"),
        )
        self._use(module)

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {self.outputs[0].name: self._forward(inputs).numpy()}
