"""Weight-only int8 and int4 stored weights (maas/runtime/llm/quantized.py): the codes, their
layout, the error bound, and the kernels' products against the dequantised weights."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from maas.runtime.llm import quantized
from maas.runtime.llm.quantized import (
    QuantizedEmbedding,
    QuantizedLinear,
    QuantizedWeight,
    install,
    parameter_count,
)


def weight(rows: int = 48, columns: int = 64, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, columns, generator=generator) * 0.05


@pytest.mark.parametrize("group_size", [32, 64])
def test_int4_codes_are_within_half_a_step_of_each_weight(group_size):
    w = weight()
    stored = quantized.quantize(w, "int4", group_size)
    assert stored.codes.dtype == torch.uint8 and stored.codes.shape == (48, 32)
    assert stored.scale.shape == stored.zero.shape == (48, 64 // group_size)
    assert stored.scale.dtype == torch.bfloat16 and stored.shape == (48, 64)
    step = stored.scale.float().repeat_interleave(group_size, dim=1)
    error = (stored.dequantize() - w).abs()
    assert (error <= step * 0.5 + 1e-6).all()
    assert error.max() > 0  # four bits do lose something


def test_int4_packs_two_codes_a_byte_even_columns_low():
    stored = quantized.quantize(weight(16, 32), "int4", 32)
    values = stored.values()
    assert values.shape == (16, 32) and int(values.max()) <= 15
    assert torch.equal(stored.codes & 0x0F, values[:, 0::2])
    assert torch.equal(stored.codes >> 4, values[:, 1::2])
    # The extremes of each group take the end codes: the whole 0..15 range is used.
    assert int(values.min()) == 0 and int(values.max()) == 15


def test_int8_is_symmetric_with_one_scale_per_row():
    w = weight()
    stored = quantized.quantize(w, "int8")
    assert stored.codes.dtype == torch.int8 and stored.scale.shape == (48,)
    assert stored.zero is None and int(stored.codes.abs().max()) == 127
    error = (stored.dequantize() - w).abs()
    assert (error <= stored.scale.float()[:, None] * 0.5 + 1e-6).all()


@pytest.mark.parametrize(
    ("shape", "group_size", "fits"),
    [((48, 64), 32, True), ((40, 64), 32, False), ((48, 96), 64, False), ((48,), 32, False)],
)
def test_what_int4_can_store(shape, group_size, fits):
    assert quantized.fits(shape, "int4", group_size) is fits
    if not fits and len(shape) == 2:
        with pytest.raises(ValueError, match="does not store as int4"):
            quantized.quantize(torch.zeros(shape), "int4", group_size)


@pytest.mark.parametrize("method", ["int4", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernel_computes_the_product_with_the_dequantised_weights(method, dtype):
    w = weight(64, 96, seed=1)
    stored = quantized.quantize(w, method, 32)
    bias = torch.randn(64)
    layer = QuantizedLinear(stored, bias)
    x = torch.randn(5, 96).to(dtype)
    out = layer(x)
    assert out.dtype == dtype and out.shape == (5, 64)
    expected = x.float() @ stored.dequantize().t() + bias
    assert torch.allclose(out.float(), expected, atol=0.05, rtol=0.02)
    # and a float product with the original weights differs by the quantization error only
    assert not torch.equal(out.float(), x.float() @ w.t() + bias)


def test_stacked_parts_keep_their_own_scales():
    parts = [quantized.quantize(weight(16, 32, seed=s), "int4", 32) for s in range(3)]
    stacked = quantized.cat(parts)
    assert stacked.shape == (48, 32)
    assert torch.equal(stacked.dequantize()[16:32], parts[1].dequantize())
    with pytest.raises(ValueError, match="quantized differently"):
        quantized.cat([parts[0], quantized.quantize(weight(16, 32), "int8")])


def test_embedding_dequantises_only_the_rows_asked_for():
    stored = quantized.quantize(weight(32, 64), "int4", 32)
    embedding = QuantizedEmbedding(stored)
    ids = torch.tensor([3, 0, 31, 3])
    assert torch.equal(embedding(ids), stored.dequantize()[ids])


def test_install_swaps_quantized_modules_and_counts_a_tied_head_once():
    model = nn.Module()
    model.embed = nn.Embedding(32, 64)
    model.proj = nn.Linear(64, 48)
    model.lm_head = nn.Linear(64, 32, bias=False)
    table = quantized.quantize(weight(32, 64), "int4", 32)
    state: dict[str, torch.Tensor | QuantizedWeight] = {
        "embed.weight": table,
        "lm_head.weight": table,  # tied: the same stored codes
        "proj.weight": quantized.quantize(weight(48, 64), "int8"),
        "proj.bias": torch.ones(48),
    }
    rest = install(model, state)
    assert rest == {}  # the bias went with its quantized linear layer
    assert isinstance(model.embed, QuantizedEmbedding)
    assert isinstance(model.proj, QuantizedLinear) and not model.proj.tied
    assert isinstance(model.lm_head, QuantizedLinear) and model.lm_head.tied
    assert parameter_count(model) == 32 * 64 + 48 * 64 + 48  # the bias too
    assert torch.allclose(model.proj(torch.zeros(1, 64)).float(), torch.ones(1, 48))


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (lambda w: QuantizedWeight("int4", w.codes, w.scale, w.zero, 0), "group_size 0"),
        (lambda w: QuantizedWeight("int4", w.codes, w.scale, w.zero, 64), "shape [48, 1]"),
        (lambda w: QuantizedWeight("int4", w.codes, w.scale, w.zero, 48), "group_size 48"),
        (lambda w: QuantizedWeight("int4", w.codes, w.scale[:, :1], w.zero, 32), "shape [48, 2]"),
        (lambda w: QuantizedWeight("int4", w.codes, w.scale, None, 32), "scales and zeros"),
        (lambda w: QuantizedWeight("int4", w.codes, w.scale.float(), w.zero, 32), "bfloat16"),
        (lambda w: QuantizedWeight("int4", w.codes.to(torch.int8), w.scale, w.zero, 32),
         "torch.uint8 matrix"),
        (lambda w: QuantizedWeight("int4", w.codes[:40], w.scale[:40], w.zero[:40], 32),
         "multiples of 16"),
        (lambda w: QuantizedWeight("int8", w.codes.to(torch.int8), w.scale, None), "shape [48]"),
    ],
)  # fmt: skip
def test_stored_parts_that_do_not_fit_are_refused_before_a_kernel_reads_them(change, says):
    from maas.errors import UnsupportedFormat

    good = quantized.quantize(weight(48, 64), "int4", 32)
    assert good.check("w") is good
    with pytest.raises(UnsupportedFormat, match=re.escape(says)):
        change(good).check("w")
