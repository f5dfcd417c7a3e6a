"""Split plans: balanced contiguous cuts, every parameter in exactly one stage, and a stage
that reads only its own weights from the version's files."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest
import torch

from maas.config import Settings
from maas.distributed.plan import balanced_bounds, llama_plan, module_units, split
from maas.errors import InvalidRequest
from maas.registry import open_registry
from maas.runtime.llm import weights
from maas.runtime.llm.config import LlamaConfig
from maas.runtime.llm.model import LlamaModel
from maas.runtime.llm.weights import load_model, read_config
from tests.fixtures import make_tiny_llama

SMOL = LlamaConfig(  # SmolLM2-135M's shape
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
    tie_word_embeddings=True,
)


def brute_force(sizes: list[int], parts: int) -> int:
    """The smallest largest run over every way to cut ``sizes`` into ``parts`` runs."""
    best = None
    for cuts in itertools.combinations(range(1, len(sizes)), parts - 1):
        bounds = [0, *cuts, len(sizes)]
        largest = max(sum(sizes[a:b]) for a, b in itertools.pairwise(bounds))
        best = largest if best is None else min(best, largest)
    return best


def test_balanced_bounds_find_the_smallest_largest_stage():
    rng = random.Random(0)
    for _ in range(200):
        sizes = [rng.randint(0, 100) for _ in range(rng.randint(1, 9))]
        parts = rng.randint(1, len(sizes))
        bounds = balanced_bounds(sizes, parts)
        assert bounds[0] == 0 and bounds[-1] == len(sizes) and len(bounds) == parts + 1
        assert all(a < b for a, b in itertools.pairwise(bounds)), "an empty stage"
        largest = max(sum(sizes[a:b]) for a, b in itertools.pairwise(bounds))
        assert largest == brute_force(sizes, parts), (sizes, parts, bounds)


@pytest.mark.parametrize("stages", [1, 2, 3, 5])
def test_every_parameter_is_in_exactly_one_stage(stages):
    plan = llama_plan(SMOL, stages, model="smol:1", dtype="float32")
    with torch.device("meta"):
        model = LlamaModel(SMOL)
    names = set(dict(model.named_parameters(remove_duplicate=False)))  # lm_head.weight too
    held = [name for stage in plan.stages for name in stage.parameters]
    assert sorted(held) == sorted(names) and len(held) == len(set(held))
    assert "embed.weight" in plan.stages[0].parameters
    assert {"norm.weight", "lm_head.weight"} <= set(plan.stages[-1].parameters)
    counted = sum(p.numel() for p in model.parameters()) + SMOL.vocab_size * SMOL.hidden_size
    assert sum(s.count for s in plan.stages) == counted  # the tied head is the last stage's copy
    assert plan.bytes == 4 * counted
    layers = [s.unit_range for s in plan.stages]
    assert [r.start for r in layers] == [0, *[r.stop for r in layers[:-1]]]
    assert layers[-1].stop == SMOL.num_layers


def test_stages_are_balanced_in_bytes():
    plan = llama_plan(SMOL, 2, model="smol:1", dtype="float32")
    first, second = (s.bytes for s in plan.stages)
    block = plan.stages[0].bytes - 4 * SMOL.vocab_size * SMOL.hidden_size  # stage 0's blocks
    per_block = block / len(plan.stages[0].units)
    assert abs(first - second) <= per_block, "one block more would even them out"
    assert plan.imbalance < 1.05
    bf16 = llama_plan(SMOL, 2, model="smol:1", dtype="bfloat16")
    assert bf16.bytes * 2 == plan.bytes


def test_a_plan_refuses_more_stages_than_layers_and_fewer_than_one():
    with pytest.raises(InvalidRequest, match="cannot make 31 stages"):
        llama_plan(SMOL, 31, model="smol:1", dtype="float32")
    with pytest.raises(InvalidRequest, match="at least 1"):
        llama_plan(SMOL, 0, model="smol:1", dtype="float32")


def test_classic_units_follow_the_layers_given():
    layers = [
        ("conv", torch.nn.Conv2d(1, 8, 3)),
        ("relu", torch.nn.ReLU()),
        ("fc", torch.nn.Linear(8, 10)),
    ]
    plan = split(module_units(layers), 2, model="cnn:1", dtype="float32")
    assert [u for s in plan.stages for u in s.units] == ["conv", "relu", "fc"]
    assert plan.stages[0].parameters == ("conv.weight", "conv.bias")
    assert plan.stages[1].parameters == ("fc.weight", "fc.bias")
    assert plan.stages[0].bytes == 4 * (8 * 9 + 8)


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    registry = open_registry(Settings(home=root / "home"))
    registry.import_model(make_tiny_llama(root / "llama", num_layers=4), "tiny")
    yield registry.open_version("tiny")
    registry.close()


def bytes_read() -> int:
    """Bytes this process has read through read(2)/pread(2) so far (the kernel's count)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def test_a_stage_reads_only_its_own_weights(four_layers):
    config = read_config(four_layers)
    plan = llama_plan(config, 2, model="tiny:1", dtype="float32")
    files = sum(e.size for e in four_layers.manifest.files if e.path.endswith(".safetensors"))
    for stage in plan.stages:
        before = bytes_read()
        _, state = weights.read_state(four_layers, stage.unit_range)
        read = bytes_read() - before
        held = sum(t.numel() * t.element_size() for t in state.values())
        assert held == stage.bytes
        assert read < stage.bytes + 64 * 1024, (read, stage.bytes)  # its tensors and headers
        assert read < 0.75 * files, f"stage {stage.index} read {read} of {files} bytes"


def test_a_stage_holds_exactly_its_slice_of_the_whole_model(four_layers):
    whole = load_model(four_layers, torch.float32).state_dict()
    for layers in (range(0, 1), range(1, 3), range(3, 4)):
        stage = load_model(four_layers, torch.float32, layers)
        assert (stage.embed is not None) == (layers.start == 0)
        assert (stage.lm_head is not None) == (layers.stop == 4)
        for name, tensor in stage.state_dict().items():
            if name.startswith("blocks."):
                _, local, rest = name.split(".", 2)
                name = f"blocks.{layers.start + int(local)}.{rest}"
            assert torch.equal(tensor, whole[name]), name


def test_a_stage_outside_the_model_is_refused(four_layers):
    with pytest.raises(ValueError, match="not a run"):
        weights.read_state(four_layers, range(3, 5))


def test_a_plan_of_stored_int4_weights_says_its_bytes_are_not_theirs():
    plain = llama_plan(SMOL, 2, model="smol:1", dtype="float32")
    stored = llama_plan(SMOL, 2, model="smol:3", dtype="float32", stored="int4, group 32")
    assert [s.unit_range for s in stored.stages] == [s.unit_range for s in plain.stages]
    assert any("stores them int4, group 32" in note for note in stored.notes)
    assert not any("int4" in note for note in plain.notes)
