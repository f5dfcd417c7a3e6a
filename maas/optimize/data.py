"""Labelled examples for the steps that learn (a fine-tune after pruning, distillation) and
for the report's quality figure: a ``dataset`` file (``/v1/files``) read exactly as the parent
version reads its inputs at serving time, with the file's labels matched to the parent's.

- small-cnn: an archive of image folders, one per class, decoded with the version's own
  ``preprocessing``;
- the text classifiers: a CSV (columns ``text`` and ``label``) or JSON Lines (those fields),
  tokenised with the version's own ``tokenizer.json``.

``check_file`` refuses, before a job exists, a file of the wrong kind for the model or with
classes the model does not know; ``load`` reads it in the job.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from maas.errors import InvalidRequest
from maas.files.store import FileRecord

TEXT_COLUMN, LABEL_COLUMN = "text", "label"
IMAGE_FORMATS, TEXT_FORMATS = ("image-folders",), ("csv", "jsonl")


@dataclass(frozen=True)
class Examples:
    inputs: torch.Tensor
    """Images [N, C, H, W] float32, or token ids [N, T] int64 right-padded with 0."""
    labels: torch.Tensor
    """[N] int64: indices into the model's labels."""

    def __len__(self) -> int:
        return len(self.labels)


def check_file(record: FileRecord, description: dict[str, Any], param: str) -> None:
    """Refuse a file that is not a dataset this model can read, or whose classes it lacks.
    ``description["chats"]``: a fine-tune file of chats will do (an LLM's training file)."""
    details = record.details or {}
    kind = details.get("format")
    if description["architecture"] == "texts":  # an LLM or encoder, measured on texts
        if description.get("chats") and record.purpose == "fine-tune":
            return  # an LLM learns from chats too; the upload checked every conversation
        if record.purpose != "dataset" or kind not in TEXT_FORMATS:
            raise InvalidRequest(
                f"{record.id} is not a dataset of texts: this model is measured on a CSV or "
                f"JSON Lines file with a {TEXT_COLUMN!r} column (purpose 'dataset')",
                param=param,
            )
        if kind == "csv" and TEXT_COLUMN not in details.get("columns", []):
            raise InvalidRequest(f"{record.id} has no column {TEXT_COLUMN!r}", param=param)
        return
    images = description["architecture"] == "small-cnn"
    wanted = IMAGE_FORMATS if images else TEXT_FORMATS
    if record.purpose != "dataset" or kind not in wanted:
        what = "an archive of image folders" if images else "a CSV or JSON Lines file"
        raise InvalidRequest(
            f"{record.id} is not a dataset this model reads: a {description['architecture']} "
            f"learns from {what} (purpose 'dataset')",
            param=param,
        )
    labels = description.get("labels") or []
    if images:
        unknown = sorted(set(details.get("classes", [])) - set(labels))
        if unknown:
            raise InvalidRequest(
                f"{record.id} has classes the model does not know: {', '.join(unknown[:5])} "
                f"(its labels: {', '.join(labels[:10])})",
                param=param,
            )
    elif kind == "csv":
        missing = [c for c in (TEXT_COLUMN, LABEL_COLUMN) if c not in details.get("columns", [])]
        if missing:
            raise InvalidRequest(f"{record.id} has no column {missing[0]!r}", param=param)


def load(path: Path, description: dict[str, Any], tokenizer_json: str | None) -> Examples:
    """The examples of a fetched dataset (an extracted image root or a text file)."""
    labels = description.get("labels") or []
    if description["architecture"] == "small-cnn":
        return _images(path, description, labels)
    return _texts(path, description, labels, tokenizer_json)


def _images(root: Path, description: dict[str, Any], labels: list[str]) -> Examples:
    from maas.tasks.images import ImagePreprocessing
    from maas.training.image_data import load_split

    spec = ImagePreprocessing.from_options({"preprocessing": description["preprocessing"]})
    split = load_split(root, spec, 0.0, 0)
    index = _label_index(split.classes, labels)
    images, found = split.train
    return Examples(images, torch.tensor([index[int(c)] for c in found], dtype=torch.long))


def _texts(path: Path, description, labels, tokenizer_json: str | None) -> Examples:
    from tokenizers import Tokenizer

    from maas.training.text_data import read_texts

    if tokenizer_json is None:
        raise ValueError("the model has no tokenizer.json to read texts with")
    tokenizer = Tokenizer.from_str(tokenizer_json)
    tokenizer.no_padding()
    tokenizer.enable_truncation((description.get("preprocessing") or {}).get("max_length", 128))
    texts, names = read_texts(path, TEXT_COLUMN, LABEL_COLUMN)
    index = {name: i for i, name in enumerate(labels)}
    unknown = sorted(set(names) - set(index))
    if unknown:
        raise ValueError(f"the dataset has labels the model does not know: {unknown[:5]}")
    if not texts:
        raise ValueError("the dataset has no labelled texts")
    encoded = [e.ids or [0] for e in tokenizer.encode_batch(texts)]
    ids = torch.zeros(len(encoded), max(len(e) for e in encoded), dtype=torch.long)
    for row, sequence in enumerate(encoded):
        ids[row, : len(sequence)] = torch.tensor(sequence)
    return Examples(ids, torch.tensor([index[n] for n in names], dtype=torch.long))


def _label_index(classes: list[str], labels: list[str]) -> dict[int, int]:
    """The file's class numbers as the model's label indices."""
    unknown = sorted(set(classes) - set(labels))
    if unknown:
        raise ValueError(f"the dataset has classes the model does not know: {unknown[:5]}")
    return {i: labels.index(name) for i, name in enumerate(classes)}


def read_evaluation_texts(path: Path, what: str = "evaluation") -> list[str]:
    """An LLM's texts: the ``text`` column (CSV) or field (JSON Lines) of every row."""
    import csv
    import json

    if path.suffix == ".jsonl":
        rows = [
            json.loads(line)
            for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()
        ]
        texts = [row.get(TEXT_COLUMN) for row in rows if isinstance(row, dict)]
    else:
        with path.open(encoding="utf-8-sig", newline="") as source:
            texts = [row.get(TEXT_COLUMN) for row in csv.DictReader(source)]
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise ValueError(f"the {what} file has no {TEXT_COLUMN!r} texts")
    return texts
