"""Training through maas against a plain PyTorch loop, in one run, on the same data.

The digits CNN: scikit-learn's 1,797 digits as an image-folder archive (``maas demo
--training-data``), 80/20 split, small-cnn (channels 16, 32; hidden 64; 16x16), AdamW,
cosine schedule, batch 64. maas: a real ``train`` job, created in the job store and run by an
in-process ``Worker`` on a SQLite database (events every 10 steps, a validation pass every
epoch, a checkpoint after an epoch once 10 s have passed since the last one, the best epoch
imported into the registry). Baseline: the same model, data tensors, optimiser, schedule and
seed in a bare loop (no events, no checkpoints; the same validation pass, since choosing the
best epoch needs it). Training samples/s count
only the epochs' training images over the wall time of the whole run after the data is
loaded, so the job's costs (events, checkpoints, the import) show as a lower rate. Rounds
come in pairs, maas first in one and the baseline first in the next; the headline ratio is
the median over pairs of maas's rate over the baseline's in the same pair (a slow spell of a
shared machine falls on both), and the median of each side is reported beside it.

LoRA fine-tuning of SmolLM2-135M-Instruct (the demo GGUF, dequantised to float32) on 40 short
chats (the e2e test's "Bluebird" file), 3 epochs, batch 4, rank 16 on every projection, AdamW
at 2e-4, loss on the assistant's tokens. maas: a real ``fine-tune`` job run by an in-process
``Worker`` (an event per step, a checkpoint per epoch, the merged model imported at the end).
Baseline: a plain ``transformers`` + ``peft`` loop a user would write, the same model, LoRA
configuration, batches and seed, no events or checkpoints. Tokens/s count the training tokens
(no padding) over the training loop's wall time: for the job, from its "Loaded" event to its
last epoch's event, which holds its per-step events and per-epoch checkpoints. The whole
job's seconds (loading, merging, importing) are reported beside the baseline's load and loop.

Before the timed rounds, one short round of each warms both up (the process's first
convolutions and matmuls build their kernels; whichever ran first would pay for both).

    .venv/bin/python bench/training.py [--epochs 30] [--rounds 3] [--part cnn|lora|both]
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
from maas.training.demo_data import (  # noqa: E402
    codename_chats,
    write_codename_chats,
    write_digits_archive,
)
from maas.training.image_data import load_split  # noqa: E402
from maas.training.train import MEAN, STD  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "training.json"
ARGUMENTS = {"channels": [16, 32], "hidden": 64}


def params(file_id: str, epochs: int, extra: dict | None = None) -> dict:
    return {
        "training_file": file_id,
        "model": "digits-cnn",
        "epochs": epochs,
        "arguments": ARGUMENTS,
        "image_size": 16,
        "batch_size": 64,
        **(extra or {}),
    }


def _tenant_and_files(registry, settings: Settings) -> tuple[int, FileStore]:
    """A tenant for the bench's job, and the file store its data goes into."""
    tenants = TenantStore(registry.engine)
    tenants.create("bench", "other")
    files = FileStore.of_registry(registry, settings)
    return tenants.get_id("bench"), files


def run_maas(home: Path, archive: Path, epochs: int, extra: dict | None = None) -> dict:
    """A ``train`` job (``extra``: more of its parameters, a strategy) run by a worker."""
    settings = Settings(home=home)
    registry = open_registry(settings)
    tenant, files = _tenant_and_files(registry, settings)
    upload = home / "upload.zip"
    upload.write_bytes(archive.read_bytes())
    file_id = files.create(tenant, "dataset", "digits.zip", upload, created_by=None).id
    store = JobStore(registry.engine)
    job, _ = store.create(
        "train", tenant, params(file_id, epochs, extra), created_by=None, max_attempts=1
    )
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


LORA = {"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 1.0, "seed": 0}


def run_maas_lora(home: Path, epochs: int) -> dict:
    from maas.registry import demo
    from maas.training.fine_tune import validate

    settings = Settings(home=home)
    registry = open_registry(settings)
    smollm2 = demo.DEMO_MODELS[0]
    registry.import_model(demo.locate(smollm2), "smollm2", task="chat")
    tenant, files = _tenant_and_files(registry, settings)
    upload = home / "bluebird.jsonl"
    write_codename_chats(upload)
    file_id = files.create(tenant, "fine-tune", "bluebird.jsonl", upload, created_by=None).id
    store = JobStore(registry.engine)
    params = validate({"model": "smollm2:1", "training_file": file_id, **LORA, "n_epochs": epochs})
    job, _ = store.create("fine-tune", tenant, params, created_by=None, max_attempts=1)
    worker = Worker(settings)
    started = time.perf_counter()
    worker.run(max_jobs=1)
    seconds = time.perf_counter() - started
    worker.engine.dispose()
    done = store.get(job.id, None)
    events = store.events(job.id, None, limit=1000)
    registry.close()
    if done.status is not JobStatus.succeeded:
        raise SystemExit(f"the fine-tuning job failed: {done.error}")
    loaded = next(e.at for e in events if e.message.startswith("Loaded "))
    trained = [e.at for e in events if e.message.startswith(f"Epoch {epochs}/")][-1]
    loop = (trained - loaded).total_seconds()
    return {
        "seconds": round(seconds, 2),
        "loop_seconds": round(loop, 2),
        "tokens_per_s": done.result["trained_tokens"] / loop,
        "train_loss": done.result["train_loss"],
    }


def run_plain_lora(epochs: int) -> dict:
    """What a user writes with transformers and peft: the same model, data, LoRA and batches."""
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from maas.registry import demo

    transformers.utils.logging.disable_progress_bar()
    gguf = demo.locate(demo.DEMO_MODELS[0])
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    examples = []
    for chat in codename_chats():
        prompt = tokenizer.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(chat, tokenize=False)
        head = tokenizer.encode(prompt, add_special_tokens=False)
        reply = tokenizer.encode(full[len(prompt) :], add_special_tokens=False)
        examples.append((head + reply, [-100] * len(head) + reply))
    torch.manual_seed(0)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(
        model, LoraConfig(r=16, lora_alpha=32, target_modules=targets, task_type="CAUSAL_LM")
    )
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=2e-4, weight_decay=0.0
    )
    generator = torch.Generator().manual_seed(0)
    loaded = time.perf_counter()
    tokens = 0
    model.train()
    for _ in range(epochs):
        loss_sum, learnt = 0.0, 0  # the epoch's mean loss over its learnt tokens, as maas's
        for batch in torch.randperm(len(examples), generator=generator).split(4):
            rows = [examples[i] for i in batch.tolist()]
            longest = max(len(ids) for ids, _ in rows)
            ids = torch.tensor([i + [tokenizer.eos_token_id] * (longest - len(i)) for i, _ in rows])
            mask = torch.tensor([[1] * len(i) + [0] * (longest - len(i)) for i, _ in rows])
            labels = torch.tensor([lab + [-100] * (longest - len(lab)) for _, lab in rows])
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            tokens += int(mask.sum())
            n = int((labels[:, 1:] != -100).sum())
            loss_sum, learnt = loss_sum + float(loss.detach()) * n, learnt + n
    loop = time.perf_counter() - loaded
    return {
        "seconds": round(time.perf_counter() - started, 2),
        "loop_seconds": round(loop, 2),
        "tokens_per_s": tokens / loop,
        "train_loss": loss_sum / learnt,
    }


