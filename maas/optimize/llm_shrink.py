"""Making an LLM smaller before its weights are stored: ``prune AMOUNT structured`` removes
MLP neurons and attention heads, ``distil layers=N`` trains a shallower Llama on the parent's
logits. Both write a float32 Hugging Face folder that the next step (``quantize``) or the
engine reads.

Structured pruning follows Minitron (Muralidharan et al., 2024): each neuron and head is
ranked by what it adds to the residual stream on calibration texts (the training file's),
and the same number is kept in every layer, so config.json still describes the model:

- an MLP neuron ``i`` adds ``a_i * down[:, i]``, where ``a_i = act(gate_i x) * up_i x``: its
  score is ``sum over tokens of a_i^2 * |down[:, i]|^2``. ``AMOUNT`` of the neurons go, the
  count kept a multiple of 32 (what the int4 kernel's groups need);
- a query head ``h`` adds ``o_h = attention_h @ o_proj[:, h]^T``: its score is ``sum of
  |o_h|^2``. Heads share key/value heads in groups (grouped-query attention); each group
  loses ``floor(AMOUNT * heads per group)`` of its query heads and keeps at least one, so the
  key/value heads and the grouping stay.

Distillation keeps ``layers`` of the teacher's layers, evenly spaced with the first and the
last kept (every other layer when ``layers`` is half), or takes the pruned model as it is, and
trains it with ``alpha * T^2 * KL(teacher || student at temperature T) + (1 - alpha) *
next-token cross-entropy`` on the training file, the parent as teacher: texts (a ``text``
column), each ended by an end-of-sequence id, or chats (a ``fine-tune`` file), each written
whole by the model's chat template. A fine-tune after
pruning (``fine_tune_steps``) is the cross-entropy alone.

Training and calibration run ``transformers``' model of the same weights (as fine-tuning
does), never the engine's.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maas.registry.records import OpenedVersion
from maas.runtime.llm.hf_model import empty_hf_model

NEURON_MULTIPLE = 32
SEQUENCE = 256
"""Tokens a training or calibration row holds: the texts, joined by end-of-sequence ids and
cut into rows this long."""
BATCH = 4
MAX_CALIBRATION_TOKENS = 8192
MAX_TRAINING_TOKENS = 1_000_000
Progress = Callable[[int, int, float], None]
"""Called as (step, steps, loss) every few steps."""


def save(model: nn.Module, opened: OpenedVersion, folder: Path) -> int:
    """The model as a float32 Hugging Face folder with the parent's tokenizer; returns its
    weights' bytes."""
    from safetensors.torch import save_file

    from maas.optimize.llm_quantize import WEIGHTS_FILE, copy_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    config = model.maas_config  # type: ignore[attr-defined]
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    copy_tokenizer(opened, folder)
    return (folder / WEIGHTS_FILE).stat().st_size


def text_ids(tokenizer, texts: Iterable[str]) -> Iterator[list[int]]:
    """Each text's token ids, ended by an end-of-sequence id."""
    end = [min(tokenizer.eos_token_ids)] if tokenizer.eos_token_ids else []
    for text in texts:
        yield tokenizer.encode(text) + end


def chat_ids(tokenizer, chats: Iterable[list[dict[str, Any]]]) -> Iterator[list[int]]:
    """Each conversation's token ids as the model's chat template writes it whole (the
    template ends every turn itself), as serving and fine-tuning write it."""
    for messages in chats:
        plain = [{"role": m["role"], "content": m["content"]} for m in messages]
        yield tokenizer.encode_rendered(tokenizer.render_chat(plain, add_generation_prompt=False))


def token_rows(documents: Iterable[list[int]], limit: int) -> Tensor:
    """The documents' token ids (``text_ids`` or ``chat_ids``) joined and cut into rows of
    SEQUENCE tokens, at most ``limit`` tokens in all (a shorter last row is dropped unless it
    is the only one)."""
    ids: list[int] = []
    for document in documents:
        ids += document
        if len(ids) >= limit:
            break
    ids = ids[:limit]
    if len(ids) < 2:
        raise ValueError("the training texts have fewer than two tokens")
    length = min(SEQUENCE, len(ids))
    rows = len(ids) // length
    return torch.tensor(ids[: rows * length]).view(rows, length)


def prune(model: nn.Module, amount: float, rows: Tensor) -> tuple[nn.Module, str]:
    """A new model with ``amount`` of each layer's MLP neurons and query heads removed, the
    least important on ``rows``; returns it and the step's note."""
    config = dict(model.maas_config)  # type: ignore[attr-defined]
    neurons, heads = _importance(model, rows)
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or config["num_attention_heads"]
    per_group = config["num_attention_heads"] // kv
    kept_per_group = max(1, per_group - math.floor(amount * per_group))
    width = config["intermediate_size"]
    kept_neurons = min(width, max(NEURON_MULTIPLE, _multiple(width * (1 - amount))))
    state = model.state_dict()
    for layer, (scores, head_scores) in enumerate(zip(neurons, heads, strict=True)):
        keep = scores.topk(kept_neurons).indices.sort().values
        prefix = f"model.layers.{layer}."
        for name in ("mlp.gate_proj", "mlp.up_proj"):
            state[f"{prefix}{name}.weight"] = state[f"{prefix}{name}.weight"][keep]
        state[f"{prefix}mlp.down_proj.weight"] = state[f"{prefix}mlp.down_proj.weight"][:, keep]
        chosen = _heads(head_scores, kv, kept_per_group)
        rows_kept = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in chosen])
        for suffix in ("weight", "bias"):
            name = f"{prefix}self_attn.q_proj.{suffix}"
            if name in state:
                state[name] = state[name][rows_kept]
        state[f"{prefix}self_attn.o_proj.weight"] = state[f"{prefix}self_attn.o_proj.weight"][
            :, rows_kept
        ]
    config.update(
        intermediate_size=kept_neurons,
        num_attention_heads=kept_per_group * kv,
        head_dim=head_dim,
    )
    pruned = empty_hf_model(config)
    pruned.load_state_dict(state, strict=not config.get("tie_word_embeddings"))
    note = (
        f"pruned by contribution on {rows.numel():,} calibration tokens: MLP neurons "
        f"{width} to {kept_neurons} a layer, query heads {per_group * kv} to "
        f"{kept_per_group * kv} ({kv} key/value heads kept)"
    )
    if kept_per_group == per_group:
        note += f"; {per_group} heads a group lose none at amount {amount}"
    return pruned.eval(), note


