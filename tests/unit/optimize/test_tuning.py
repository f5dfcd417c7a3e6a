"""The learning steps' loops and the students they build."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from maas.optimize.data import Examples
from maas.optimize.recipe import layer_count
from maas.optimize.tuning import distil, fine_tune, student_arguments
from maas.runtime.architectures import build

CNN = {"num_classes": 3, "in_channels": 3, "image_size": 8, "channels": [8, 16], "hidden": 32}


def test_students_are_narrower_and_as_deep_unless_told():
    assert student_arguments("small-cnn", CNN, 0.5) == {**CNN, "channels": [4, 8], "hidden": 16}
    shallow = student_arguments("small-cnn", CNN, 0.5, layers=1)
    assert shallow["channels"] == [4] and layer_count("small-cnn", shallow) == 1
    lstm = {"vocab_size": 50, "embedding_dim": 64, "hidden_size": 32, "num_layers": 2}
    assert student_arguments("lstm-classifier", lstm, 0.25, layers=1) == {
        **lstm,
        "embedding_dim": 16,
        "hidden_size": 8,
        "num_layers": 1,
    }
    encoder = {"vocab_size": 50, "d_model": 64, "nhead": 4, "dim_feedforward": 128}
    narrow = student_arguments("transformer-classifier", encoder, 0.3)
    assert narrow["d_model"] == 20 and narrow["d_model"] % 4 == 0  # a multiple of the heads
    assert narrow["dim_feedforward"] == 38
    for name, arguments in (("lstm-classifier", lstm), ("transformer-classifier", narrow)):
        build(name, arguments)  # each student is a valid architecture


def examples(count: int = 96) -> Examples:
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (count,), generator=generator)
    images = torch.randn(count, 3, 8, 8, generator=generator) + labels[:, None, None, None]
    return Examples(images, labels)


def test_a_fine_tune_lowers_the_loss_and_keeps_pruned_zeros():
    torch.manual_seed(0)
    model = build("small-cnn", CNN)
    with torch.no_grad():
        weight = model.features[0].weight
        weight[weight.abs() < weight.abs().median()] = 0
    zeros = model.features[0].weight == 0
    data = examples()
    with torch.no_grad():
        before = float(F.cross_entropy(model(data.inputs), data.labels))
    after = fine_tune(model, data, 40, 3e-3, seed=0)
    assert after < before
    assert (model.features[0].weight[zeros] == 0).all()
    assert (model.features[0].weight[~zeros] != 0).any()


def test_distillation_with_alpha_one_pulls_the_student_to_the_teacher():
    torch.manual_seed(0)
    teacher = build("small-cnn", CNN).eval()
    student = build("small-cnn", student_arguments("small-cnn", CNN, 0.5))
    data = examples()

    def gap() -> float:
        with torch.no_grad():
            return float(
                F.kl_div(
                    F.log_softmax(student(data.inputs), -1),
                    F.log_softmax(teacher(data.inputs), -1),
                    reduction="batchmean",
                    log_target=True,
                )
            )

    before = gap()
    distil(teacher, student, data, 60, 3e-3, temperature=1.0, alpha=1.0, seed=0)
    assert gap() < before / 2


def test_int8_activations_keep_the_variant_closer_to_float():
    from maas.optimize.steps import closer_activations

    expected = torch.zeros(4)
    offsets = {"int8-dynamic": 0.2, "int8-dynamic-a8": 0.1}
    chosen, note = closer_activations(expected, lambda name: expected + offsets[name])
    assert chosen == "int8-dynamic-a8" and note.startswith("8-bit activations kept")
    offsets = {"int8-dynamic": 0.05, "int8-dynamic-a8": 0.1}
    chosen, note = closer_activations(expected, lambda name: expected + offsets[name])
    assert chosen == "int8-dynamic" and "7-bit activations 0.05" in note
