"""Optimizing an LLM version (runtime ``llm``): ``export gguf`` re-encodes a GGUF parent's
weight matrices as ``Q8_0`` (int8, one scale per 32 weights), ``Q4_0`` (int4, one scale per
32) or ``Q4_1`` (int4, a scale and a minimum per 32) with the ``gguf`` package's writer,
every key and value (tokenizer, chat template, shape) copied, so llama.cpp and Ollama run
the file, and so does maas (its GGUF importer reads it back).

The report measures parent and child through maas's own engine, loaded as it serves them
(``load_model``: float32 activations, bfloat16 for a bfloat16 copy): artifact bytes,
parameters, the decode step of one sequence and of eight (``latency_ms_p50``,
``throughput_per_s`` in tokens a second), the next-token agreement with the parent over a
probe text or the evaluation texts, perplexity on the evaluation texts (``evaluation_file``:
a CSV or JSON Lines dataset with a ``text`` column), and the greedy answer to "What is the
capital of France?" as a note.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from maas.registry.records import OpenedVersion

BLOCK = 32
"""Values per Q8_0 / Q4_0 / Q4_1 block: a row whose length is not a multiple stays F16."""
MAX_EVALUATION_TOKENS = 4096
QUESTION_TEXT = "What is the capital of France?"


def export_gguf(opened: OpenedVersion, kind: str, target: Path) -> str:
    """Write ``target`` (a .gguf) from the parent's GGUF; returns the step's note."""
    from gguf import GGMLQuantizationType as Q
    from gguf import GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType
    from gguf.quants import dequantize, quantize

    wanted = {"q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1}[kind]
    file_type = {
        "q8_0": LlamaFileType.MOSTLY_Q8_0,
        "q4_0": LlamaFileType.MOSTLY_Q4_0,
        "q4_1": LlamaFileType.MOSTLY_Q4_1,
    }[kind]
    source = next(e.path for e in opened.manifest.files if e.path.endswith(".gguf"))
    counts = {"quantized": 0, "f16": 0, "f32": 0}
    with opened.open_file(source) as path:
        reader = GGUFReader(path)
        architecture = reader.get_field("general.architecture").contents()
        target.parent.mkdir(parents=True, exist_ok=True)
        writer = GGUFWriter(target, arch=architecture)
        for field in reader.fields.values():
            if field.name in ("general.architecture", "general.file_type") or field.name.startswith(
                "GGUF."
            ):
                continue  # the writer sets the first; GGUF.* are the header's own counts
            kind_of = field.types[0]
            sub = field.types[-1] if kind_of == GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), kind_of, sub_type=sub)
        writer.add_file_type(file_type)
        for tensor in reader.tensors:
            if tensor.data.ndim == 1 or len(tensor.shape) == 1:  # norms: kept in float32
                writer.add_tensor(tensor.name, _floats(tensor, dequantize))
                counts["f32"] += 1
                continue
            values = _floats(tensor, dequantize)
            chosen = wanted if values.shape[-1] % BLOCK == 0 else Q.F16
            counts["quantized" if chosen == wanted else "f16"] += 1
            data = quantize(values, chosen) if chosen != Q.F16 else values.astype(np.float16)
            writer.add_tensor(tensor.name, data, raw_dtype=chosen)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return (
        f"exported to GGUF {kind.upper()}: {counts['quantized']} tensors {kind.upper()}, "
        f"{counts['f16']} F16, {counts['f32']} F32; {target.stat().st_size:,} bytes"
    )


def _floats(tensor, dequantize) -> np.ndarray:
    from gguf import GGMLQuantizationType as Q

    if tensor.tensor_type in (Q.F32, Q.F16):  # the reader hands these over as floats
        return np.asarray(tensor.data, dtype=np.float32)
    return dequantize(tensor.data, tensor.tensor_type).astype(np.float32)


def measure(
    opened: OpenedVersion,
    artifact_bytes: int,
    texts: list[str] | None,
    dtype: torch.dtype = torch.float32,
) -> dict:
    """The figures of one version with activations in ``dtype``, and its logits for
    ``parity``."""
    from maas.runtime.llm import dtypes
    from maas.runtime.llm.quantized import parameter_count
    from maas.runtime.llm.tokenizer import load_tokenizer
    from maas.runtime.llm.trial_prompts import QUESTION
    from maas.runtime.llm.weights import load_model

    model = load_model(opened, dtype)
    tokenizer = load_tokenizer(opened)
    ids = _evaluation_ids(tokenizer, texts)
    figures: dict[str, Any] = {
        "artifact_bytes": float(artifact_bytes),
        "parameters": float(parameter_count(model)),
        "latency_ms_p50": dtypes.decode_step_ms(model, 1),
        "throughput_per_s": 8 * 1000 / dtypes.decode_step_ms(model, 8),
    }
    with torch.inference_mode():
        logits = [dtypes.prefill_logits(model, sequence) for sequence in ids]
        if texts:
            figures["perplexity"] = _perplexity(logits, ids)
            figures["evaluation_tokens"] = float(sum(len(s) for s in ids))
        tokens = dtypes.greedy_answer(model, tokenizer.encode_chat(QUESTION))
        ends = [i for i, token in enumerate(tokens) if token in tokenizer.eos_token_ids]
        answer = tokenizer.decode(tokens[: ends[0]] if ends else tokens)
    return {"figures": figures, "logits": logits, "answer": answer}


def parity(parent: dict, child: dict) -> dict[str, float]:
    """The child's largest next-token logit difference from the parent and the share of
    positions where both choose the same next token."""
    diffs, agree, total = [], 0, 0
    for mine, theirs in zip(parent["logits"], child["logits"], strict=True):
        diffs.append(float((mine - theirs).abs().max()))
        agree += int((mine.argmax(-1) == theirs.argmax(-1)).sum())
        total += len(mine)
    return {"max_abs_diff": max(diffs), "top1_agreement": agree / max(1, total)}


def _evaluation_ids(tokenizer, texts: list[str] | None) -> list[list[int]]:
    from maas.runtime.llm.trial_prompts import PROBE

    sequences, budget = [], MAX_EVALUATION_TOKENS
    for text in texts or [PROBE]:
        ids = tokenizer.encode(text)[:budget]
        if len(ids) >= 2:
            sequences.append(ids)
            budget -= len(ids)
        if budget < 2:
            break
    if not sequences:
        raise ValueError("the evaluation texts have no text of two tokens or more")
    return sequences


def _perplexity(logits: list[torch.Tensor], ids: list[list[int]]) -> float:
    """exp of the mean negative log-likelihood of each token given those before it."""
    total, count = 0.0, 0
    for rows, sequence in zip(logits, ids, strict=True):
        targets = torch.tensor(sequence[1:])
        losses = torch.nn.functional.cross_entropy(rows[:-1].float(), targets, reduction="sum")
        total += float(losses)
        count += len(targets)
    return math.exp(total / count)
