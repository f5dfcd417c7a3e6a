"""Faster linear layers for the CPU, as a module swap (the model code never knows).

Weights are packed once, at load, into the layout oneMKL (float32) or oneDNN (bfloat16) wants,
so each step skips the re-layout ``F.linear`` would do. Results equal ``F.linear``'s: packing
changes the memory layout, not the arithmetic. Where the ops are missing, nothing is swapped.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from maas.runtime.llm import int8_matmul
from maas.runtime.llm.quantized import QuantizedEmbedding, QuantizedLinear, quantize

log = logging.getLogger(__name__)

BATCH_HINT = 32
"""Rows the packing is tuned for (a full decode batch). Any row count works, but MKL's packed
float32 product is used only at exactly this many rows; at any other count the op multiplies
by the plain weight, which it therefore keeps beside the packed copy (the demo's gate and up
matrix, 576 x 3072 on two cores: 373 against 549 us at 32 rows, 443 against 445 at 24)."""


class PackedLinear(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach()
        self.bias = None if linear.bias is None else linear.bias.detach()
        self.out_features, self.in_features = weight.shape
        self.bf16 = weight.dtype == torch.bfloat16
        if self.bf16:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, BATCH_HINT)
            self.weight = None
        else:
            self.packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, BATCH_HINT)
            self.weight = weight  # the op wants the plain weight beside the packed one

    @property
    def memory_bytes(self) -> int:
        out_features, in_features = self.out_features, self.in_features
        element = 2 if self.bf16 else 4 * 2  # float32 keeps the plain weight beside the packed
        return out_features * in_features * element + _bytes(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        if torch.compiler.is_compiling() and self.weight is not None:
            # inductor packs only constant weights: compiled, a packed float32 layer takes
            # the plain weight (the runner compiles unpacked models, but a packed one works)
            return torch.nn.functional.linear(x, self.weight, self.bias)
        if self.bf16:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return torch.ops.mkl._mkl_linear(x, self.packed, self.weight, self.bias, BATCH_HINT)


class Int8Linear(nn.Module):
    """W8A8, as CTranslate2's int8: weights int8 per output channel, activations int8 per
    token (row), both symmetric; the products run on the CPU's VNNI int8 units
    (``torch._int_mm``, int32 sums, exact), or for one or two rows on int8_matmul.py's kernel
    (the same sums), and are rescaled to float32. A row's result does not depend on the other
    rows, so batching never changes a sequence's output."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.weight = torch.round(weight / scale[:, None]).to(torch.int8)  # [out, in]
        self.weight_sums = int8_matmul.row_sums(self.weight)  # the kernel's, see int8_matmul.c
        self.scale = scale
        self.bias = None if linear.bias is None else linear.bias.detach().float()
        self.out_features = weight.shape[0]
        self.few_rows_kernel = int8_matmul.available()
        """Steps of at most ``int8_matmul.ROWS_MAX`` rows use the C kernel (same sums)."""

    @property
    def memory_bytes(self) -> int:
        parts = (self.weight, self.weight_sums, self.scale, self.bias)
        return sum(_bytes(t) for t in parts)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        x_scale = x.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12).div_(127)
        quantized = (x / x_scale).round_().to(torch.int8)
        if self.few_rows_kernel:
            sums = int8_matmul.int8_matmul(quantized, self.weight, self.weight_sums)
        else:
            sums = torch._int_mm(quantized, self.weight.t())
        out = torch.mul(sums, x_scale).mul_(self.scale)
        if self.bias is not None:
            out += self.bias
        return out.view(*shape[:-1], self.out_features)


class Int8WeightOnlyLinear(nn.Module):
    """Weights int8 per output channel, activations bfloat16, converted inside the product
    (``torch._weight_int8pack_mm``): it reads a quarter of float32's bytes, and for one or a
    few rows reads them at the memory's speed, where quantising every activation row (W8A8)
    costs more than it saves. Its float32-activation path is a slow reference (measured 9x
    slower), so the model around it runs in bfloat16."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        # stored int8's rounding: the codes computed against the bfloat16 scale the kernel
        # reads, or every code would carry the scale's rounding too
        stored = quantize(linear.weight, "int8")
        self.weight, self.scale = stored.codes, stored.scale  # [out, in] int8, [out] bfloat16
        bias = linear.bias
        self.bias = None if bias is None else bias.detach().to(torch.bfloat16)
        self.out_features = stored.codes.shape[0]

    @property
    def memory_bytes(self) -> int:
        return _bytes(self.weight) + _bytes(self.scale) + _bytes(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1]).to(torch.bfloat16)
        out = torch._weight_int8pack_mm(rows, self.weight, self.scale)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*shape[:-1], self.out_features)


class Int8Embedding(nn.Module):
    """Token embeddings read from the int8 head they are tied to (one matrix in the
    checkpoint): a step dequantises only its tokens' rows, so the float matrix, a third of a
    small model's weights, is not kept beside the int8 one."""

    def __init__(self, head: Int8Linear | Int8WeightOnlyLinear) -> None:
        super().__init__()
        self.weight, self.scale = head.weight, head.scale  # the head's own tensors
        self.num_embeddings, self.embedding_dim = head.weight.shape

    def forward(self, ids: Tensor) -> Tensor:
        return self.weight[ids].to(self.scale.dtype) * self.scale[ids, None]


def weight_bytes(model: nn.Module) -> int:
    """Memory of the model's weights, the swapped-in kernels' own layouts included."""
    kinds = (PackedLinear, Int8Linear, Int8WeightOnlyLinear)
    kernels = [m for m in model.modules() if isinstance(m, kinds)]
    inside = {id(p) for kernel in kernels for p in kernel.parameters()}
    shared = {id(p): p for p in model.parameters() if id(p) not in inside}
    stored = [m for m in model.modules() if isinstance(m, QuantizedEmbedding | QuantizedLinear)]
    return (
        sum(_bytes(p) for p in shared.values())
        + sum(k.memory_bytes for k in kernels)
        + sum(m.memory_bytes for m in stored)
    )


def _bytes(tensor: Tensor | None) -> int:
    return 0 if tensor is None else tensor.numel() * tensor.element_size()


def quantize_linears(model: nn.Module) -> int:
    """Replace every ``nn.Linear`` in ``model`` by an ``Int8Linear``; returns how many."""
    return _swap(model, Int8Linear)


def quantize_weights(model: nn.Module) -> int:
    """Replace every ``nn.Linear`` by an ``Int8WeightOnlyLinear``; returns how many."""
    return _swap(model, Int8WeightOnlyLinear)


def pack_linears(model: nn.Module) -> int:
    """Replace every ``nn.Linear`` in ``model`` by a packed one; returns how many."""
    if not _available(next(model.parameters()).dtype):
        log.info("packed linear kernels are not available; using F.linear")
        return 0
    return _swap(model, PackedLinear)


def _swap(model: nn.Module, kind: type[nn.Module]) -> int:
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.Linear)
    ]
    for parent, name, child in targets:
        setattr(parent, name, kind(child))
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
