"""Optimized versions against their parent, measured in one run.

The digits CNN (small-cnn, channels 16 and 32, hidden 64, 16x16; scikit-learn's digits,
80/20 split) is trained by a real ``train`` job, then each recipe runs as a real ``optimize``
job (in-process ``Worker``, SQLite). Each job's own report gives the artifact size, latency at
batch 1 and throughput at batch 32 of parent and child (medians of timed runs, in the same
job), parity, and the accuracy of parent and child on the validation split the training job
held out (given to each job as its ``evaluation_file``). The recipes that learn (a fine-tune
after pruning, distillation) learn from the training split only (``training_file``).
Ratios are child over parent.

all-MiniLM-L6-v2 (the demo embedder) is quantized to dynamic int8 (torch) and exported to
ONNX (float, dynamic int8, and static int8 calibrated on the training texts below), and
SmolLM2-135M-Instruct (the demo LLM, a Q4_1 GGUF) stored as bfloat16, int8 and int4
safetensors for maas's engine and exported to GGUF Q8_0, Q4_0 and Q4_1, each by an
``optimize`` job
whose report is measured on held-out texts: prose lines of this repository's docs/ (a CSV
``text`` column; MiniLM embeds up to 512 of them, SmolLM2 reads their first 4,096 tokens).
``--part smollm2-shrink`` prunes and distils SmolLM2, calibrating and learning on other
texts: the paragraphs of the installed Python packages' descriptions (their PyPI pages),
which also calibrate MiniLM's static int8.

    .venv/bin/python bench/optimize.py [--epochs 15] [--part cnn|minilm|smollm2|smollm2-shrink|all]
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
from maas.training.demo_data import write_digits_archive  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "optimize.json"
RECIPES = (
    "quantize int8-dynamic",
    "prune 0.5",
    "prune 0.5 structured",
    "prune 0.5 structured fine_tune_steps=300",
    "distil width=0.5 steps=1500 learning_rate=0.003",
    "distil width=0.35 layers=1 steps=1500 learning_rate=0.003",
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


def write_split(archive: Path, folder: Path) -> tuple[Path, Path]:
    """The digits as two archives: the images the train job learns from and those it holds
    out (its own split: fraction 0.2, seed 0, in ``load_split``'s order)."""
    import random
    import zipfile

    with zipfile.ZipFile(archive) as source:
        names = sorted(n for n in source.namelist() if n.endswith(".png"))
        by_class: dict[str, list[str]] = {}
        for name in names:
            by_class.setdefault(name.split("/")[1], []).append(name)
        samples = [n for label in sorted(by_class) for n in sorted(by_class[label])]
        order = list(range(len(samples)))
        random.Random(0).shuffle(order)
        cut = max(1, round(len(samples) * 0.2))
        parts = {"held": order[:cut], "learnt": order[cut:]}
        paths = {}
        for part, indices in parts.items():
            paths[part] = folder / f"digits-{part}.zip"
            with zipfile.ZipFile(paths[part], "w") as target:
                for index in indices:
                    target.writestr(samples[index], source.read(samples[index]))
    return paths["learnt"], paths["held"]


def store_file(files, tenant: int, path: Path) -> str:
    copy = path.with_name(path.name + ".upload")
    copy.write_bytes(path.read_bytes())
    return files.create(tenant, "dataset", path.name, copy, created_by=None).id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=15)
    parts = ("cnn", "minilm", "smollm2", "smollm2-shrink", "all")
    parser.add_argument("--part", choices=parts, default="all")
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results["threads"] = torch.get_num_threads()
    if args.part in ("cnn", "all"):
        results.update(epochs=args.epochs, rows=digits_rows(args.epochs))
    if args.part != "cnn":
        parts = ("minilm", "smollm2", "smollm2-shrink") if args.part == "all" else (args.part,)
        results.update(demo_rows(parts))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


def held_out_texts(path: Path) -> int:
    """Prose lines of docs/ as a CSV with a ``text`` column; returns how many."""
    import csv

    lines = []
    for doc in sorted((Path(__file__).resolve().parents[1] / "docs").glob("*.md")):
        for line in doc.read_text().splitlines():
            line = line.strip()
            if 60 <= len(line) <= 400 and line[0].isalpha() and "|" not in line:
                lines.append(line)
    with path.open("w", newline="") as target:
        writer = csv.writer(target)
        writer.writerow(["text"])
        writer.writerows([line] for line in lines)
    return len(lines)


def learns(recipe: str) -> bool:
    """Whether a recipe learns or calibrates from the training texts."""
    return any(word in recipe for word in ("prune", "distil", "int8-static"))


def training_texts(path: Path) -> int:
    """Paragraphs of the installed packages' descriptions (prose, not code) as a CSV with a
    ``text`` column; returns how many."""
    import csv
    from importlib import metadata

    paragraphs = set()
    for distribution in metadata.distributions():
        text = distribution.metadata.get_payload() or distribution.metadata.get("Description")
        for block in (text or "").split("\n\n"):
            lines = [line.strip() for line in block.splitlines()]
            joined = " ".join(lines)
            prose = sum(c.isalpha() or c.isspace() for c in joined) / max(1, len(joined))
            if len(joined) >= 200 and prose > 0.9 and lines[0][:1].isalpha():
                paragraphs.add(joined)
    with path.open("w", newline="") as target:
        writer = csv.writer(target)
        writer.writerow(["text"])
        writer.writerows([p] for p in sorted(paragraphs))
    return len(paragraphs)


