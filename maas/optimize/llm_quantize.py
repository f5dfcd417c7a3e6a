"""``quantize int8 | int4 | bfloat16`` on an LLM of maas's engine: its weights stored again,
in a Hugging Face folder (config.json, model.safetensors, the tokenizer and chat template)
that the engine serves without holding float weights (maas/runtime/llm/quantized.py):

- ``int8``: weight-only, one scale per output row;
- ``int4``: weight-only, a scale and a zero per ``group_size`` weights (32 by default);
- ``bfloat16``: every weight rounded to bfloat16 (half of float32's bytes), a plain folder
  ``transformers`` loads too.

The embedding is quantized like the other matrices (it is the largest: a third of a small
model's weights); norms and matrices the int4 kernel cannot take (rows not a multiple of 16,
columns not of the group size) stay bfloat16. The parent may be a GGUF file (dequantised
first) or a Hugging Face folder.
"""

from __future__ import annotations

import json
from pathlib import Path

from maas.registry.records import OpenedVersion
from maas.runtime.llm.hf_model import hf_config

WEIGHTS_FILE = "model.safetensors"
GENERATION_FILE = "generation_config.json"


def write(opened: OpenedVersion, method: str, group_size: int, folder: Path) -> str:
    """Write the child folder; returns the step's note."""
    import torch
    from safetensors.torch import save_file

    from maas.runtime.llm import quantized
    from maas.runtime.llm.weights import hf_tensors

    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    kept = []
    for name, tensor in hf_tensors(opened):
        if method in quantized.METHODS and quantized.fits(tuple(tensor.shape), method, group_size):
            stored = quantized.quantize(tensor, method, group_size)
            tensors[name], tensors[f"{name}_scale"] = stored.codes, stored.scale
            if stored.zero is not None:
                tensors[f"{name}_zero"] = stored.zero
        else:
            tensors[name] = tensor.to(torch.bfloat16).contiguous()
            if tensor.dim() == 2:
                kept.append(name)
    config = hf_config(opened)
    if method in quantized.METHODS:
        config[quantized.KEY] = {"method": method}
        if method == "int4":
            config[quantized.KEY]["group_size"] = group_size
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    copy_tokenizer(opened, folder)
    size = (folder / WEIGHTS_FILE).stat().st_size
    what = {
        "int8": "int8 weights, one scale per output row",
        "int4": f"int4 weights, a scale and a zero per {group_size} weights",
        "bfloat16": "bfloat16 weights",
    }[method]
    note = f"stored as {what}: {size:,} bytes of weights"
    if kept and method in quantized.METHODS:
        note += f"; {len(kept)} matrices the kernel cannot take stay bfloat16 ({kept[0]}, ...)"
    return note


def copy_tokenizer(opened: OpenedVersion, folder: Path) -> None:
    """The parent's tokenizer, chat template and sampling defaults (generation_config.json,
    with the end ids merged in) into the child's folder."""
    from maas.runtime.llm.tokenizer import load_tokenizer

    if any(entry.path == GENERATION_FILE for entry in opened.manifest.files):
        (folder / GENERATION_FILE).write_bytes(opened.read_bytes(GENERATION_FILE))
    load_tokenizer(opened).save(folder)
