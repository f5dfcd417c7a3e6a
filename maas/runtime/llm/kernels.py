"""Faster linear layers for the CPU, as a module swap (the model code never knows).

Weights are packed once, at load, into the layout oneMKL (float32) or oneDNN (bfloat16) wants,
so each step skips the re-layout ``F.linear`` would do. Results equal ``F.linear``'s: packing
changes the memory layout, not the arithmetic. Where the ops are missing, nothing is swapped.
"""

from __future__ import annotations

import functools
import logging
import warnings
import weakref
from dataclasses import dataclass

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
            # inductor packs only constant weights; a compiled step takes the plain one
            return torch.nn.functional.linear(x, self.weight, self.bias)
        if self.bf16:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return torch.ops.mkl._mkl_linear(x, self.packed, self.weight, self.bias, BATCH_HINT)


class Int8Linear(nn.Module):
    """W8A8: weights int8 per output channel (symmetric), activations uint8 per token (row,
    asymmetric, as fbgemm's dynamic linear quantises them), int32 sums, rescaled to float32.

    A lone row (one sequence decoding) runs fbgemm's dynamic int8 kernel, which reads the
    weights at about twice the speed of ``torch._int_mm`` here; several rows run
    ``torch._int_mm`` on the VNNI units. Both sum the same integers exactly and rescale them
    the same way, so a row's result is bit for bit the same alone or in a batch: batching
    never changes a sequence's output. Whether this CPU's fbgemm agrees with that exactly is
    checked once (``row_kernel``); where it does not, lone rows take ``_int_mm`` too."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.weight = torch.round(weight / scale[:, None]).to(torch.int8)  # [out, in]
        self.scale = scale
        self.column_sums = self.weight.sum(dim=1, dtype=torch.int32)
        self.bias = None if linear.bias is None else linear.bias.detach().float()
        self.out_features = weight.shape[0]
        self.levels = row_kernel().levels
        self.row_packed = _register_row_weights(self.weight, self.scale)

    @property
    def memory_bytes(self) -> int:
        own = _bytes(self.weight) + _bytes(self.scale) + _bytes(self.bias)
        # fbgemm's packed copy of the weights (a byte each) for lone rows
        return own + _bytes(self.column_sums) + (_bytes(self.weight) if self.row_packed else 0)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1])
        if rows.shape[0] == 1 and self.row_packed:
            out = torch.ops.maas.int8_row_linear(rows, self.weight)
        else:
            out = _int8_rows(rows, self.weight, self.scale, self.column_sums, self.levels)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*shape[:-1], self.out_features)


SMALLEST_SCALE = 6.1e-5
"""fbgemm's (and ATen's) smallest activation scale: rows of tinier values are widened to it."""


def quantize_rows(x: Tensor, levels: int) -> tuple[Tensor, Tensor, Tensor]:
    """Each row of ``x`` (float32) as integers in [0, levels], asymmetric, with the scale and
    zero point ATen's ``ChooseQuantizationParams`` picks for a tensor of that row alone and
    the rounding fbgemm's quantiser does (one fused multiply-add, then round half to even).
    Returns (integers as int32, scale [rows, 1] float32, zero point [rows, 1] int32)."""
    low = x.amin(dim=1, keepdim=True).clamp(max=0)
    high = x.amax(dim=1, keepdim=True).clamp(min=0)
    scale = ((high.double() - low.double()) / levels).float()
    small = scale < SMALLEST_SCALE
    widen = SMALLEST_SCALE / scale
    low, high = (
        torch.where(
            small,
            torch.where(
                low == 0, low, torch.where(high == 0, -SMALLEST_SCALE * levels, low * widen)
            ),
            low,
        ),
        torch.where(
            small,
            torch.where(
                low == 0, SMALLEST_SCALE * levels, torch.where(high == 0, high, high * widen)
            ),
            high,
        ),
    )
    scale = torch.where(small, SMALLEST_SCALE, scale)
    exact = scale.double()
    from_low, from_high = -low.double() / exact, levels - high.double() / exact
    low_error, high_error = -from_low.abs(), levels - (high.double() / exact).abs()
    zero = torch.where(low_error < high_error, from_low, from_high).clamp(0, levels).round()
    # x * (1 / scale) + zero in double is exact, so casting it rounds once, as an FMA does
    inverse = (1.0 / scale).double()
    values = (x.double() * inverse + zero).float().round().clamp(0, levels)
    return values.to(torch.int32), scale, zero.to(torch.int32)


def _int8_rows(
    x: Tensor, weight: Tensor, scale: Tensor, column_sums: Tensor, levels: int
) -> Tensor:
    values, x_scale, zero = quantize_rows(x.float(), levels)
    shift = 128 if levels > 127 else 0  # int8 holds [0, 127]; a full byte is moved down 128
    sums = torch._int_mm((values - shift).to(torch.int8), weight.t())
    sums = sums + (shift - zero) * column_sums
    return sums.float() * (x_scale * scale)


@dataclass(frozen=True)
class RowKernel:
    """How lone rows are multiplied on this machine: ``levels`` is the activations' top
    integer (255: a full byte, where the CPU sums uint8 x int8 products without saturating;
    127 otherwise), ``fbgemm`` whether fbgemm's kernel agreed bit for bit with ``_int_mm``."""

    levels: int
    fbgemm: bool


