"""What each compute type costs in quality: the demo SmolLM2-135M-Instruct teacher-forced over
a chat of 100+ tokens, each dtype's next-token distribution against float32's at every
position: how often the top token agrees, and the mean KL divergence (float32 || dtype).

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
from maas.runtime.llm.dtypes import QUALITY_ORDER, convert, prefill_logits  # noqa: E402
from maas.runtime.llm.runner import ModelRunner, RunnerOptions  # noqa: E402

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
        runner = ModelRunner(registry.open_version(model_spec.name), options)
        registry.close()
    ids = runner.tokenizer.encode_chat(CHAT)
    reference = prefill_logits(runner.model, ids).float()
    print(f"{len(ids)} tokens, teacher-forced, against float32:")
    for dtype in QUALITY_ORDER[1:]:
        candidate = convert(copy.deepcopy(runner.model), dtype, pack=False)
        got = prefill_logits(candidate, ids).float()
        agree = float((got.argmax(-1) == reference.argmax(-1)).float().mean())
        kl = torch.nn.functional.kl_div(
            got.log_softmax(-1), reference.log_softmax(-1), log_target=True, reduction="batchmean"
        )
        print(f"  {dtype:12s} top token agrees {agree:.1%}, mean KL {float(kl):.4f}")


if __name__ == "__main__":
    main()