def demo_rows(parts: tuple[str, ...]) -> dict:
    from maas.registry import demo

    home = Path(tempfile.mkdtemp()) / "home"
    settings = Settings(home=home)
    registry = open_registry(settings)
    tenant, files = training._tenant_and_files(registry, settings)
    texts = home.parent / "held-out.csv"
    count = held_out_texts(texts)
    evaluation_file = store_file(files, tenant, texts)
    found = {}
    for model in demo.DEMO_MODELS:
        task = "chat" if model.path.endswith(".gguf") else "embeddings"
        found[model.name] = model
        registry.import_model(demo.locate(model), model.name, task=task, owner=tenant)
    registry.close()
    print(f"{count} held-out lines from docs/")
    learnt = home.parent / "training.csv"
    print(f"{training_texts(learnt)} training paragraphs from package descriptions")
    training_file = store_file(files, tenant, learnt)
    recipes = {
        "minilm": [
            ("all-minilm-l6-v2", "quantize int8-dynamic"),
            ("all-minilm-l6-v2", "export onnx"),
            ("all-minilm-l6-v2", "quantize int8-dynamic -> export onnx"),
            ("all-minilm-l6-v2", "quantize int8-static -> export onnx"),
        ],
        "smollm2": [
            ("smollm2-135m-instruct", "quantize bfloat16"),
            ("smollm2-135m-instruct", "quantize int8"),
            ("smollm2-135m-instruct", "quantize int4"),
            ("smollm2-135m-instruct", "quantize int4 group_size=64"),
            ("smollm2-135m-instruct", "export gguf q8_0"),
            ("smollm2-135m-instruct", "export gguf q4_0"),
            ("smollm2-135m-instruct", "export gguf q4_1"),
        ],
        "smollm2-shrink": [
            ("smollm2-135m-instruct", "prune 0.5 structured"),
            ("smollm2-135m-instruct", "distil layers=20 steps=100"),
            ("smollm2-135m-instruct", "prune 0.5 structured -> distil steps=100 -> quantize int4"),
        ],
    }
    out = {}
    for part in parts:
        rows = []
        for model, recipe in recipes[part]:
            params = validate(
                {
                    "model": f"{model}:1",  # each recipe from the demo file, not from the last
                    "recipe": recipe,
                    "evaluation_file": evaluation_file,
                    "name": f"{model}-{len(rows) + 1}-{recipe.split()[-1].replace('=', '')}",
                    **({"training_file": training_file} if learns(recipe) else {}),
                }
            )
            started = time.perf_counter()
            result = run_job(settings, "optimize", tenant, params)
            row = {"model": model, "recipe": recipe, "job_seconds": time.perf_counter() - started}
            row.update({k: v for k, v in result.items() if isinstance(v, float | int)})
            registry = open_registry(settings)
            row["notes"] = registry.open_version(result["reference"]).manifest.recipe["notes"]
            registry.close()
            rows.append(row)
            print(row, flush=True)
        out[f"{part}_rows"] = rows
    return out


def digits_rows(epochs: int) -> list[dict]:
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
    learnt, held = write_split(archive, home.parent)
    registry = open_registry(settings)
    training_file, evaluation_file = (store_file(files, tenant, p) for p in (learnt, held))
    registry.close()
    trained = run_job(settings, "train", tenant, training.params(file_id, epochs))
    print(f"trained digits-cnn:1, val_accuracy {trained['val_accuracy']:.4f}")
    rows = []
    for number, recipe in enumerate(RECIPES, start=1):
        registry = open_registry(settings)
        name = f"digits-{number}"
        params = validate(
            {
                "model": "digits-cnn:1",
                "recipe": recipe,
                "name": name,
                "training_file": training_file,
                "evaluation_file": evaluation_file,
            }
        )
        check_parent(registry, files, registry.open_version("digits-cnn:1"), params, tenant)
        registry.close()
        started = time.perf_counter()
        result = run_job(settings, "optimize", tenant, params)
        rows.append(
            {
                "recipe": recipe,
                "job_seconds": time.perf_counter() - started,
                "artifact_bytes_ratio": result["artifact_bytes_ratio"],
                "parameters_ratio": result["parameters_ratio"],
                "throughput_batch32_ratio": result["throughput_per_s_ratio"],
                "latency_batch1_ratio": result["latency_ms_p50_ratio"],
                "parent_accuracy": result["accuracy"] - result["accuracy_change"],
                "child_accuracy": result["accuracy"],
                "evaluation_examples": result["evaluation_examples"],
                "top1_agreement": result["top1_agreement"],
                "sparsity": result["sparsity"],
            }
        )
        print(rows[-1], flush=True)
    print(
        "| recipe | artifact | parameters | throughput (batch 32) | latency (batch 1) "
        "| accuracy parent → child | sparsity | job |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| `{row['recipe']}` | {row['artifact_bytes_ratio']:.3f}x "
            f"| {row['parameters_ratio']:.3f}x "
            f"| {row['throughput_batch32_ratio']:.2f}x | {row['latency_batch1_ratio']:.2f}x "
            f"| {row['parent_accuracy']:.4f} → {row['child_accuracy']:.4f} "
            f"| {row['sparsity']:.2f} | {row['job_seconds']:.0f} s |"
        )
    return rows


if __name__ == "__main__":
    main()