def _pairs(run_maas_round, run_baseline_round, names: tuple[str, str], count: int) -> dict:
    """``count`` rounds of both, maas first in even rounds and the baseline first in odd
    ones, so neither gains from always following the other."""
    rounds: dict[str, list] = {names[0]: [], names[1]: []}
    for index in range(count):
        order = (0, 1) if index % 2 == 0 else (1, 0)
        for side in order:
            run = run_maas_round if side == 0 else run_baseline_round
            rounds[names[side]].append(run(index))
        print(rounds[names[0]][-1], rounds[names[1]][-1])
    return rounds


def _paired_ratio(rounds: dict, rate: str) -> float:
    """The median over rounds of maas's rate over the baseline's in the same round: a slow
    spell of the machine falls on both sides of a pair."""
    maas, baseline = rounds.values()
    return statistics.median(a[rate] / b[rate] for a, b in zip(maas, baseline, strict=True))


def _medians(rounds: dict) -> dict:
    return {
        name: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        for name, runs in rounds.items()
    }


def bench_cnn(scratch: Path, epochs: int, count: int) -> dict:
    archive = scratch / "digits.zip"
    write_digits_archive(archive)
    split(archive)  # decoded once, outside the timings
    run_maas(scratch / "warm", archive, 3)  # warm-up, both sides, not counted
    run_baseline(archive, 3)
    rounds = _pairs(
        lambda index: run_maas(scratch / f"home{index}", archive, epochs),
        lambda index: run_baseline(archive, epochs),
        ("maas", "baseline"),
        count,
    )
    rows = _medians(rounds)
    ratio = _paired_ratio(rounds, "samples_per_s")
    print(f"{'digits CNN':12} {'samples/s':>10} {'seconds':>8} {'val acc':>8}")
    for name, row in rows.items():
        rate, seconds, accuracy = row["samples_per_s"], row["seconds"], row["val_accuracy"]
        print(f"{name:12} {rate:10.1f} {seconds:8.2f} {accuracy:8.3f}")
    print(
        f"maas / plain PyTorch, training samples/s, median of paired rounds: {ratio:.3f} "
        f"(job machinery {1 - ratio:+.1%})"
    )
    return {"epochs": epochs, "rounds": rounds, "medians": rows, "ratio": ratio}


def bench_lora(scratch: Path, count: int) -> dict:
    epochs = LORA["n_epochs"]
    run_maas_lora(scratch / "lora-warm", 1)  # warm-up, both sides, not counted
    run_plain_lora(1)
    rounds = _pairs(
        lambda index: run_maas_lora(scratch / f"lora{index}", epochs),
        lambda index: run_plain_lora(epochs),
        ("maas", "transformers+peft"),
        count,
    )
    rows = _medians(rounds)
    ratio = _paired_ratio(rounds, "tokens_per_s")
    print(f"{'LoRA SmolLM2':18} {'tokens/s':>9} {'loop s':>7} {'total s':>8} {'loss':>7}")
    for name, row in rows.items():
        print(
            f"{name:18} {row['tokens_per_s']:9.1f} {row['loop_seconds']:7.2f} "
            f"{row['seconds']:8.2f} {row['train_loss']:7.4f}"
        )
    print(
        f"maas / transformers+peft, training tokens/s, median of paired rounds: {ratio:.3f} "
        f"(job machinery {1 - ratio:+.1%})"
    )
    return {"epochs": epochs, "rounds": rounds, "medians": rows, "ratio": ratio}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30, help="the digits CNN's epochs")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--part", choices=("cnn", "lora", "both"), default="both")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    # one part's run keeps the other part's last figures
    payload = json.loads(args.results.read_text()) if args.results.exists() else {}
    payload = {k: v for k, v in payload.items() if k in ("cnn", "lora")}
    payload["threads"] = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as scratch:
        if args.part in ("cnn", "both"):
            payload["cnn"] = bench_cnn(Path(scratch), args.epochs, args.rounds)
        if args.part in ("lora", "both"):
            payload["lora"] = bench_lora(Path(scratch), args.rounds)
    args.results.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
