"""Versions whose weights are stored weight-only int8 or int4 (``maas optimize ... quantize``):
the engine installs the stored codes as they are, a dtype then names only the activations,
and the model computes what its parent does, within the quantization's error."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from maas.config import Settings
from maas.optimize import llm_quantize
from maas.registry import open_registry
from maas.runtime.llm import compiled, dtypes
from maas.runtime.llm.kernels import weight_bytes
from maas.runtime.llm.quantized import QuantizedEmbedding, QuantizedLinear, parameter_count
from maas.runtime.llm.runner import ModelRunner, RunnerOptions
from maas.runtime.llm.weights import load_model
from tests.fixtures import make_tiny_llama

TEXT = "the quick brown fox jumps over the lazy dog and the cat sat on the mat"


@pytest.fixture(scope="module")
def versions(tmp_path_factory):
    """The tiny Llama (tied embedding) and its int8, int4 and bfloat16 children."""
    threads = torch.get_num_threads()
    root = tmp_path_factory.mktemp("stored")
    registry = open_registry(Settings(home=root / "home"))
    registry.import_model(
        make_tiny_llama(root / "llama", tie_word_embeddings=True, num_layers=2), "tiny"
    )
    parent = registry.open_version("tiny:1")
    opened = {"parent": parent}
    for method in ("int8", "int4", "bfloat16"):
        folder = root / method
        llm_quantize.write(parent, method, 32, folder)
        registry.import_model(folder, f"tiny-{method}")
        opened[method] = registry.open_version(f"tiny-{method}:1")
    yield opened
    registry.close()
    torch.set_num_threads(threads)


def test_the_folder_holds_codes_scales_and_the_method(versions):
    child = versions["int4"]
    config = child.manifest.config
    assert (child.manifest.format, child.manifest.runtime) == ("huggingface", "llm")
    assert config["maas_quantization"] == {"method": "int4", "group_size": 32}
    assert child.manifest.chat_template == versions["parent"].manifest.chat_template
    with child.open_file("model.safetensors") as path, safe_open(path, "pt") as weights:
        codes = weights.get_tensor("model.layers.0.mlp.down_proj.weight")
        scale = weights.get_tensor("model.layers.0.mlp.down_proj.weight_scale")
        zero = weights.get_tensor("model.layers.0.mlp.down_proj.weight_zero")
        norm = weights.get_tensor("model.norm.weight")
    assert codes.dtype == torch.uint8 and codes.shape == (32, 32)  # [hidden, intermediate / 2]
    assert scale.shape == zero.shape == (32, 2) and scale.dtype == torch.bfloat16
    assert norm.dtype == torch.bfloat16
    parent_generation = json.loads(versions["parent"].read_bytes("generation_config.json"))
    generation = json.loads(child.read_bytes("generation_config.json"))
    assert generation == {**parent_generation, "eos_token_id": generation["eos_token_id"]}
    assert parent_generation["eos_token_id"] in generation["eos_token_id"]
    plain = json.loads(versions["bfloat16"].read_bytes("config.json"))
    assert "maas_quantization" not in plain and plain["torch_dtype"] == "bfloat16"


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_the_engine_installs_the_stored_codes_and_computes_like_the_parent(versions, method):
    parent = load_model(versions["parent"], torch.float32)
    child = load_model(versions[method], torch.float32)
    assert isinstance(child.blocks[0].qkv, QuantizedLinear)
    assert isinstance(child.blocks[1].gate_up, QuantizedLinear)
    assert isinstance(child.embed, QuantizedEmbedding) and child.lm_head.tied
    assert parameter_count(child) == sum(p.numel() for p in parent.parameters())
    share = weight_bytes(child) / weight_bytes(parent)
    assert share < {"int8": 0.5, "int4": 0.4}[method]  # measured from the loaded kernels
    ids = list(range(1, 60))
    mine, theirs = dtypes.prefill_logits(child, ids), dtypes.prefill_logits(parent, ids)
    agreement = float((mine.argmax(-1) == theirs.argmax(-1)).float().mean())
    assert agreement >= {"int8": 0.9, "int4": 0.7}[method]
    assert not torch.equal(mine, theirs)


def test_auto_chooses_only_the_activations_of_stored_weights(versions):
    options = RunnerOptions(dtype="auto", max_sequences=2, max_model_len=64, compile=False)
    runner = ModelRunner(versions["int4"], options)
    assert runner.weights == "int4, group 32"
    assert [t.dtype for t in runner.dtype_choice.trials] == ["float32", "bfloat16"]
    assert isinstance(runner.model.blocks[0].qkv, QuantizedLinear)
    named = ModelRunner(versions["int4"], RunnerOptions(dtype="int8", compile=False))
    assert named.dtype == "float32"  # W8A8's activations; the weights stay the stored int4
    assert isinstance(named.model.blocks[0].o, QuantizedLinear)
    plain = ModelRunner(versions["bfloat16"], RunnerOptions(dtype="float32", compile=False))
    assert plain.weights == "" and plain.dtype == "float32"


def test_a_compiled_step_serves_stored_weights(versions, monkeypatch):
    timed = compiled._timings  # about the kernel, not speed: kept whatever a tiny model timed
    monkeypatch.setattr(
        compiled, "_timings", lambda *a: tuple((n, e, min(c, e / 2)) for n, e, c in timed(*a))
    )
    options = RunnerOptions(dtype="float32", max_sequences=2, max_model_len=64, compile=True)
    runner = ModelRunner(versions["int4"], options)
    eager = ModelRunner(versions["int4"], RunnerOptions(**{**options.__dict__, "compile": False}))
    assert runner.compiled is not None  # inductor takes the int4 kernel
    ids = list(range(1, 20))
    for one in (runner, eager):
        assert isinstance(one.model.blocks[0].qkv, QuantizedLinear)
    assert torch.allclose(
        dtypes.prefill_logits(runner.model, ids), dtypes.prefill_logits(eager.model, ids)
    )
