"""``manifest.json``: what a version folder holds and how to run it.

The manifest is written once, inside the staging folder, before the version becomes visible.
Its own sha256 is kept in the database, so an edited manifest is caught like an edited file.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from maas.artifacts.hashing import FileEntry, ProgressFn, hash_file
from maas.errors import ArtifactCorrupted

MANIFEST = "manifest.json"

Task = Literal[
    "chat",
    "text-generation",
    "embeddings",
    "image-classification",
    "text-classification",
    "tensor",
]
TASKS: tuple[str, ...] = Task.__args__  # type: ignore[attr-defined]
GENERATION_TASKS = ("chat", "text-generation")
"""The tasks whose models generate text (served by the LLM engines)."""


class TensorSpec(BaseModel):
    """An input or output tensor in Open Inference Protocol v2 terms."""

    name: str
    datatype: str
    """v2 datatype: BOOL, UINT8 ... INT64, FP16, FP32, FP64, BF16, BYTES."""
    shape: list[int]
    """-1 marks a dimension of any size."""


class ParentRef(BaseModel):
    name: str
    version: int


class Manifest(BaseModel):
    schema_version: Literal[1] = 1
    id: str
    """A random id of this version's files; encrypted files are bound to it."""
    name: str
    version: int
    task: Task
    runtime: str
    """Who runs it: ``llm`` (maas's own engine), ``transformers``, ``onnx``, ``torch``."""
    format: str
    """How the files are laid out: ``huggingface``, ``gguf``, ``onnx``."""
    description: str = ""
    architecture: str | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    """The model's own configuration (config.json, or GGUF metadata without the vocabulary)."""
    inputs: list[TensorSpec] = Field(default_factory=list)
    outputs: list[TensorSpec] = Field(default_factory=list)
    labels: list[str] | None = None
    tokenizer: dict[str, Any] | None = None
    chat_template: str | None = None
    context_length: int | None = None
    generation_config: dict[str, Any] | None = None
    task_options: dict[str, Any] = Field(default_factory=dict)
    """Task defaults the model's files imply, e.g. pooling and normalisation for embeddings."""
    parent: ParentRef | None = None
    source: str | None = None
    """Where the files were imported from (file name only for uploads)."""
    created_at: datetime
    metrics: dict[str, float] = Field(default_factory=dict)
    recipe: dict[str, Any] | None = None
    """How this version was made, when maas made it: the job, its parameters, its data."""
    files: list[FileEntry]

    @property
    def size_bytes(self) -> int:
        return sum(entry.size for entry in self.files)


def write_manifest(folder: Path, manifest: Manifest) -> str:
    """Write ``manifest.json`` durably into ``folder``; return its sha256."""
    data = (json.dumps(manifest.model_dump(mode="json"), indent=2, sort_keys=True) + "\n").encode()
    with open(folder / MANIFEST, "xb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    return hashlib.sha256(data).hexdigest()


def read_manifest(folder: Path, expected_sha256: str | None = None) -> Manifest:
    """Read a version's manifest; with ``expected_sha256``, refuse one that was changed."""
    path = folder / MANIFEST
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ArtifactCorrupted(f"{folder.name}: manifest.json is missing") from None
    if expected_sha256 is not None and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise ArtifactCorrupted("manifest.json does not match the hash recorded at import")
    try:
        return Manifest.model_validate_json(data)
    except ValidationError as err:
        raise ArtifactCorrupted(f"manifest.json is not valid: {err.errors()[0]['msg']}") from None


def verify_files(folder: Path, manifest: Manifest, on_progress: ProgressFn | None = None) -> None:
    """Check every file's size and sha256 against the manifest, and that nothing was added."""
    expected = {entry.path for entry in manifest.files} | {MANIFEST}
    present = {
        path.relative_to(folder).as_posix() for path in folder.rglob("*") if not path.is_dir()
    }
    if extra := sorted(present - expected):
        raise ArtifactCorrupted(f"files not in the manifest: {', '.join(extra[:5])}")
    for entry in manifest.files:
        path = folder / entry.path
        if path.is_symlink() or not path.is_file():
            raise ArtifactCorrupted(f"{entry.path} is missing")
        if path.stat().st_size != entry.size:
            raise ArtifactCorrupted(f"{entry.path} has changed size since import")
        if hash_file(path, on_progress) != entry.sha256:
            raise ArtifactCorrupted(f"{entry.path} does not match its sha256 from import")
