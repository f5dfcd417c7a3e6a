"""LSTM layers stored as int8 weights with a scale per row (maas/runtime/int8_linear.py): the
running module holds exactly the stored integers, computes what the float LSTM does within
int8's error, packed sequences of mixed lengths included, and a corrupt scale is refused."""

from __future__ import annotations

import pytest
import torch

from maas.errors import UnsupportedFormat
from maas.runtime.architectures import build
from maas.runtime.architectures.folder import load_module
from maas.runtime.int8_linear import is_scale, lstm_paths, quantized_state

ARGUMENTS = {
    "vocab_size": 50,
    "num_classes": 3,
    "embedding_dim": 16,
    "hidden_size": 24,
    "num_layers": 2,
    "bidirectional": True,
}


@pytest.fixture
def model():
    torch.manual_seed(0)
    return build("lstm-classifier", ARGUMENTS).eval()


def _batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 50, (6, 12), generator=generator)
    mask = torch.ones_like(ids)
    for row, length in enumerate([12, 3, 7, 1, 12, 5]):
        ids[row, length:], mask[row, length:] = 0, 0
    return {"input_ids": ids, "attention_mask": mask}


def test_every_lstm_weight_is_stored_as_int8_with_row_scales(model):
    assert lstm_paths(model) == ["lstm"]
    state = quantized_state(model, ["classifier", "lstm"])
    lstm_weights = [k for k in state if k.startswith("lstm.weight_")]
    codes = [k for k in lstm_weights if not is_scale(k)]
    assert len(codes) == 2 * 2 * 2  # ih and hh, 2 layers, 2 directions
    for key in codes:
        assert (
            state[key].dtype == torch.int8 and state[f"{key}_scale"].shape == state[key].shape[:1]
        )
    assert state["lstm.bias_ih_l0"].dtype == torch.float32  # biases stay float


@pytest.mark.parametrize("quantization", ["int8-dynamic", "int8-dynamic-a8"])
def test_the_int8_lstm_holds_the_stored_integers_and_computes_close_to_float(model, quantization):
    state = quantized_state(model, ["classifier", "lstm"])
    loaded = load_module("lstm-classifier", ARGUMENTS, state, quantization)
    assert type(loaded.lstm).__module__.startswith("torch.ao.nn.quantized.dynamic")
    weights = loaded.lstm._weight_bias()["weight"]
    for name, stored in weights.items():
        torch.testing.assert_close(stored.int_repr(), state[f"lstm.{name}"])
    batch = _batch()
    with torch.inference_mode():
        expected, got = model(**batch), loaded(**batch)
    assert not torch.equal(expected, got)  # really int8
    torch.testing.assert_close(got, expected, atol=0.05, rtol=0.05)
    with torch.inference_mode():  # a short sequence alone: its padding never counted
        alone = loaded(**{k: v[1:2, :3] for k, v in batch.items()})
        float_alone = model(**{k: v[1:2, :3] for k, v in batch.items()})
    torch.testing.assert_close(float_alone[0], expected[1], atol=1e-5, rtol=1e-5)
    # Activations are quantized over the whole batch, so alone it rounds a little otherwise.
    torch.testing.assert_close(alone[0], expected[1], atol=0.05, rtol=0.05)


def test_a_scale_that_does_not_fit_its_lstm_weight_is_refused(model):
    state = quantized_state(model, ["lstm"])
    state["lstm.weight_hh_l1_scale"] = state["lstm.weight_hh_l1_scale"][:5]
    with pytest.raises(UnsupportedFormat, match="weight_hh_l1_scale should hold one float"):
        load_module("lstm-classifier", ARGUMENTS, state, "int8-dynamic")
