"""Dynamic int8 linear and LSTM layers, stored as plain tensors.

``torch.ao``'s dynamically quantized ``Linear`` and ``LSTM`` (int8 weights, activations
quantized per batch at run time, fbgemm or onednn kernels) cannot be saved as safetensors:
their weights are packed in opaque objects. So a version stores, for every quantized
``nn.Linear`` at path ``p``, ``p.weight`` as int8 and ``p.weight_scale`` (float32, one per
output row; symmetric, zero point 0), and for an ``nn.LSTM`` each of its ``weight_ih_l<k>``
and ``weight_hh_l<k>`` (``_reverse`` too) the same way (``p.weight_ih_l0_scale``); every other
tensor (biases too) stays as it was. ``dynamic_int8`` rebuilds the running modules from
exactly those integers.
"""

from __future__ import annotations

import re

import torch
from torch import nn

SCALE_SUFFIX = ".weight_scale"
_SCALE = re.compile(r"\.weight(_(ih|hh)_l\d+(_reverse)?)?_scale$")
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


def lstm_paths(module: nn.Module) -> list[str]:
    """The ``nn.LSTM`` layers of ``module`` (with biases, as torch.ao's take them), by path."""
    return [path for path, layer in module.named_modules() if type(layer) is nn.LSTM and layer.bias]


def is_scale(key: str) -> bool:
    """Whether a stored tensor is the scales of an int8 weight (``p.weight_scale``,
    ``p.weight_ih_l0_scale``)."""
    return bool(_SCALE.search(key))


def quantized_state(module: nn.Module, paths: list[str]) -> dict[str, torch.Tensor]:
    """``module``'s state with the weights of the layers at ``paths`` (linear or LSTM) as
    int8 and scales."""
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    for path in paths:
        layer = module.get_submodule(path)
        names = (
            [n for n, _ in layer.named_parameters() if n.startswith("weight_")]
            if isinstance(layer, nn.LSTM)
            else ["weight"]
        )
        for name in names:
            weight = state[f"{path}.{name}"].float()
            scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
            codes = (weight / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
            state[f"{path}.{name}"], state[f"{path}.{name}_scale"] = codes, scale
    return state


def check_int8(state: dict[str, torch.Tensor]) -> None:
    """Raise UnsupportedFormat unless every scale sits beside an int8 weight it fits."""
    from maas.errors import UnsupportedFormat

    for key in [k for k in state if is_scale(k)]:
        weight = state.get(key.removesuffix("_scale"))
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

    weights = [k.removesuffix("_scale") for k in state if is_scale(k)]
    plain = {k: v for k, v in state.items() if not is_scale(k)}
    for key in weights:
        plain[key] = plain[key].float() * state[f"{key}_scale"][:, None]
    module.load_state_dict(plain, strict=True)
    paths = [k.removesuffix(".weight") for k in weights if k.endswith(".weight")]
    lstms = sorted({k.rpartition(".")[0] for k in weights if not k.endswith(".weight")})
    for path in lstms:
        _install_lstm(module, path, state, full_range)
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


def _install_lstm(module: nn.Module, path: str, state: dict, full_range: bool) -> None:
    """The float ``nn.LSTM`` at ``path`` replaced by torch.ao's dynamic LSTM holding the
    stored int8 weights (a scale per row) and float biases."""
    from torch.ao.nn.quantized.dynamic import LSTM
    from torch.ao.nn.quantized.dynamic.modules.rnn import PackedParameter

    parent, _, name = path.rpartition(".")
    owner = module.get_submodule(parent) if parent else module
    floating: nn.LSTM = getattr(owner, name)
    quantized = LSTM(
        floating.input_size,
        floating.hidden_size,
        floating.num_layers,
        True,
        floating.batch_first,
        floating.dropout,
        floating.bidirectional,
        torch.qint8,
    )

    def packed(kind: str, suffix: str):
        key = f"{path}.weight_{kind}{suffix}"
        scale = state[f"{key}_scale"].double()
        weight = torch._make_per_channel_quantized_tensor(
            state[key], scale, torch.zeros(len(scale), dtype=torch.long), 0
        )
        bias = getattr(floating, f"bias_{kind}{suffix}").detach().float()
        return torch.ops.quantized.linear_prepack(weight, bias), bias

    cells = []
    for layer in range(floating.num_layers):
        for suffix in [f"_l{layer}", f"_l{layer}_reverse"][: 2 if floating.bidirectional else 1]:
            (ih, bias_ih), (hh, bias_hh) = packed("ih", suffix), packed("hh", suffix)
            params = torch.ops.quantized.make_quantized_cell_params_dynamic(
                ih,
                hh,
                bias_ih,
                bias_hh,
                not full_range,  # reduce_range: 7-bit activations
            )
            cells.append(PackedParameter(params))
    quantized._all_weight_values = nn.ModuleList(cells)
    setattr(owner, name, quantized)
