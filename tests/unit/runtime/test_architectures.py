"""Built-in architectures: shapes, signatures, padding invariance, and the folder format."""

from __future__ import annotations

import inspect
import json

import pytest
import torch

from maas.errors import UnsupportedFormat
from maas.runtime.architectures import ARCHITECTURES, build, signature
from maas.runtime.architectures.folder import (
    ARCHITECTURE_FILE,
    load_folder,
    load_module,
    read_architecture,
    save_folder,
)

TINY = {
    "small-cnn": {"num_classes": 3, "in_channels": 1, "image_size": 8, "channels": [2, 4]},
    "lstm-classifier": {"vocab_size": 50, "num_classes": 3, "embedding_dim": 8, "hidden_size": 8},
    "transformer-classifier": {
        "vocab_size": 50,
        "num_classes": 3,
        "d_model": 8,
        "nhead": 2,
        "num_layers": 1,
        "dim_feedforward": 16,
        "max_length": 16,
    },
}
TEXT = ["lstm-classifier", "transformer-classifier"]
LENGTHS = (3, 7, 12)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def example_inputs(name: str, arguments: dict, batch: int = 2, length: int = 5) -> dict:
    """Tensors built from the signature, each -1 replaced by a small size."""
    inputs, _ = signature(name, arguments)
    tensors = {}
    for spec in inputs:
        shape = [batch, *(length if dim == -1 else dim for dim in spec["shape"][1:])]
        if spec["datatype"] == "FP32":
            tensors[spec["name"]] = torch.randn(shape)
        elif spec["name"] == "attention_mask":
            tensors[spec["name"]] = torch.ones(shape, dtype=torch.int64)
        else:
            tensors[spec["name"]] = torch.randint(1, 50, shape)
    return tensors


