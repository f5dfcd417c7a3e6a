"""Built-in PyTorch architectures (``maas/runtime/architectures``) with safetensors weights."""

from __future__ import annotations

import numpy as np

from maas.runtime.base import Runtime


class TorchModuleRuntime(Runtime):
    def load(self) -> None:
        import torch
        from safetensors.torch import load

        from maas.runtime.architectures import build

        config = self.opened.manifest.config
        module = build(config["architecture"], config.get("arguments", {}))
        state = load(self.opened.read_bytes(config.get("weights", "model.safetensors")))
        module.load_state_dict(state, strict=True)
        self._module = module.eval()
        self._parameter_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
        self._torch = torch

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        with torch.inference_mode():
            tensors = {
                name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in inputs.items()
            }
            output = self._module(**tensors)
        return {self.outputs[0].name: output.numpy()}

    def unload(self) -> None:
        self._module = None

    @property
    def memory_bytes(self) -> int:
        return getattr(self, "_parameter_bytes", 0) or super().memory_bytes
