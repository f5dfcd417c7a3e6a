"""Structured pruning and distillation of an LLM (maas/optimize/llm_shrink.py) on tiny random
Llamas: slicing out neurons and heads computes exactly what zeroing them does, the least
contributing ones go, a student keeps evenly spaced layers, training lowers its loss, and the
folders written are what the engine serves."""

from __future__ import annotations

import pytest
import torch

from maas.config import Settings
from maas.optimize import llm_shrink
from maas.registry import open_registry
from maas.runtime.llm.hf_model import load_hf_model
from maas.runtime.llm.tokenizer import load_tokenizer
from maas.runtime.llm.weights import load_model
from tests.fixtures import make_tiny_llama

TEXTS = [
    "the quick brown fox jumps over the lazy dog and the cat sat on the mat",
    "a river flows through the old town past the market and the church",
    "she opened the window and the cold morning air filled the small kitchen",
] * 8


@pytest.fixture(scope="module")
def opened(tmp_path_factory):
    threads = torch.get_num_threads()
    root = tmp_path_factory.mktemp("shrink")
    registry = open_registry(Settings(home=root / "home"))
    registry.import_model(make_tiny_llama(root / "llama", num_layers=4), "tiny")
    yield registry.open_version("tiny:1")
    registry.close()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def rows(opened):
    return llm_shrink.token_rows(llm_shrink.text_ids(load_tokenizer(opened), TEXTS), 10_000)


def _logits(model, rows):
    with torch.no_grad():
        return model(input_ids=rows).logits


def test_the_trainable_model_computes_what_transformers_loads(opened, rows):
    from transformers import AutoModelForCausalLM

    ours = load_hf_model(opened)
    theirs = AutoModelForCausalLM.from_pretrained(opened.folder, dtype=torch.float32)
    torch.testing.assert_close(_logits(ours, rows[:2]), _logits(theirs, rows[:2]))


def test_rows_join_texts_with_end_ids_and_cut_them_evenly(opened):
    tokenizer = load_tokenizer(opened)
    rows = llm_shrink.token_rows(llm_shrink.text_ids(tokenizer, TEXTS * 20), 1000)
    assert rows.shape[1] == llm_shrink.SEQUENCE and rows.numel() <= 1000
    assert min(tokenizer.eos_token_ids) in rows[0].tolist()
    with pytest.raises(ValueError, match="fewer than two tokens"):
        llm_shrink.token_rows(llm_shrink.text_ids(tokenizer, [""]), 1000)


