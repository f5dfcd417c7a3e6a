"""An LLM's ``optimize`` job: ``prune structured -> distil -> quantize`` (any of them, in
that order) or ``export gguf`` alone, each step writing a folder the next reads
(maas/optimize/llm_shrink.py, llm_quantize.py, llm.py), then parent and child measured
through maas's engine and the child imported as a version."""

from __future__ import annotations

from typing import Any

import torch

from maas.optimize import data, llm, llm_quantize, llm_shrink, report
from maas.optimize.job import evaluation_texts, import_child
from maas.optimize.versions import folder_bytes, opened_folder
from maas.runtime.llm.hf_model import load_hf_model


def run(context, registry, files, params, opened, steps, tenant) -> dict[str, Any]:
    """An LLM's recipe (prune structured -> distil -> quantize, or export gguf alone), each
    step writing a folder the next reads, measured through maas's engine."""
    folder = context.workdir / "model"
    current = opened
    notes: list[str] = []
    share = 0.6 / len(steps)
    rows = _training_rows(context, files, params, opened, tenant, steps)
    for index, step in enumerate(steps):
        context.report(index * share, message=f"step {index + 1}: {step}")
        target = folder if index == len(steps) - 1 else context.workdir / f"step-{index + 1}"
        if target.exists():  # what an attempt that died left
            import shutil

            shutil.rmtree(target)

        def progress(done: int, total: int, loss: float, index=index) -> None:
            context.report(
                (index + done / total) * share, message=f"training step {done}: loss {loss:.4f}"
            )

        notes += _step(step, opened, current, target, rows, params, progress)
        context.report(message=notes[-1])
        current = opened_folder(opened, target)
    texts = evaluation_texts(context, files, params, tenant)
    context.report(0.6, message="measuring parent and child")
    last = steps[-1]
    measured = {
        "parent": llm.measure(opened, opened.manifest.size_bytes, texts),
        "child": llm.measure(
            current,
            folder_bytes(folder),
            texts,
            torch.bfloat16 if last.variant == "bfloat16" else torch.float32,
        ),
    }
    parent_figures, child_figures = (measured[s]["figures"] for s in ("parent", "child"))
    figures = {
        **child_figures,
        **report.compare(parent_figures, child_figures),
        **llm.parity(measured["parent"], measured["child"]),
    }
    if "perplexity" in parent_figures:
        figures["perplexity_ratio"] = child_figures["perplexity"] / parent_figures["perplexity"]
    notes += [
        f"the parent answers {measured['parent']['answer']!r} to {llm.QUESTION_TEXT!r}",
        f"the child answers {measured['child']['answer']!r}",
    ]
    return import_child(
        context, registry, params, opened, folder, figures, parent_figures, notes, tenant
    )


def _step(step, parent, current, target, rows, params, progress) -> list[str]:
    """One step of an LLM's recipe from ``current`` (the parent or the step before's folder)
    into ``target``; returns its notes."""
    options = step.options
    if step.kind == "quantize":
        group_size = options.get("group_size", 0)
        return [llm_quantize.write(current, options["method"], group_size, target)]
    if step.kind == "export":
        stem = parent.record.name.replace("/", "-")
        kind = options["type"]
        return [llm.export_gguf(current, kind, target / f"{stem}.{kind}.gguf")]
    source = load_hf_model(current)
    model, notes = source, []
    if step.kind == "prune":
        calibration = rows[: max(1, llm_shrink.MAX_CALIBRATION_TOKENS // rows.shape[1])]
        model, note = llm_shrink.prune(source, options["amount"], calibration)
        notes.append(note)
        if options.get("fine_tune_steps"):
            loss = llm_shrink.train(
                model, rows, options["fine_tune_steps"], step.setting("learning_rate", "llm"),
                params.seed, progress=progress,
            )  # fmt: skip
            notes.append(
                f"fine-tuned {options['fine_tune_steps']} steps (learning rate "
                f"{step.setting('learning_rate', 'llm')}): loss {loss:.4f}"
            )
    else:  # distil, the parent as teacher
        if options.get("layers"):
            model, note = llm_shrink.fewer_layers(source, options["layers"])
            notes.append(note)
        # the parent itself, if the student came from it, is loaded already
        teacher = source if current is parent and model is not source else load_hf_model(parent)
        steps, rate, temperature, alpha = (
            step.setting(name, "llm") for name in ("steps", "learning_rate", "temperature", "alpha")
        )
        loss = llm_shrink.train(
            model, rows, steps, rate, params.seed, teacher, temperature, alpha, progress
        )
        notes.append(
            f"distilled from {parent.record.reference} for {steps} steps (learning rate "
            f"{rate}, temperature {temperature}, alpha {alpha}): loss {loss:.4f}"
        )
    size = llm_shrink.save(model, parent, target)
    notes[-1] += f"; {size:,} bytes of float32 weights"
    return notes


def _training_rows(context, files, params, opened, tenant, steps):
    """The training file as token rows, for the steps that learn or calibrate: the texts of
    a dataset, or the conversations of a fine-tune file."""
    if not any(step.kind in ("prune", "distil") for step in steps):
        return None
    from maas.runtime.llm.tokenizer import load_tokenizer
    from maas.training import chat_data, text_data

    tokenizer = load_tokenizer(opened)
    if files.get(params.training_file, tenant).purpose == "fine-tune":
        path = context.workdir / "chats.jsonl"
        if not path.exists():
            files.copy_to(params.training_file, tenant, path.with_suffix(".partial"))
            path.with_suffix(".partial").replace(path)
        chats = (messages for _, messages in chat_data.read_chats(path))
        documents = llm_shrink.chat_ids(tokenizer, chats)
    else:
        path = text_data.fetch(files, params.training_file, tenant, context.workdir)
        texts = data.read_evaluation_texts(path, "training")
        documents = llm_shrink.text_ids(tokenizer, texts)
    return llm_shrink.token_rows(documents, llm_shrink.MAX_TRAINING_TOKENS)
