"""Structured pruning of the text classifiers (maas/optimize/steps.py): the pruned model is
smaller and computes exactly what its parent computes with the removed units silenced, so
the units that go are the only thing that changes."""

from __future__ import annotations

import pytest
import torch

from maas.optimize.steps import Candidate, prune_structured
from maas.runtime.architectures import build


def _candidate(architecture: str, arguments: dict) -> Candidate:
    torch.manual_seed(0)
    module = build(architecture, arguments).eval()
    return Candidate(module, {"architecture": architecture, "arguments": arguments})


def _tokens() -> dict[str, torch.Tensor]:
    ids = torch.randint(1, 40, (5, 9), generator=torch.Generator().manual_seed(2))
    ids[1, 4:], ids[3, 2:] = 0, 0
    return {"input_ids": ids, "attention_mask": (ids != 0).long()}


def _kept_rows(small: torch.Tensor, big: torch.Tensor) -> list[bool]:
    return [any(torch.equal(row, other) for other in small) for row in big]


def test_a_transformer_classifier_loses_feed_forward_units_and_nothing_else():
    arguments = {"vocab_size": 40, "num_classes": 3, "d_model": 16, "nhead": 2,
                 "num_layers": 2, "dim_feedforward": 32}  # fmt: skip
    candidate = _candidate("transformer-classifier", arguments)
    pruned = prune_structured(candidate, 0.5)
    assert pruned.description["arguments"]["dim_feedforward"] == 16
    assert "feed-forward units 32 -> 16 in each of 2 layers" in pruned.notes[-1]
    silenced = build("transformer-classifier", arguments)
    silenced.load_state_dict(candidate.module.state_dict())
    silenced.eval()
    with torch.no_grad():
        for big, small in zip(silenced.encoder.layers, pruned.module.encoder.layers, strict=True):
            kept = _kept_rows(small.linear1.weight, big.linear1.weight)
            assert sum(kept) == 16
            gone = [not k for k in kept]
            big.linear1.weight[gone] = 0
            big.linear1.bias[gone] = 0
        torch.testing.assert_close(pruned.module(**_tokens()), silenced(**_tokens()))


@pytest.mark.parametrize(("layers", "bidirectional"), [(1, False), (2, True)])
def test_an_lstm_classifier_loses_hidden_units_with_what_reads_them(layers, bidirectional):
    arguments = {"vocab_size": 40, "num_classes": 3, "embedding_dim": 8, "hidden_size": 12,
                 "num_layers": layers, "bidirectional": bidirectional}  # fmt: skip
    candidate = _candidate("lstm-classifier", arguments)
    pruned = prune_structured(candidate, 0.25)
    assert pruned.description["arguments"]["hidden_size"] == 9
    before = sum(p.numel() for p in candidate.module.parameters())
    assert sum(p.numel() for p in pruned.module.parameters()) < before
    # Silencing a unit (its four gate rows and biases zero) keeps its state at zero forever;
    # the three units of each layer and direction whose gate rows weigh least are the ones.
    silenced = build("lstm-classifier", arguments)
    silenced.load_state_dict(candidate.module.state_dict())
    silenced.eval()
    suffixes = ["", "_reverse"] if bidirectional else [""]
    with torch.no_grad():
        for layer in range(layers):
            for suffix in suffixes:
                big = getattr(silenced.lstm, f"weight_hh_l{layer}{suffix}")
                scores = (
                    (
                        getattr(candidate.module.lstm, f"weight_ih_l{layer}{suffix}").abs().sum(1)
                        + big.abs().sum(1)
                    )
                    .view(4, 12)
                    .sum(0)
                )
                gone = scores.argsort()[:3]
                rows = torch.cat([gate * 12 + gone for gate in range(4)])
                for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                    getattr(silenced.lstm, f"{name}_l{layer}{suffix}")[rows] = 0
        torch.testing.assert_close(
            pruned.module(**_tokens()), silenced(**_tokens()), atol=1e-5, rtol=1e-5
        )
