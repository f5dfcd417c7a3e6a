"""Dynamic int8 linear layers, stored as plain tensors.

``torch.ao``'s dynamically quantized ``Linear`` (int8 weights, activations quantized per batch
at run time, fbgemm or onednn kernels) cannot be saved as safetensors: its weights are packed
in an opaque object. So a version stores, for every quantized ``nn.Linear`` at path ``p``,
``p.weight`` as int8 and ``p.weight_scale`` (float32, one per output row; symmetric, zero
point 0); every other tensor stays as it was. ``dynamic_int8`` rebuilds the running modules
from exactly those integers.
"""

from __future__ import annotations

import torch
from torch import nn

SCALE_SUFFIX = ".weight_scale"
INT8_DYNAMIC = {"int8-dynamic": False, "int8-dynamic-a8": True}
"""How a version's int8 layers quantize their activations: ``int8-dynamic`` to 7 bits (torch's
``reduce_range``, safe from int16 overflow in AVX2 kernels without VNNI), ``int8-dynamic-a8``
to all 8 (the optimize step measures both against the float model and keeps the closer)."""


FUSED = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
"""Modules whose fast paths read their linear layers' weights as raw tensors: their linears
stay float."""


def linear_paths(module: nn.Module) -> list[str]:
    """The ``nn.Linear`` layers of ``module`` that can run dynamically quantized, by path."""
    skipped = [p for p, m in module.named_modules() if isinstance(m, FUSED)]
    return [
        path
        for path, layer in module.named_modules()
        if type(layer) is nn.Linear and not any(path.startswith(f"{s}.") for s in skipped)
    ]


def quantized_state(module: nn.Module, paths: list[str]) -> dict[str, torch.Tensor]:
    """``module``'s state with the weights of the layers at ``paths`` as int8 and scales."""
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    for path in paths:
        weight = state[f"{path}.weight"].float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        state[f"{path}.weight"] = (weight / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
        state[f"{path}{SCALE_SUFFIX}"] = scale
    return state


def check_int8(state: dict[str, torch.Tensor]) -> None:
    """Raise UnsupportedFormat unless every scale sits beside an int8 weight it fits."""
    from maas.errors import UnsupportedFormat

    for key in [k for k in state if k.endswith(SCALE_SUFFIX)]:
        weight = state.get(key.removesuffix(SCALE_SUFFIX) + ".weight")
        scale = state[key]
        if weight is None or weight.dtype != torch.int8 or weight.dim() != 2:
            raise UnsupportedFormat(f"{key} has no int8 matrix beside it")
        if scale.shape != weight.shape[:1] or not scale.is_floating_point():
            raise UnsupportedFormat(f"{key} should hold one float scale per row of the weight")


def _full_range_linear() -> type:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    class FullRangeLinear(DynamicLinear):
        """torch.ao's dynamic linear with activations quantized to all 8 bits.

        Its own forward passes ``reduce_range=True`` (7-bit activations, against int16
        overflow in AVX2 kernels without VNNI). Which is closer depends on the model: on
        all-MiniLM-L6-v2 (an AVX2 CPU) 8 bits gave a mean cosine to float32 of 0.993 against
        0.975, at the same speed; on a tiny LSTM classifier 8 bits overflowed and did worse."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.ops.quantized.linear_dynamic(
                x, self._packed_params._packed_params, reduce_range=False
            ).to(x.dtype)

    return FullRangeLinear


def dynamic_int8(
    module: nn.Module, state: dict[str, torch.Tensor], full_range: bool = False
) -> nn.Module:
    """``module`` (float, freshly built) with ``state`` from ``quantized_state`` loaded: the
    layers stored as int8 become dynamically quantized linears holding those very integers
    (activations quantized per batch, to 8 bits with ``full_range``, else 7)."""
    from torch.ao.nn.quantized.dynamic import Linear as ReducedRangeLinear

    DynamicLinear = _full_range_linear() if full_range else ReducedRangeLinear

    paths = [k.removesuffix(SCALE_SUFFIX) for k in state if k.endswith(SCALE_SUFFIX)]
    plain = {k: v for k, v in state.items() if not k.endswith(SCALE_SUFFIX)}
    for path in paths:
        plain[f"{path}.weight"] = (
            plain[f"{path}.weight"].float() * state[f"{path}{SCALE_SUFFIX}"][:, None]
        )
    module.load_state_dict(plain, strict=True)
    for path in paths:
        parent, _, name = path.rpartition(".")
        owner = module.get_submodule(parent) if parent else module
        floating: nn.Linear = getattr(owner, name)
        layer = DynamicLinear(floating.in_features, floating.out_features, dtype=torch.qint8)
        scale = state[f"{path}{SCALE_SUFFIX}"].double()
        weight = torch._make_per_channel_quantized_tensor(
            state[f"{path}.weight"], scale, torch.zeros(len(scale), dtype=torch.long), 0
        )
        layer.set_weight_bias(weight, floating.bias)
        setattr(owner, name, layer)
    return module
