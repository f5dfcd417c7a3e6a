"""GGUF files, read with the ``gguf`` package: architecture, sizes, tokenizer, chat template."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from gguf import GGUFReader, GGUFValueType, LlamaFileType

from maas.errors import UnsupportedFormat
from maas.registry.formats.gguf_header import read_header
from maas.registry.formats.info import LLAMA_FAMILY, FormatInfo, generation_tasks

SKIPPED_ARRAYS = frozenset(
    {
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.scores",
    }
)


def inspect(path: Path) -> FormatInfo:
    try:
        read_header(path)  # GGUFReader trusts every count in the header; it sees checked files only
        reader = GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError) as err:
        raise UnsupportedFormat(f"{path.name} is not a valid GGUF file: {err}") from None
    metadata = _metadata(reader)
    architecture = metadata.get("general.architecture")
    if not isinstance(architecture, str):
        raise UnsupportedFormat(f"{path.name} has no general.architecture")
    chat_template = metadata.pop("tokenizer.chat_template", None)
    default_task, tasks = generation_tasks(chat_template)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    metadata["tensor_types"] = dict(Counter(t.tensor_type.name for t in reader.tensors))
    metadata["tensor_count"] = len(reader.tensors)
    if isinstance(metadata.get("general.file_type"), int):
        metadata["file_type_name"] = _file_type_name(metadata["general.file_type"])
    context_length = metadata.get(f"{architecture}.context_length")
    return FormatInfo(
        format="gguf",
        runtime="llm" if architecture in LLAMA_FAMILY else "transformers",
        default_task=default_task,
        tasks=tasks,
        architecture=architecture,
        config=metadata,
        tokenizer={
            "kind": "gguf",
            "file": path.name,
            "model": metadata.get("tokenizer.ggml.model"),
            "vocab_size": len(tokens.data) if tokens is not None else None,
            "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
        },
        chat_template=chat_template if isinstance(chat_template, str) else None,
        context_length=context_length if isinstance(context_length, int) else None,
        weight_files=[path.name],
    )


def _metadata(reader: GGUFReader) -> dict[str, Any]:
    """Every key/value field except the vocabulary-sized arrays, as plain JSON values."""
    metadata: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in SKIPPED_ARRAYS:
            continue
        value = field.contents()
        if field.types and field.types[0] == GGUFValueType.ARRAY and len(field.data) > 64:
            value = {"array_length": len(field.data)}
        metadata[key] = _plain(value)
    return metadata


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    return value


def _file_type_name(value: int) -> str:
    try:
        return LlamaFileType(value).name
    except ValueError:
        return str(value)
