"""What kinds of job exist: each a name, a check of its parameters, and the function a worker
runs. Built-in kinds are listed here; ``MAAS_JOB_PLUGINS`` names modules whose ``JOB_KINDS``
(a list of ``JobKind``) add more, the way Celery's ``imports`` do: operators' own code, loaded
by the server (to accept such jobs) and by the workers (to run them)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ValidationError

from maas.errors import InvalidRequest

if TYPE_CHECKING:
    from maas.jobs.worker import JobContext


M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class JobKind:
    name: str
    validate: Callable[[dict[str, Any]], dict[str, Any]]
    """The parameters as they will run (defaults filled in); raises InvalidRequest."""
    run: Callable[[JobContext], dict[str, Any]]
    """Runs the job and returns its result; reports progress and checkpoints through the
    context, which raises Cancelled or LeaseLost when it must stop."""
    description: str = ""
    file_params: tuple[str, ...] = ()
    """Parameters that name files (``/v1/files``): they must exist in the job's tenant."""
    created_by: str | None = None
    """The route that creates jobs of this kind, when not ``/api/v1/jobs`` (which then
    refuses them): a fine-tuning job's name and checks come from ``/v1/fine_tuning/jobs``."""


def built_in() -> tuple[JobKind, ...]:
    """The kinds maas ships. Their code (and torch) is imported at their first use, so an
    idle worker stays small."""
    train, fine_tune = "maas.training.train", "maas.training.fine_tune"
    optimize = "maas.optimize.job"
    return (
        JobKind(
            "train",
            _deferred(train, "validate"),
            _deferred(train, "run"),
            "train a built-in architecture (small-cnn, lstm-classifier, "
            "transformer-classifier) from scratch on an uploaded dataset",
            file_params=("training_file",),
        ),
        JobKind(
            "fine-tune",
            _deferred(fine_tune, "validate"),
            _deferred(fine_tune, "run"),
            "LoRA fine-tuning of a Llama-family chat model on a fine-tune file",
            file_params=("training_file", "validation_file"),
            created_by="POST /v1/fine_tuning/jobs",
        ),
        JobKind(
            "optimize",
            _deferred(optimize, "validate"),
            _deferred(optimize, "run"),
            "compress a registered model into a new, measured version (a recipe of steps)",
            created_by="POST /api/v1/optimizations",
        ),
    )


def _deferred(module: str, function: str) -> Callable:
    def call(*args: Any) -> Any:
        return getattr(importlib.import_module(module), function)(*args)

    call.__qualname__ = f"{module}.{function}"
    return call


def job_kinds(plugins: list[str] | tuple[str, ...] = ()) -> dict[str, JobKind]:
    kinds = {kind.name: kind for kind in built_in()}
    for module_name in plugins:
        module = importlib.import_module(module_name)
        for kind in getattr(module, "JOB_KINDS", ()):
            if not isinstance(kind, JobKind):
                raise TypeError(f"{module_name}.JOB_KINDS holds {kind!r}, not a JobKind")
            kinds[kind.name] = kind
    return kinds


def parse_params(model: type[M], params: dict[str, Any]) -> M:
    """``params`` read by a kind's pydantic model; InvalidRequest naming the first bad one
    (``params.epochs``)."""
    try:
        return model(**params)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise InvalidRequest(f"params.{where}: {first['msg']}", param=f"params.{where}") from None


def check_params(kinds: dict[str, JobKind], kind: str, params: Any) -> dict[str, Any]:
    if kind not in kinds:
        known = ", ".join(sorted(kinds)) or "none are installed"
        raise InvalidRequest(f"unknown job kind {kind!r} (kinds: {known})", param="kind")
    if not isinstance(params, dict):
        raise InvalidRequest("params must be an object", param="params")
    return kinds[kind].validate(params)