def fewer_layers(model: nn.Module, layers: int) -> tuple[nn.Module, str]:
    """A model of ``layers`` of the teacher's layers, evenly spaced, first and last kept."""
    config = dict(model.maas_config)  # type: ignore[attr-defined]
    total = config["num_hidden_layers"]
    chosen = [round(i * (total - 1) / (layers - 1)) for i in range(layers)] if layers > 1 else [0]
    state = {}
    for name, tensor in model.state_dict().items():
        if not name.startswith("model.layers."):
            state[name] = tensor
            continue
        index, rest = name.removeprefix("model.layers.").split(".", 1)
        if int(index) in chosen:
            state[f"model.layers.{chosen.index(int(index))}.{rest}"] = tensor
    config["num_hidden_layers"] = layers
    student = empty_hf_model(config)
    student.load_state_dict(state, strict=not config.get("tie_word_embeddings"))
    return student, f"student of {layers} of {total} layers ({', '.join(map(str, chosen))})"


def train(
    student: nn.Module,
    rows: Tensor,
    steps: int,
    learning_rate: float,
    seed: int,
    teacher: nn.Module | None = None,
    temperature: float = 1.0,
    alpha: float = 0.0,
    progress: Progress | None = None,
) -> float:
    """``steps`` AdamW steps over batches of ``rows``; with a teacher, distillation's loss,
    else next-token cross-entropy. Returns the last step's loss."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(student.parameters(), lr=learning_rate, weight_decay=0.0)
    order = torch.randperm(len(rows), generator=generator)
    student.train()
    loss_value = float("nan")
    for step in range(steps):
        picked = [order[(step * BATCH + i) % len(order)] for i in range(min(BATCH, len(rows)))]
        batch = rows[torch.stack(picked)]
        logits = student(input_ids=batch).logits
        vocab = logits.shape[-1]
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, vocab), batch[:, 1:].reshape(-1))
        if teacher is not None:
            with torch.no_grad():
                soft = F.log_softmax(teacher(input_ids=batch).logits / temperature, dim=-1)
            guided = F.kl_div(
                F.log_softmax(logits / temperature, dim=-1).reshape(-1, vocab),
                soft.reshape(-1, vocab),
                reduction="batchmean",
                log_target=True,
            )
            loss = alpha * temperature**2 * guided + (1 - alpha) * loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        loss_value = float(loss.detach())
        if progress is not None and (step + 1 == steps or (step + 1) % 10 == 0):
            progress(step + 1, steps, loss_value)
    student.eval()
    return loss_value


def _importance(model: nn.Module, rows: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """Each layer's neuron scores [intermediate] and query-head scores [heads] on ``rows``."""
    config = model.maas_config  # type: ignore[attr-defined]
    heads = config["num_attention_heads"]
    layers = model.model.layers
    neuron_sums = [torch.zeros(config["intermediate_size"]) for _ in layers]
    head_sums = [torch.zeros(heads) for _ in layers]
    hooks = []
    for index, layer in enumerate(layers):

        def on_down(module, inputs, index=index) -> None:
            neuron_sums[index] += inputs[0].detach().float().pow(2).sum(dim=(0, 1))

        def on_o(module, inputs, index=index) -> None:
            x = inputs[0].detach().float()  # [batch, tokens, heads * head_dim]
            weight = module.weight.detach().float()  # [hidden, heads * head_dim]
            x = x.reshape(-1, heads, x.shape[-1] // heads)
            parts = weight.view(weight.shape[0], heads, -1)
            out = torch.einsum("thd,ohd->tho", x, parts)
            head_sums[index] += out.pow(2).sum(dim=(0, 2))

        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(on_down))
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(on_o))
    try:
        with torch.no_grad():
            for start in range(0, len(rows), BATCH):
                model(input_ids=rows[start : start + BATCH])
    finally:
        for hook in hooks:
            hook.remove()
    for index, layer in enumerate(layers):
        neuron_sums[index] *= layer.mlp.down_proj.weight.detach().float().pow(2).sum(dim=0)
    return neuron_sums, head_sums


def _heads(scores: Tensor, kv: int, keep: int) -> list[int]:
    """The ``keep`` highest-scoring query heads of each key/value group, in order."""
    per_group = len(scores) // kv
    chosen = []
    for group in range(kv):
        own = scores[group * per_group : (group + 1) * per_group]
        chosen += sorted(group * per_group + int(i) for i in own.topk(keep).indices)
    return chosen


def _multiple(count: float) -> int:
    return int(round(count / NEURON_MULTIPLE)) * NEURON_MULTIPLE
