"""An image-folder dataset (one folder per class) from an uploaded archive: extracted once
into the job's folder, split into training and validation samples by a seed, and decoded
with exactly the preprocessing the served model will use (``maas.tasks.images``), so what
the model learns on is what it is asked at serving time."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from maas.artifacts.archive import ARCHIVE_SUFFIXES, ArchiveLimits, extract_archive
from maas.files import FileStore
from maas.files.validation import IMAGE_SUFFIXES, describe_image_folders
from maas.tasks.images import ImagePreprocessing, decode_image

READY = ".extracted"


@dataclass(frozen=True)
class Split:
    classes: list[str]
    train: tuple[torch.Tensor, torch.Tensor]
    """(images [N, 3, H, W] float32, labels [N] int64)"""
    validation: tuple[torch.Tensor, torch.Tensor]


def extract(
    files: FileStore, file_id: str, tenant_id: int, folder: Path, limits: ArchiveLimits
) -> Path:
    """The dataset's class folders under ``folder`` (extracted on the first attempt only)."""
    root = folder / "data"
    if (folder / READY).exists():
        return root
    record = files.get(file_id, tenant_id)
    suffix = next((s for s in ARCHIVE_SUFFIXES if record.filename.lower().endswith(s)), None)
    if (
        record.purpose != "dataset"
        or suffix is None
        or record.details.get("format") != "image-folders"
    ):
        raise ValueError(f"{file_id} is not a dataset of image folders (.zip or .tar archive)")
    archive = files.copy_to(file_id, tenant_id, folder / f"dataset{suffix}")
    if root.exists():
        import shutil

        shutil.rmtree(root)  # a half extraction from a worker that died during it
    extract_archive(archive, root, limits)
    archive.unlink()
    (folder / READY).touch()
    return root


def load_split(
    root: Path, spec: ImagePreprocessing, validation_fraction: float, seed: int
) -> Split:
    described = describe_image_folders(root)
    base = root
    entries = [p for p in root.iterdir() if not p.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir() and entries[0].name not in described["classes"]:
        base = entries[0]
    classes = described["classes"]
    samples = [
        (path, index)
        for index, name in enumerate(classes)
        for path in sorted((base / name).iterdir())
        if path.suffix.lower() in IMAGE_SUFFIXES
    ]
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    cut = max(1, round(len(samples) * validation_fraction)) if validation_fraction > 0 else 0
    held, kept = order[:cut], order[cut:]
    return Split(classes, _tensors(samples, kept, spec), _tensors(samples, held, spec))


def _tensors(samples, indices, spec) -> tuple[torch.Tensor, torch.Tensor]:
    images = [decode_image(samples[i][0].read_bytes(), spec, index=i) for i in indices]
    labels = [samples[i][1] for i in indices]
    if not images:
        return torch.empty(0, 3, spec.height, spec.width), torch.empty(0, dtype=torch.long)
    return torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.long)