@functools.cache
def row_kernel() -> RowKernel:
    """Checked once per process, on random weights and rows of varied scale."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 256, generator=generator)
    scale = weight.abs().amax(dim=1) / 127
    weight = torch.round(weight / scale[:, None]).to(torch.int8)
    sums = weight.sum(dim=1, dtype=torch.int32)
    rows = torch.randn(16, 256, generator=generator) * torch.logspace(-5, 2, 16)[:, None]
    for levels in (255, 127):
        try:
            packed = _pack(weight, scale)
            for row in rows.split(1):
                got = torch.ops.quantized.linear_dynamic(row, packed, levels == 127)
                if not torch.equal(got, _int8_rows(row, weight, scale, sums, levels)):
                    break
            else:
                return RowKernel(levels, fbgemm=True)
        except (RuntimeError, AttributeError) as err:  # no fbgemm in this build or on this CPU
            log.info("fbgemm's dynamic int8 linear is not available: %s", err)
            return RowKernel(127, fbgemm=False)
    log.info("fbgemm's dynamic int8 linear differs from _int_mm here: lone rows use _int_mm")
    return RowKernel(127, fbgemm=False)


def _pack(weight: Tensor, scale: Tensor):
    zeros = torch.zeros(weight.shape[0], dtype=torch.long)
    with warnings.catch_warnings():  # quantized tensors are deprecated upstream; torch is
        # pinned, and where they are gone row_kernel() finds no fbgemm and _int_mm serves
        warnings.simplefilter("ignore", UserWarning)
        quantized = torch._make_per_channel_quantized_tensor(weight, scale.double(), zeros, 0)
    return torch.ops.quantized.linear_prepack(quantized, None)


_ROW_WEIGHTS: dict[int, object] = {}
"""fbgemm's packing of each Int8Linear's weights, by the address of the int8 weights (what a
compiled graph passes the op), dropped when those weights are freed."""


def _register_row_weights(weight: Tensor, scale: Tensor) -> bool:
    if not row_kernel().fbgemm:
        return False
    address = weight.data_ptr()
    _ROW_WEIGHTS[address] = _pack(weight, scale)
    weakref.finalize(weight, _ROW_WEIGHTS.pop, address, None)
    return True


@torch.library.custom_op("maas::int8_row_linear", mutates_args=())
def _int8_row_linear(x: Tensor, weight: Tensor) -> Tensor:
    """One row through fbgemm's dynamic int8 kernel (an op of its own, so that a compiled
    step calls it as it is: dynamo cannot trace fbgemm's packed weights)."""
    return torch.ops.quantized.linear_dynamic(
        x.float(), _ROW_WEIGHTS[weight.data_ptr()], row_kernel().levels == 127
    )


@_int8_row_linear.register_fake
def _(x: Tensor, weight: Tensor) -> Tensor:
    return x.new_empty(x.shape[0], weight.shape[0], dtype=torch.float32)


class Int8WeightOnlyLinear(nn.Module):
    """Weights int8 per output channel, activations bfloat16, converted inside the product
    (``torch._weight_int8pack_mm``): it reads a quarter of float32's bytes, and for one or a
    few rows reads them at the memory's speed, where quantising every activation row (W8A8)
    costs more than it saves. Its float32-activation path is a slow reference (measured 9x
    slower), so the model around it runs in bfloat16."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.weight = torch.round(weight / scale[:, None]).to(torch.int8)  # [out, in]
        self.scale = scale.to(torch.bfloat16)
        bias = linear.bias
        self.bias = None if bias is None else bias.detach().to(torch.bfloat16)
        self.out_features = weight.shape[0]

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


def weight_bytes(model: nn.Module) -> int:
    """Memory of the model's weights, the swapped-in kernels' own layouts included."""
    kinds = (PackedLinear, Int8Linear, Int8WeightOnlyLinear)
    kernels = [m for m in model.modules() if isinstance(m, kinds)]
    inside = {id(p) for kernel in kernels for p in kernel.parameters()}
    shared = {id(p): p for p in model.parameters() if id(p) not in inside}
    return sum(_bytes(p) for p in shared.values()) + sum(k.memory_bytes for k in kernels)


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
