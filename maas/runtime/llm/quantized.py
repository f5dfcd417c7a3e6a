"""Weights stored quantized: weight-only int8 or int4, as ``maas optimize`` writes them into
a Hugging Face folder and the engine serves them without ever holding float weights.

- ``int8``: symmetric, one scale per output row: ``w = q * scale``, ``q`` in -127..127.
- ``int4``: asymmetric, a scale and a zero per ``group_size`` weights of a row (llama.cpp's
  Q4_1 and torch's int4 kernels alike): ``w = (q - 8) * scale + zero``, ``q`` in 0..15, two
  codes a byte, column ``2j`` in the low four bits. The zero is the group's midpoint, the form
  the CPU kernel (``torch._weight_int4pack_mm_for_cpu``) takes.

Scales and zeros are bfloat16, the dtype the kernels compute in. In the safetensors file a
quantized matrix ``X.weight`` holds the codes (int8, or uint8 for int4), with
``X.weight_scale`` and, for int4, ``X.weight_zero``; config.json names the method under
``maas_quantization`` (``{"method": "int4", "group_size": 32}``).

The kernels compute in bfloat16 whatever the model's activations are (their float32 paths are
slow references: measured 10x slower than float32 ``F.linear``), and hand back the
activations' dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

KEY = "maas_quantization"
"""config.json's key for the stored method."""
METHODS = ("int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)
"""Group sizes torch's CPU int4 kernel takes."""
ROWS_MULTIPLE = 16
"""The int4 kernel packs rows in sixteens: a matrix of other row counts stays bfloat16."""


def stored_method(opened) -> str:
    """How a version stores its weights quantized ("int4, group 32"), or "" if it does not."""
    stored = opened.manifest.config.get(KEY) if opened.manifest.format == "huggingface" else None
    if not stored:
        return ""
    method = stored.get("method") if isinstance(stored, dict) else None
    if method == "int4":
        return f"int4, group {stored.get('group_size')}"
    return str(method)


@dataclass
class QuantizedWeight:
    method: str
    codes: Tensor
    """int8 [rows, columns], or uint8 [rows, columns / 2] for int4."""
    scale: Tensor
    """bfloat16: [rows] for int8, [rows, columns / group_size] for int4."""
    zero: Tensor | None = None
    """int4: bfloat16 [rows, columns / group_size], the midpoint of each group."""
    group_size: int = 0
    """int4's weights per scale (int8 has one scale per row)."""

    def check(self, name: str) -> QuantizedWeight:
        """This weight, if its parts fit one another (the kernels read them unchecked);
        else ``UnsupportedFormat`` naming ``name``."""
        from maas.errors import UnsupportedFormat

        codes, scale, zero = self.codes, self.scale, self.zero
        dtype = torch.int8 if self.method == "int8" else torch.uint8
        if codes.dim() != 2 or codes.dtype != dtype:
            raise UnsupportedFormat(f"{name}: {self.method} codes are a {dtype} matrix")
        rows, columns = self.shape
        if self.method == "int8":
            expected = (rows,)
        elif self.group_size not in GROUP_SIZES or columns % self.group_size:
            raise UnsupportedFormat(
                f"{name}: group_size {self.group_size!r} does not divide its {columns} columns "
                f"into groups of {', '.join(map(str, GROUP_SIZES))}"
            )
        else:
            expected = (rows, columns // self.group_size)
        parts = [scale] if self.method == "int8" else [scale, zero]
        for part in parts:
            if part is None or tuple(part.shape) != expected or part.dtype != torch.bfloat16:
                raise UnsupportedFormat(
                    f"{name}: its scales and zeros are bfloat16 of shape {list(expected)}"
                )
        if self.method == "int4" and rows % ROWS_MULTIPLE:
            raise UnsupportedFormat(f"{name}: int4 rows come in multiples of {ROWS_MULTIPLE}")
        return self

    @property
    def shape(self) -> tuple[int, int]:
        rows, width = self.codes.shape
        return rows, width * 2 if self.method == "int4" else width

    def values(self) -> Tensor:
        """The codes as integers [rows, columns] (int4 unpacked, 0..15)."""
        if self.method == "int8":
            return self.codes
        low, high = self.codes & 0x0F, self.codes >> 4
        return torch.stack((low, high), dim=-1).flatten(-2)

    def dequantize(self, rows: Tensor | None = None) -> Tensor:
        """The float32 weights (only ``rows`` of them, if given)."""
        pick = (lambda t: t) if rows is None else (lambda t: t[rows])
        if self.method == "int8":
            return pick(self.codes).float() * pick(self.scale).float()[..., None]
        codes = QuantizedWeight(self.method, pick(self.codes), self.scale).values().float()
        grouped = codes.unflatten(-1, (-1, self.group_size)) - 8
        scale, zero = pick(self.scale).float()[..., None], pick(self.zero).float()[..., None]
        return (grouped * scale + zero).flatten(-2)

    @property
    def nbytes(self) -> int:
        parts = (self.codes, self.scale, self.zero)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)


def fits(shape: tuple[int, ...], method: str, group_size: int) -> bool:
    """Whether a weight of ``shape`` can be stored as ``method``."""
    if len(shape) != 2:
        return False
    rows, columns = shape
    return method == "int8" or (columns % group_size == 0 and rows % ROWS_MULTIPLE == 0)


def quantize(weight: Tensor, method: str, group_size: int = 0) -> QuantizedWeight:
    """``weight`` [rows, columns] as ``method``; scales are rounded to bfloat16 first and the
    codes computed against the rounded scales, so storing them loses nothing more."""
    weight = weight.detach().float()
    if method == "int8":
        scale = (weight.abs().amax(dim=1).clamp(min=1e-12) / 127).bfloat16()
        codes = torch.round(weight / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
        return QuantizedWeight(method, codes, scale)
    if method != "int4":
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    if not fits(tuple(weight.shape), method, group_size):
        raise ValueError(f"a {tuple(weight.shape)} weight does not store as int4/{group_size}")
    groups = weight.unflatten(1, (-1, group_size))
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = ((high - low) / 15).clamp(min=1e-8).bfloat16()
    zero = (low + 8 * scale.float()).bfloat16()
    codes = (groups - zero.float()[..., None]) / scale.float()[..., None] + 8
    codes = torch.round(codes).clamp(0, 15).to(torch.uint8).flatten(1)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return QuantizedWeight(method, packed.contiguous(), scale, zero, group_size)


def cat(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """Matrices stacked by rows (q, k and v as one), each row keeping its scales."""
    first = parts[0]
    if any((p.method, p.group_size) != (first.method, first.group_size) for p in parts):
        raise ValueError("the parts are quantized differently")
    zero = None if first.zero is None else torch.cat([p.zero for p in parts])
    return QuantizedWeight(
        first.method,
        torch.cat([p.codes for p in parts]),
        torch.cat([p.scale for p in parts]),
        zero,
        first.group_size,
    )


class QuantizedLinear(nn.Module):
    """A linear layer over stored int8 or int4 weights, the products run by torch's CPU
    weight-only kernels (``_weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``), which
    convert the weights inside the product and read a quarter (int8) or an eighth (int4) of
    float32's bytes."""

    def __init__(self, weight: QuantizedWeight, bias: Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.method, self.group_size = weight.method, weight.group_size
        self.tied = False
        """Whether the codes are another module's too (a head tied to the embedding)."""
        self.bias = None if bias is None else bias.detach().to(torch.bfloat16)
        if weight.method == "int8":
            self.packed, self.scales = weight.codes, weight.scale
        else:
            values = weight.values().to(torch.int32)
            self.packed = torch._convert_weight_to_int4pack_for_cpu(values, 1)
            self.scales = torch.stack((weight.scale.t(), weight.zero.t()), dim=-1).contiguous()

    @property
    def memory_bytes(self) -> int:
        parts = (self.packed, self.scales, self.bias)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1]).to(torch.bfloat16)
        if self.method == "int8":
            out = torch._weight_int8pack_mm(rows, self.packed, self.scales)
        else:
            out = torch._weight_int4pack_mm_for_cpu(rows, self.packed, self.group_size, self.scales)
        if self.bias is not None:
            out = out + self.bias
        return out.to(x.dtype).view(*shape[:-1], self.out_features)


class QuantizedEmbedding(nn.Module):
    """Token embeddings over stored codes: each step dequantises only its tokens' rows."""

    def __init__(self, weight: QuantizedWeight) -> None:
        super().__init__()
        self.source = weight
        self.num_embeddings, self.embedding_dim = weight.shape

    @property
    def memory_bytes(self) -> int:
        return self.source.nbytes

    def forward(self, ids: Tensor) -> Tensor:
        return self.source.dequantize(ids)


def install(model: nn.Module, state: dict[str, Tensor | QuantizedWeight]) -> dict[str, Tensor]:
    """Swap every module whose weight ``state`` holds quantized for its quantized form, and
    return the rest of ``state`` (float tensors) for ``load_state_dict``."""
    rest, installed = {}, set()
    for name, value in state.items():
        if not isinstance(value, QuantizedWeight):
            rest[name] = value
            continue
        path = name.removesuffix(".weight")
        module = model.get_submodule(path)
        if isinstance(module, nn.Embedding):
            replacement = QuantizedEmbedding(value)
        else:
            replacement = QuantizedLinear(value, state.get(f"{path}.bias"))
            replacement.tied = id(value) in installed
        installed.add(id(value))
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, replacement)
    return {k: v for k, v in rest.items() if not _swapped_bias(model, k)}


def _swapped_bias(model: nn.Module, name: str) -> bool:
    """The bias of a swapped linear layer (now held by its QuantizedLinear)."""
    path, _, leaf = name.rpartition(".")
    return leaf == "bias" and isinstance(model.get_submodule(path), QuantizedLinear)


def parameter_count(model: nn.Module) -> int:
    """Weights of the model, stored quantized ones counted as the numbers they stand for (a
    tied embedding and head once)."""
    quantized = 0
    for module in model.modules():
        if isinstance(module, QuantizedEmbedding):
            quantized += module.num_embeddings * module.embedding_dim
        elif isinstance(module, QuantizedLinear) and not module.tied:
            quantized += module.out_features * module.in_features
            quantized += 0 if module.bias is None else module.bias.numel()
    return quantized + sum(p.numel() for p in model.parameters())
