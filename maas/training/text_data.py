"""A text-classification dataset from an uploaded CSV (a text column and a label column) or
JSON Lines (objects with a text field and a label field):
split by a seed, a word-level tokenizer (``tokenizers``) learnt from the training texts, and
the texts encoded as the served model will encode them (``maas.tasks.text``: the same
``tokenizer.json``, truncated to ``max_length``), right-padded with id 0."""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from maas.files import FileStore

PAD, UNK = "[PAD]", "[UNK]"


@dataclass(frozen=True)
class TextSplit:
    classes: list[str]
    tokenizer_json: str
    vocab_size: int
    train: tuple[torch.Tensor, torch.Tensor]
    """(token ids [N, T] int64, right-padded with 0; labels [N] int64)"""
    validation: tuple[torch.Tensor, torch.Tensor]


def fetch(files: FileStore, file_id: str, tenant_id: int, folder: Path) -> Path:
    """The CSV or JSON Lines file, decrypted into the job's folder (once)."""
    record = files.get(file_id, tenant_id)
    kind = (record.details or {}).get("format")
    if record.purpose != "dataset" or kind not in ("csv", "jsonl"):
        raise ValueError(f"{file_id} is not a CSV or JSON Lines dataset")
    target = folder / f"data.{kind}"
    if target.exists():
        return target
    partial = folder / f"data.{kind}.partial"
    files.copy_to(file_id, tenant_id, partial)
    partial.replace(target)
    return target


def load_split(
    path: Path,
    text_column: str,
    label_column: str,
    validation_fraction: float,
    seed: int,
    max_length: int,
    max_vocab: int,
) -> TextSplit:
    texts, labels = read_texts(path, text_column, label_column)
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise ValueError(f"column {label_column!r} has {len(classes)} label(s); at least 2 needed")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    cut = max(1, round(len(texts) * validation_fraction)) if validation_fraction > 0 else 0
    held, kept = order[:cut], order[cut:]
    tokenizer = _learn_tokenizer([texts[i] for i in kept], max_length, max_vocab)
    index = {name: i for i, name in enumerate(classes)}

    def tensors(rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        encoded = [tokenizer.encode(texts[i]).ids or [0] for i in rows]
        width = max((len(ids) for ids in encoded), default=1)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        for row, sequence in enumerate(encoded):
            ids[row, : len(sequence)] = torch.tensor(sequence)
        return ids, torch.tensor([index[labels[i]] for i in rows], dtype=torch.long)

    return TextSplit(
        classes,
        tokenizer.to_str(),
        tokenizer.get_vocab_size(with_added_tokens=True),
        tensors(kept),
        tensors(held),
    )


def read_texts(path: Path, text_column: str, label_column: str) -> tuple[list[str], list[str]]:
    if path.suffix == ".jsonl":
        return _read_jsonl(path, text_column, label_column)
    with path.open(encoding="utf-8-sig", newline="") as source:
        reader = csv.DictReader(source)
        missing = [c for c in (text_column, label_column) if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(
                f"the CSV has no column {missing[0]!r}; it has {', '.join(reader.fieldnames or [])}"
            )
        rows = [(row[text_column], row[label_column].strip()) for row in reader]
    rows = [(text, label) for text, label in rows if label]
    return [text for text, _ in rows], [label for _, label in rows]


def _read_jsonl(path: Path, text_field: str, label_field: str) -> tuple[list[str], list[str]]:
    """Each line an object with the text and its label (a string, or a number or boolean
    written as text); lines without a label are left out, as a CSV's rows are."""
    texts, labels = [], []
    with path.open(encoding="utf-8") as source:
        for number, line in enumerate(source, start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            missing = [f for f in (text_field, label_field) if f not in row]
            if missing:
                raise ValueError(f"line {number} has no field {missing[0]!r}")
            text, label = row[text_field], row[label_field]
            if not isinstance(text, str) or isinstance(label, dict | list):
                raise ValueError(
                    f"line {number}: {text_field!r} must be text and {label_field!r} a value"
                )
            if label is None:
                continue
            label = str(label).lower() if isinstance(label, bool) else str(label)
            if label.strip():
                texts.append(text)
                labels.append(label.strip())
    return texts, labels


def _learn_tokenizer(texts: list[str], max_length: int, max_vocab: int):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordLevel(unk_token=UNK))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=max_vocab, special_tokens=[PAD, UNK])
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.enable_truncation(max_length)
    return tokenizer
