"""What the PyTorch runtimes share: a module in eval mode, run under inference_mode."""

from __future__ import annotations

from typing import Any

import numpy as np

from maas.runtime.base import Runtime


class TorchRuntime(Runtime):
    """Subclasses set the module with ``_use(module)`` in ``load``."""

    _module: Any = None

    def _use(self, module: Any) -> None:
        self._module = module.eval()
        self._parameter_bytes = sum(p.numel() * p.element_size() for p in module.parameters())

    def _forward(self, inputs: dict[str, np.ndarray]) -> Any:
        import torch

        with torch.inference_mode():
            tensors = {
                name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in inputs.items()
            }
            return self._module(**tensors)

    def unload(self) -> None:
        self._module = None

    @property
    def memory_bytes(self) -> int:
        return getattr(self, "_parameter_bytes", 0) or super().memory_bytes
