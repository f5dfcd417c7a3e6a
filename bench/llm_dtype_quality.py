"""What each compute type costs in quality: the demo SmolLM2-135M-Instruct teacher-forced over
a chat of 100+ tokens, each dtype's next-token distribution against float32's at every
position: how often the top token agrees, and the mean KL divergence (float32 || dtype).
Also float32 and int8 with a bfloat16 KV cache (what ``auto`` may keep: see dtypes.py), and
the weights stored quantized as ``maas optimize ... quantize int8 | int4`` stores them (every
matrix the kernels take, the tied embedding and head included), bfloat16 activations.

    .venv/bin/python bench/llm_dtype_quality.py

No baseline and no timing: this backs the quality figures in docs/llm.md.
"""

from __future__ import annotations

import copy
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maas.config import Settings  # noqa: E402
from maas.registry import demo, open_registry  # noqa: E402
from maas.runtime.llm import quantized  # noqa: E402
from maas.runtime.llm.dtypes import QUALITY_ORDER, convert, prefill_logits  # noqa: E402
from maas.runtime.llm.runner import ModelRunner, RunnerOptions  # noqa: E402
from maas.runtime.llm.tokenizer import load_tokenizer  # noqa: E402

CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "How do I keep basil alive on a windowsill?"},
    {
        "role": "assistant",
        "content": (
            "Give it at least six hours of sun a day, water it when the top of the soil is dry, "
            "and pinch off the flowers as soon as they appear so that the plant keeps making "
            "leaves. Use a pot with a drainage hole, and turn it every few days so that it grows "
            "evenly instead of leaning toward the glass."
        ),
    },
    {"role": "user", "content": "And in winter?"},
]


def main() -> None:
    model_spec = demo.DEMO_MODELS[0]
    with tempfile.TemporaryDirectory() as home:
        registry = open_registry(Settings(home=Path(home)))
        registry.import_model(demo.locate(model_spec), model_spec.name, task=model_spec.task)
        options = RunnerOptions(
            dtype="float32", max_sequences=1, max_model_len=512, compile=False, pack_weights=False
        )
        opened = registry.open_version(model_spec.name)
        runner = ModelRunner(opened, options)
        ids = load_tokenizer(opened).encode_chat(CHAT)
        registry.close()
    reference = prefill_logits(runner.model, ids).float()
    print(f"{len(ids)} tokens, teacher-forced, against float32:")
    candidates = {
        (d, None): convert(copy.deepcopy(runner.model), d, pack=False) for d in QUALITY_ORDER[1:]
    }
    for dtype in ("float32", "int8"):
        copied = convert(copy.deepcopy(runner.model), dtype, pack=False)
        candidates[(f"{dtype}, KV bfloat16", torch.bfloat16)] = copied
    for method, group_size in STORED:
        label = f"stored {method}" + (f"/{group_size}" if group_size else "")
        candidates[(label, None)] = stored(runner.model, method, group_size)
    for (label, kv), candidate in candidates.items():
        got = prefill_logits(candidate, ids, kv).float()
        agree = float((got.argmax(-1) == reference.argmax(-1)).float().mean())
        kl = torch.nn.functional.kl_div(
            got.log_softmax(-1), reference.log_softmax(-1), log_target=True, reduction="batchmean"
        )
        print(f"  {label:20s} top token agrees {agree:.1%}, mean KL {float(kl):.4f}")


STORED = (("int8", 0), ("int4", 32), ("int4", 128))


def stored(model: torch.nn.Module, method: str, group_size: int) -> torch.nn.Module:
    """A bfloat16 copy of ``model`` with every matrix the kernels take quantized by
    ``method``, the tied head sharing the embedding's codes, as the engine installs a stored
    version (quantizing q, k and v fused or apart is the same: scales are per row or per
    group of a row)."""
    copied = convert(copy.deepcopy(model), "bfloat16", pack=False)
    state, done = {}, {}
    for name, module in copied.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, torch.nn.Linear | torch.nn.Embedding) and quantized.fits(
            tuple(weight.shape), method, group_size
        ):
            key = id(weight)
            done.setdefault(key, quantized.quantize(weight, method, group_size))
            state[f"{name}.weight"] = done[key]
    quantized.install(copied, state)
    return copied


if __name__ == "__main__":
    main()