def run(module: torch.nn.Module, **inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return module.eval()(**inputs)


@pytest.mark.parametrize(
    ("name", "arguments", "num_classes"),
    [("small-cnn", {}, 10), ("lstm-classifier", {"vocab_size": 50}, 2),
     ("transformer-classifier", {"vocab_size": 50}, 2)],
)  # fmt: skip
def test_defaults_build_and_give_logits(name, arguments, num_classes):
    module = build(name, arguments)
    logits = run(module, **example_inputs(name, arguments, batch=3))
    assert logits.shape == (3, num_classes)
    assert logits.dtype == torch.float32


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_signature_matches_forward(name):
    arguments = TINY[name]
    inputs, outputs = signature(name, arguments)
    module = build(name, arguments)
    assert [spec["name"] for spec in inputs] == list(inspect.signature(module.forward).parameters)
    logits = run(module, **example_inputs(name, arguments, batch=2))
    [output] = outputs
    assert output["datatype"] == "FP32"
    assert list(logits.shape) == [2 if dim == -1 else dim for dim in output["shape"]]


def test_cnn_signature():
    inputs, outputs = signature("small-cnn", TINY["small-cnn"])
    assert inputs == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert outputs == [{"name": "logits", "datatype": "FP32", "shape": [-1, 3]}]


@pytest.mark.parametrize("name", TEXT)
def test_text_signature(name):
    inputs, outputs = signature(name, TINY[name])
    assert inputs == [
        {"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]},
        {"name": "attention_mask", "datatype": "INT64", "shape": [-1, -1]},
    ]
    assert outputs == [{"name": "logits", "datatype": "FP32", "shape": [-1, 3]}]


@pytest.mark.parametrize(
    ("name", "extra"),
    [
        ("lstm-classifier", {}),
        ("lstm-classifier", {"bidirectional": True, "num_layers": 2}),
        ("transformer-classifier", {}),
    ],
)
def test_padding_never_changes_a_sequence(name, extra):
    module = build(name, {**TINY[name], **extra})
    sequences = [torch.randint(1, 50, (length,)) for length in LENGTHS]
    alone = torch.cat([run(module, input_ids=seq[None]) for seq in sequences])
    batch = torch.zeros(len(LENGTHS), max(LENGTHS), dtype=torch.int64)
    mask = torch.zeros_like(batch)
    for row, seq in enumerate(sequences):
        batch[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
    together = run(module, input_ids=batch, attention_mask=mask)
    atol = 1e-6 if name == "lstm-classifier" else 1e-5
    torch.testing.assert_close(together, alone, atol=atol, rtol=0)
    without_mask = run(module, input_ids=batch)
    torch.testing.assert_close(without_mask, together, atol=0, rtol=0)


@pytest.mark.parametrize("name", TEXT)
def test_mask_counts_over_pad_tokens(name):
    """The explicit mask wins: a real token equal to padding_idx is still read."""
    module = build(name, TINY[name])
    ids = torch.tensor([[5, 0, 7, 0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    with_pad_token = run(module, input_ids=ids, attention_mask=mask)
    truncated = run(module, input_ids=ids[:, :3], attention_mask=mask[:, :3])
    torch.testing.assert_close(with_pad_token, truncated, atol=1e-5, rtol=0)
    assert mask.tolist() == [[1, 1, 1, 0]]  # the caller's tensor is left alone


@pytest.mark.parametrize("name", TEXT)
def test_empty_sequence_gives_finite_logits(name):
    logits = run(build(name, TINY[name]), input_ids=torch.zeros(2, 4, dtype=torch.int64))
    assert torch.isfinite(logits).all()


def test_transformer_refuses_sequences_over_max_length():
    module = build("transformer-classifier", TINY["transformer-classifier"])
    run(module, input_ids=torch.ones(1, 16, dtype=torch.int64))
    with pytest.raises(ValueError, match="17 tokens is over max_length 16"):
        run(module, input_ids=torch.ones(1, 17, dtype=torch.int64))


def test_build_refuses_unknown_names():
    with pytest.raises(UnsupportedFormat, match="unknown architecture 'resnet'") as err:
        build("resnet", {})
    assert "lstm-classifier, small-cnn, transformer-classifier" in str(err.value)


@pytest.mark.parametrize(
    ("name", "arguments", "message"),
    [
        ("small-cnn", {"num_clases": 3}, "no argument 'num_clases'; it takes num_classes"),
        ("lstm-classifier", {}, "needs argument 'vocab_size'"),
        ("lstm-classifier", {"vocab_size": "50"}, "'vocab_size' should be an integer"),
        ("lstm-classifier", {"vocab_size": 50, "bidirectional": 1}, "'bidirectional' should be"),
        ("small-cnn", {"channels": [8, "x"]}, "'channels' should be a list of integers"),
        ("small-cnn", {"image_size": 2}, "image_size 2 is too small"),
        ("transformer-classifier", {"vocab_size": 50, "nhead": 3}, "not divisible by nhead 3"),
        ("lstm-classifier", {"vocab_size": 5, "padding_idx": 5}, "padding_idx 5 is not below"),
    ],
)
def test_build_refuses_bad_arguments(name, arguments, message):
    with pytest.raises(UnsupportedFormat, match=message):
        build(name, arguments)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_folder_round_trip(tmp_path, name):
    module = build(name, TINY[name])
    labels = ["a", "b", "c"]
    save_folder(module, tmp_path, architecture=name, arguments=TINY[name], labels=labels)
    description = read_architecture(tmp_path)
    assert description == {
        "format": 1,
        "architecture": name,
        "arguments": TINY[name],
        "labels": labels,
        "preprocessing": {},
    }
    loaded, _ = load_folder(tmp_path)
    assert not loaded.training
    inputs = example_inputs(name, TINY[name])
    torch.testing.assert_close(run(loaded, **inputs), run(module, **inputs), atol=0, rtol=0)


def test_load_module_from_a_state_dict():
    module = build("small-cnn", TINY["small-cnn"])
    loaded = load_module("small-cnn", TINY["small-cnn"], module.state_dict())
    inputs = example_inputs("small-cnn", TINY["small-cnn"])
    torch.testing.assert_close(run(loaded, **inputs), run(module, **inputs), atol=0, rtol=0)


def test_save_folder_keeps_preprocessing(tmp_path):
    preprocessing = {"image_size": [8, 8], "mean": [0.5], "std": [0.5]}
    module = build("small-cnn", TINY["small-cnn"])
    save_folder(
        module, tmp_path, architecture="small-cnn", arguments=TINY["small-cnn"],
        preprocessing=preprocessing,
    )  # fmt: skip
    description = read_architecture(tmp_path)
    assert description["preprocessing"] == preprocessing
    assert description["labels"] is None


def test_save_folder_handles_shared_tensors(tmp_path):
    module = build("small-cnn", TINY["small-cnn"])
    first, last = module.classifier[1], module.classifier[4]
    last.bias = torch.nn.Parameter(first.bias.data[:3])  # shares the other bias's storage
    save_folder(module, tmp_path, architecture="small-cnn", arguments=TINY["small-cnn"])
    loaded, _ = load_folder(tmp_path)
    torch.testing.assert_close(loaded.classifier[4].bias, first.bias.detach()[:3])


def write_description(folder, **changes):
    description = {
        "format": 1,
        "architecture": "small-cnn",
        "arguments": TINY["small-cnn"],
        "labels": None,
        "preprocessing": {},
        **changes,
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ARCHITECTURE_FILE).write_text(json.dumps(description))
    return folder


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"format": 2}, "has format 2; this maas reads format 1"),
        ({"architecture": "resnet"}, "unknown architecture 'resnet'; known: lstm-classifier"),
        ({"arguments": []}, "should be a JSON object"),
        ({"arguments": {"depth": 3}}, "small-cnn has no argument 'depth'"),
        ({"labels": ["a", "b"]}, "has 2 labels for 3 classes"),
        ({"labels": [1, 2, 3]}, "labels should be a list of strings"),
        ({"preprocessing": [1]}, "preprocessing should be a JSON object"),
    ],
)
def test_read_architecture_refuses(tmp_path, changes, message):
    with pytest.raises(UnsupportedFormat, match=message):
        read_architecture(write_description(tmp_path, **changes))


def test_read_architecture_refuses_missing_and_broken_files(tmp_path):
    with pytest.raises(UnsupportedFormat, match=f"{ARCHITECTURE_FILE} is missing"):
        read_architecture(tmp_path)
    (tmp_path / ARCHITECTURE_FILE).write_text("{not json")
    with pytest.raises(UnsupportedFormat, match="cannot be read: not valid JSON"):
        read_architecture(tmp_path)


def test_save_folder_refuses_wrong_labels(tmp_path):
    module = build("small-cnn", TINY["small-cnn"])
    with pytest.raises(UnsupportedFormat, match="has 1 labels for 3 classes"):
        save_folder(
            module, tmp_path, architecture="small-cnn", arguments=TINY["small-cnn"], labels=["x"]
        )
    assert not (tmp_path / ARCHITECTURE_FILE).exists()


def test_load_module_names_missing_and_unexpected_keys():
    state = build("small-cnn", TINY["small-cnn"]).state_dict()
    del state["features.0.weight"]
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(UnsupportedFormat) as err:
        load_module("small-cnn", TINY["small-cnn"], state)
    message = str(err.value)
    assert "missing features.0.weight" in message
    assert "unexpected extra.weight" in message


def test_load_module_shows_the_first_few_keys():
    state = build("transformer-classifier", TINY["transformer-classifier"]).state_dict()
    with pytest.raises(UnsupportedFormat, match=r"missing .*\(and \d+ more\)"):
        load_module("transformer-classifier", TINY["transformer-classifier"], {})
    assert len(state) > 5


def test_load_module_names_wrong_shapes():
    state = build("lstm-classifier", {"vocab_size": 60}).state_dict()
    with pytest.raises(UnsupportedFormat, match=r"embedding.weight has shape \[60, 64\]"):
        load_module("lstm-classifier", {"vocab_size": 50}, state)