def test_chats_are_written_whole_by_the_chat_template(opened):
    tokenizer = load_tokenizer(opened)
    chat = [
        {"role": "user", "content": "where is the market"},
        {"role": "assistant", "content": "past the old church", "weight": 1},
    ]
    (ids,) = llm_shrink.chat_ids(tokenizer, [chat])
    plain = [{"role": m["role"], "content": m["content"]} for m in chat]
    written = tokenizer.render_chat(plain, add_generation_prompt=False)
    assert "past the old church" in written and "where is the market" in written
    assert ids == tokenizer.encode_rendered(written)
    rows = llm_shrink.token_rows(llm_shrink.chat_ids(tokenizer, [chat] * 40), 600)
    assert rows.shape == (600 // llm_shrink.SEQUENCE, llm_shrink.SEQUENCE)
    assert rows[0, : len(ids)].tolist() == ids


def test_pruning_slices_what_zeroing_would_remove(opened, rows):
    model = load_hf_model(opened)
    pruned, note = llm_shrink.prune(model, 0.5, rows)
    config = pruned.maas_config
    assert (config["intermediate_size"], config["num_attention_heads"]) == (32, 2)
    assert config["num_key_value_heads"] == 2 and config["head_dim"] == 8
    assert "MLP neurons 64 to 32" in note and "query heads 4 to 2" in note
    # The same computation with the removed neurons' and heads' weights zeroed in the parent.
    masked = load_hf_model(opened)
    state = masked.state_dict()
    small = pruned.state_dict()
    for layer in range(4):
        prefix = f"model.layers.{layer}."
        gate = state[f"{prefix}mlp.gate_proj.weight"]
        kept = [
            any(torch.equal(row, other) for other in small[f"{prefix}mlp.gate_proj.weight"])
            for row in gate
        ]
        assert sum(kept) == 32
        gate[[not k for k in kept]] = 0
        q = state[f"{prefix}self_attn.q_proj.weight"].view(4, 8, -1)
        small_q = small[f"{prefix}self_attn.q_proj.weight"].view(2, 8, -1)
        kept_heads = [any(torch.equal(q[h], other) for other in small_q) for h in range(4)]
        assert sum(kept_heads[:2]) == sum(kept_heads[2:]) == 1  # one head of each group
        o = state[f"{prefix}self_attn.o_proj.weight"].view(-1, 4, 8)
        o[:, [not k for k in kept_heads]] = 0
    torch.testing.assert_close(_logits(pruned, rows[:2]), _logits(masked, rows[:2]))


def test_the_least_contributing_neurons_and_heads_go(opened, rows):
    model = load_hf_model(opened)
    quiet = [3, 10, 40, 41]
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight[:, quiet] *= 1e-4
            layer.self_attn.o_proj.weight[:, 8:16] *= 1e-4  # head 1 (group 0)
    pruned, _ = llm_shrink.prune(model, 0.5, rows)
    for layer, small in zip(model.model.layers, pruned.model.layers, strict=True):
        for index in quiet:
            column = layer.mlp.down_proj.weight[:, index]
            assert not any(torch.equal(column, c) for c in small.mlp.down_proj.weight.T)
        head_1 = layer.self_attn.q_proj.weight[8:16]
        assert not torch.equal(small.self_attn.q_proj.weight[:8], head_1)
        head_0 = layer.self_attn.q_proj.weight[:8]
        torch.testing.assert_close(small.self_attn.q_proj.weight[:8], head_0)


def test_a_student_keeps_evenly_spaced_layers_first_and_last(opened):
    model = load_hf_model(opened)
    student, note = llm_shrink.fewer_layers(model, 2)
    assert student.maas_config["num_hidden_layers"] == 2 and "(0, 3)" in note
    teacher_last = model.model.layers[3].mlp.up_proj.weight
    torch.testing.assert_close(student.model.layers[1].mlp.up_proj.weight, teacher_last)
    assert student.model.layers[1].mlp.up_proj.weight.data_ptr() != teacher_last.data_ptr()
    three, note = llm_shrink.fewer_layers(model, 3)
    assert "(0, 2, 3)" in note or "(0, 1, 3)" in note


def _kl(teacher, student, rows) -> float:
    soft = torch.log_softmax(_logits(teacher, rows), -1)
    mine = torch.log_softmax(_logits(student, rows), -1)
    return float(torch.nn.functional.kl_div(mine, soft, log_target=True, reduction="batchmean"))


def test_distillation_brings_the_student_closer_to_its_teacher(opened, rows):
    teacher = load_hf_model(opened)
    student, _ = llm_shrink.fewer_layers(teacher, 2)
    before = _kl(teacher, student, rows)
    seen = []
    llm_shrink.train(
        student, rows, 30, 3e-3, 0, teacher, temperature=2.0, alpha=1.0,
        progress=lambda done, total, loss: seen.append(done),
    )  # fmt: skip
    assert _kl(teacher, student, rows) < 0.7 * before
    assert seen[-1] == 30 and not student.training


def test_a_fine_tune_lowers_the_next_token_loss(opened, rows):
    model = load_hf_model(opened)
    pruned, _ = llm_shrink.prune(model, 0.5, rows)

    def loss() -> float:
        logits = _logits(pruned, rows)
        return float(
            torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1)
            )
        )

    before = loss()
    llm_shrink.train(pruned, rows, 30, 3e-3, 0)
    assert loss() < 0.8 * before


def test_the_folder_serves_in_the_engine_as_transformers_computes_it(opened, rows, tmp_path):
    from maas.optimize.versions import opened_folder
    from maas.runtime.llm import dtypes

    pruned, _ = llm_shrink.prune(load_hf_model(opened), 0.5, rows)
    size = llm_shrink.save(pruned, opened, tmp_path / "child")
    assert size == (tmp_path / "child" / "model.safetensors").stat().st_size
    child = opened_folder(opened, tmp_path / "child")
    assert child.manifest.chat_template == opened.manifest.chat_template
    engine = load_model(child, torch.float32)
    sequence = rows[0, :40].tolist()
    with torch.inference_mode():
        ours = dtypes.prefill_logits(engine, sequence)
    torch.testing.assert_close(ours, _logits(pruned, rows[:1, :40])[0], atol=1e-4, rtol=1e-4)
