"""A job kind for the worker tests, loaded the way operators add theirs (MAAS_JOB_PLUGINS):
counts ``steps`` steps of ``step_seconds`` each, checkpointing after every step (a file in its
folder, written whole, and the step in the job's row), then registers a tiny ONNX model as the
job's result."""

from __future__ import annotations

import json
import os
import time

from maas.errors import InvalidRequest
from maas.jobs.kinds import JobKind
from maas.registry import open_registry


def validate(params: dict) -> dict:
    steps = params.get("steps", 5)
    seconds = params.get("step_seconds", 0.1)
    if not isinstance(steps, int) or not 1 <= steps <= 10_000:
        raise InvalidRequest("steps must be an integer from 1 to 10000", param="params.steps")
    if not isinstance(seconds, int | float) or not 0 <= seconds <= 60:
        raise InvalidRequest("step_seconds must be 0 to 60", param="params.step_seconds")
    return {"steps": steps, "step_seconds": float(seconds), "model": params.get("model", "counted")}


def run(context) -> dict:
    steps, seconds = context.params["steps"], context.params["step_seconds"]
    state = context.workdir / "checkpoint.json"
    resume = context.resume_point()
    done = json.loads(state.read_text())["done"] if resume and state.exists() else 0
    started_from = done
    history = context.workdir / "attempts.log"  # what each attempt did, for the test to read
    with history.open("a") as log:
        log.write(f"{context.attempt} {os.getpid()} from {done}\n")
    while done < steps:
        time.sleep(seconds)
        done += 1
        partial = state.with_suffix(".partial")
        partial.write_text(json.dumps({"done": done}))
        os.replace(partial, state)
        context.report(
            done / steps,
            message=f"step {done}",
            step=done,
            metrics={"loss": 1.0 / done},
            checkpoint={"file": state.name, "done": done},
        )
    from tests.fixtures import make_onnx

    model = make_onnx(context.workdir / "model.onnx")
    result = {"started_from": started_from, "steps": steps}
    registry = open_registry(context.settings)
    context.flush()
    try:
        version = registry.import_model(
            model,
            context.params["model"],
            source_label=f"job {context.job_id}",
            before_commit=lambda session, number: context.finish_in(
                session, {**result, "model": context.params["model"], "version": number}
            ),
        )
    finally:
        registry.close()
    return {**result, "version": version.version}


JOB_KINDS = [JobKind("count", validate, run, "counts steps, then registers a tiny model")]
