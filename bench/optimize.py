"""Optimized versions against their parent, measured in one run.

The digits CNN (small-cnn, channels 16 and 32, hidden 64, 16x16; scikit-learn's digits,
80/20 split) is trained by a real ``train`` job, then each recipe runs as a real ``optimize``
job (in-process ``Worker``, SQLite). Each job's own report gives the artifact size, latency at
batch 1 and throughput at batch 32 of parent and child (medians of timed runs, in the same
job), and parity; this bench adds the accuracy of parent and child on the validation split
the training job held out. Ratios are child over parent.

    .venv/bin/python bench/optimize.py [--epochs 15]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import training  # noqa: E402

from maas.config import Settings  # noqa: E402
from maas.jobs import JobStatus, JobStore  # noqa: E402
from maas.jobs.worker import Worker  # noqa: E402
from maas.optimize.job import check_parent, validate  # noqa: E402
from maas.registry import open_registry  # noqa: E402
from maas.registry.service import CACHE_SECONDS  # noqa: E402
from maas.runtime.architectures.folder import load_folder  # noqa: E402
from maas.training.demo_data import write_digits_archive  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "optimize.json"
RECIPES = (
    "quantize int8-dynamic",
    "prune 0.5",
    "prune 0.5 structured",
    "share 4",
    "prune 0.5 -> share 4",
    "prune 0.5 -> quantize int8-dynamic",
)


def run_job(settings: Settings, kind: str, tenant: int, params: dict) -> dict:
    registry = open_registry(settings)
    store = JobStore(registry.engine)
    job, _ = store.create(kind, tenant, params, created_by=None, max_attempts=1)
    worker = Worker(settings)
    worker.run(max_jobs=1)
    worker.engine.dispose()
    done = store.get(job.id, None)
    registry.close()
    if done.status is not JobStatus.succeeded:
        raise SystemExit(f"the {kind} job failed: {done.error}")
    return done.result


def accuracy(registry, reference: str, validation) -> float:
    images, labels = validation
    module, _ = load_folder(registry.folder(registry.resolve(reference)))
    with torch.inference_mode():
        predicted = torch.cat([module(images[i : i + 256]) for i in range(0, len(labels), 256)])
    return float((predicted.argmax(-1) == labels).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=15)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp()) / "home"
    settings = Settings(home=home)
    archive = home.parent / "digits.zip"
    write_digits_archive(archive)
    registry = open_registry(settings)
    tenant, files = training._tenant_and_files(registry, settings)
    upload = home / "upload.zip"
    upload.write_bytes(archive.read_bytes())
    file_id = files.create(tenant, "dataset", "digits.zip", upload, created_by=None).id
    registry.close()
    trained = run_job(settings, "train", tenant, training.params(file_id, args.epochs))
    print(f"trained digits-cnn:1, val_accuracy {trained['val_accuracy']:.4f}")
    validation = training.split(archive).validation
    rows = []
    for number, recipe in enumerate(RECIPES, start=1):
        registry = open_registry(settings)
        name = f"digits-{number}"
        params = validate({"model": "digits-cnn:1", "recipe": recipe, "name": name})
        check_parent(registry.open_version("digits-cnn:1"), params)
        registry.close()
        result = run_job(settings, "optimize", tenant, params)
        time.sleep(CACHE_SECONDS)
        registry = open_registry(settings)
        rows.append(
            {
                "recipe": recipe,
                "artifact_bytes_ratio": result["artifact_bytes_ratio"],
                "throughput_batch32_ratio": result["throughput_per_s_ratio"],
                "latency_batch1_ratio": result["latency_ms_p50_ratio"],
                "parent_accuracy": accuracy(registry, "digits-cnn:1", validation),
                "child_accuracy": accuracy(registry, f"{name}:1", validation),
                "top1_agreement": result["top1_agreement"],
                "sparsity": result["sparsity"],
            }
        )
        registry.close()
    print(
        "| recipe | artifact | throughput (batch 32) | latency (batch 1) "
        "| accuracy parent → child | sparsity |"
    )
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| `{row['recipe']}` | {row['artifact_bytes_ratio']:.3f}x "
            f"| {row['throughput_batch32_ratio']:.2f}x | {row['latency_batch1_ratio']:.2f}x "
            f"| {row['parent_accuracy']:.4f} → {row['child_accuracy']:.4f} "
            f"| {row['sparsity']:.2f} |"
        )
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {"epochs": args.epochs, "threads": torch.get_num_threads(), "rows": rows}, indent=2
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
