"""Training through maas against a plain PyTorch loop, in one run, on the same data.

The digits CNN: scikit-learn's 1,797 digits as an image-folder archive (``maas demo
--training-data``), 80/20 split, small-cnn (channels 16, 32; hidden 64; 16x16), AdamW,
cosine schedule, batch 64. maas: a real ``train`` job, created in the job store and run by an
in-process ``Worker`` on a SQLite database (events every 10 steps, a checkpoint and a
validation pass every epoch, the best epoch imported into the registry). Baseline: the same
model, data tensors, optimiser, schedule and seed in a bare loop (no events, no checkpoints;
the same validation pass, since choosing the best epoch needs it). The job checkpoints when
10 s have passed since the last one (``checkpoint_every_seconds``). Training samples/s count
only the epochs' training images over the wall time of the whole run after the data is
loaded, so the job's costs (events, checkpoints, the import) show as a lower rate. Rounds
alternate (maas, baseline, maas, baseline) and the median of each is reported.

    .venv/bin/python bench/training.py [--epochs 30] [--rounds 3]

LoRA fine-tuning against ``transformers`` + ``peft`` is not measured yet: maas has no
fine-tuning job so far.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maas.auth.store import TenantStore  # noqa: E402
from maas.config import Settings  # noqa: E402
from maas.files import FileStore  # noqa: E402
from maas.jobs import JobStatus, JobStore  # noqa: E402
from maas.jobs.worker import Worker  # noqa: E402
from maas.registry import open_registry  # noqa: E402
from maas.runtime.architectures import build  # noqa: E402
from maas.tasks.images import ImagePreprocessing  # noqa: E402
from maas.training.demo_data import write_digits_archive  # noqa: E402
from maas.training.image_data import load_split  # noqa: E402
from maas.training.train import MEAN, STD  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "training.json"
ARGUMENTS = {"channels": [16, 32], "hidden": 64}


def params(file_id: str, epochs: int) -> dict:
    return {
        "training_file": file_id,
        "model": "digits-cnn",
        "epochs": epochs,
        "arguments": ARGUMENTS,
        "image_size": 16,
        "batch_size": 64,
    }


def run_maas(home: Path, archive: Path, epochs: int) -> dict:
    settings = Settings(home=home)
    registry = open_registry(settings)
    tenants = TenantStore(registry.engine)
    tenants.create("bench", "other")
    tenant = tenants.get_id("bench")
    files = FileStore(
        registry.engine,
        settings.artifacts,
        registry.vault,
        registry.limits,
        max_chat_chars=settings.fine_tune_max_chat_chars,
    )
    upload = home / "upload.zip"
    upload.write_bytes(archive.read_bytes())
    file_id = files.create(tenant, "dataset", "digits.zip", upload, created_by=None).id
    store = JobStore(registry.engine)
    job, _ = store.create("train", tenant, params(file_id, epochs), created_by=None, max_attempts=1)
    worker = Worker(settings)
    started = time.perf_counter()
    worker.run(max_jobs=1)
    seconds = time.perf_counter() - started
    worker.engine.dispose()
    done = store.get(job.id, None)
    registry.close()
    if done.status is not JobStatus.succeeded:
        raise SystemExit(f"the job failed: {done.error}")
    loading = _loading_seconds(store, job.id)
    trained = len_train(archive) * done.result["epochs"]
    return {
        "seconds": round(seconds, 2),
        "data_seconds": round(loading, 2),
        "samples_per_s": trained / (seconds - loading),
        "val_accuracy": done.result["val_accuracy"],
    }


def _loading_seconds(store: JobStore, job_id: str) -> float:
    """From the job's claim to its first event after the data was loaded."""
    events = store.events(job_id, None, limit=1000)
    claimed = next(e.at for e in events if e.message.startswith("claimed"))
    loaded = next(e.at for e in events if "training and" in e.message)
    return (loaded - claimed).total_seconds()


_SPLIT = {}


def split(archive: Path):
    if "data" not in _SPLIT:
        import zipfile

        folder = Path(tempfile.mkdtemp()) / "data"
        with zipfile.ZipFile(archive) as source:
            source.extractall(folder)
        spec = ImagePreprocessing(16, 16, tuple(MEAN), tuple(STD))
        _SPLIT["data"] = load_split(folder, spec, 0.2, 0)
    return _SPLIT["data"]


def len_train(archive: Path) -> int:
    return len(split(archive).train[1])


def run_baseline(archive: Path, epochs: int) -> dict:
    data = split(archive)
    started = time.perf_counter()
    torch.manual_seed(0)
    model = build("small-cnn", {**ARGUMENTS, "image_size": 16, "num_classes": len(data.classes)})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    generator = torch.Generator().manual_seed(0)
    loss_fn = torch.nn.CrossEntropyLoss()
    images, labels = data.train
    best_loss, accuracy_at_best = None, None
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(labels), generator=generator).split(64):
            loss = loss_fn(model(images[batch]), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()
        model.eval()
        with torch.no_grad():  # the epoch kept is the one of lowest validation loss, as maas's
            logits = model(data.validation[0])
            loss = float(loss_fn(logits, data.validation[1]))
        if best_loss is None or loss < best_loss:
            accuracy = float((logits.argmax(-1) == data.validation[1]).float().mean())
            best_loss, accuracy_at_best = loss, accuracy
    seconds = time.perf_counter() - started
    return {
        "seconds": round(seconds, 2),
        "samples_per_s": len(labels) * epochs / seconds,
        "val_accuracy": accuracy_at_best,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        archive = Path(scratch) / "digits.zip"
        write_digits_archive(archive)
        split(archive)  # decoded once, outside the timings
        rounds = {"maas": [], "baseline": []}
        for index in range(args.rounds):
            rounds["maas"].append(run_maas(Path(scratch) / f"home{index}", archive, args.epochs))
            rounds["baseline"].append(run_baseline(archive, args.epochs))
            print(rounds["maas"][-1], rounds["baseline"][-1])
    rows = {}
    for name, runs in rounds.items():
        rows[name] = {
            "samples_per_s": round(statistics.median(r["samples_per_s"] for r in runs), 1),
            "seconds": statistics.median(r["seconds"] for r in runs),
            "val_accuracy": statistics.median(r["val_accuracy"] for r in runs),
        }
    ratio = rows["maas"]["samples_per_s"] / rows["baseline"]["samples_per_s"]
    print(f"{'':10} {'samples/s':>10} {'seconds':>8} {'val acc':>8}")
    for name, row in rows.items():
        rate, seconds, accuracy = row["samples_per_s"], row["seconds"], row["val_accuracy"]
        print(f"{name:10} {rate:10.1f} {seconds:8.2f} {accuracy:8.3f}")
    print(f"maas / plain PyTorch, training samples/s: {ratio:.3f} (job machinery {1 - ratio:+.1%})")
    payload = {
        "epochs": args.epochs,
        "rounds": rounds,
        "medians": rows,
        "ratio": ratio,
        "threads": torch.get_num_threads(),
    }
    args.results.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
