"""Faster linear layers for the CPU, as a module swap (the model code never knows).

Weights are packed once, at load, into the layout oneMKL (float32) or oneDNN (bfloat16) wants,
so each step skips the re-layout ``F.linear`` would do. Results equal ``F.linear``'s: packing
changes the memory layout, not the arithmetic. Where the ops are missing, nothing is swapped.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

BATCH_HINT = 32
"""Rows the packing is tuned for (a full decode batch); any row count works."""


class PackedLinear(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach()
        self.bias = None if linear.bias is None else linear.bias.detach()
        self.out_features = weight.shape[0]
        self.bf16 = weight.dtype == torch.bfloat16
        if self.bf16:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, BATCH_HINT)
            self.weight = None
        else:
            self.packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, BATCH_HINT)
            self.weight = weight  # the op wants the plain weight beside the packed one

    def forward(self, x: Tensor) -> Tensor:
        if self.bf16:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return torch.ops.mkl._mkl_linear(x, self.packed, self.weight, self.bias, BATCH_HINT)


def pack_linears(model: nn.Module) -> int:
    """Replace every ``nn.Linear`` in ``model`` by a packed one; returns how many."""
    if not _available(next(model.parameters()).dtype):
        log.info("packed linear kernels are not available; using F.linear")
        return 0
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.Linear)
    ]
    for parent, name, child in targets:
        setattr(parent, name, PackedLinear(child))
    return len(targets)


def _available(dtype: torch.dtype) -> bool:
    """Whether the packed ops exist in this torch build and agree with F.linear."""
    try:
        linear = nn.Linear(8, 4).to(dtype)
        x = torch.randn(3, 8, dtype=dtype)
        expected = torch.nn.functional.linear(x, linear.weight, linear.bias).float()
        return bool(torch.allclose(PackedLinear(linear)(x).float(), expected, atol=1e-2))
    except (RuntimeError, AttributeError):
        return False
