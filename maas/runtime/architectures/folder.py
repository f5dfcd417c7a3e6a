"""The on-disk form of a built-in model: ``model.safetensors`` + ``maas-architecture.json``.

The JSON file holds::

    {"format": 1,
     "architecture": "lstm-classifier",        # a key of ARCHITECTURES
     "arguments": {"vocab_size": 5000},        # constructor keyword arguments
     "labels": ["negative", "positive"],       # or null; one per class
     "preprocessing": {"tokenizer": "tokenizer.json", "max_length": 128},   # free-form, or {}
     "quantization": "int8-dynamic"}           # optional: how the weights are stored
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from maas.artifacts.json_files import load_json
from maas.errors import RefusedArtifact, UnsupportedFormat
from maas.runtime.architectures import ARCHITECTURES, build, resolve_arguments

ARCHITECTURE_FILE = "maas-architecture.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = 1
MAX_KEYS_SHOWN = 5
QUANTIZATIONS = ("int8-dynamic", "int8-dynamic-a8", "weight-sharing")


def save_folder(
    module: nn.Module,
    folder: Path,
    *,
    architecture: str,
    arguments: dict[str, Any],
    labels: list[str] | None = None,
    preprocessing: dict[str, Any] | None = None,
    quantization: str | None = None,
    state: dict[str, Tensor] | None = None,
) -> Path:
    """Write ``module`` as a built-in model folder that ``read_architecture`` accepts; with
    ``quantization``, ``state`` holds its weights in that form (``int8-dynamic``: see
    maas/runtime/int8_linear.py)."""
    description = {
        "format": FORMAT,
        "architecture": architecture,
        "arguments": dict(arguments),
        "labels": labels,
        "preprocessing": preprocessing or {},
    }
    if quantization is not None:
        description["quantization"] = quantization
    try:
        description = _validated(json.loads(json.dumps(description)))  # as a reader sees it
    except TypeError as err:
        raise UnsupportedFormat(f"the description is not JSON: {err}") from None
    if not isinstance(module, ARCHITECTURES[architecture]):
        raise UnsupportedFormat(f"{type(module).__name__} is not a {architecture} module")
    folder.mkdir(parents=True, exist_ok=True)
    weights = _unshared_state(module) if state is None else _unshared(state)
    save_file(weights, folder / WEIGHTS_FILE, metadata={"format": "pt"})
    (folder / ARCHITECTURE_FILE).write_text(json.dumps(description, indent=2) + "\n")
    return folder


def read_architecture(folder: Path) -> dict[str, Any]:
    """The validated description in ``folder``: format, architecture, arguments, labels,
    preprocessing (``{}`` when absent). Raises UnsupportedFormat saying what is wrong."""
    path = folder / ARCHITECTURE_FILE
    if not path.is_file():
        raise UnsupportedFormat(f"{ARCHITECTURE_FILE} is missing")
    try:
        description = load_json(path)
    except ValueError as err:
        raise UnsupportedFormat(f"{ARCHITECTURE_FILE} cannot be read: {err}") from None
    return _validated(description)


def load_folder(folder: Path) -> tuple[nn.Module, dict[str, Any]]:
    """The module in ``folder``, in eval mode, and its description from ``read_architecture``."""
    description = read_architecture(folder)
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise UnsupportedFormat(f"{WEIGHTS_FILE} is missing")
    try:
        state_dict = load_file(path)
    except (SafetensorError, OSError) as err:
        raise RefusedArtifact(f"{WEIGHTS_FILE} is not a valid safetensors file: {err}") from None
    module = load_module(
        description["architecture"],
        description["arguments"],
        state_dict,
        description.get("quantization"),
    )
    return module, description


def load_module(
    architecture: str,
    arguments: dict[str, Any],
    state_dict: dict[str, Tensor],
    quantization: str | None = None,
) -> nn.Module:
    """Build the architecture, load ``state_dict`` strictly, and switch to eval mode. With
    ``quantization`` ``int8-dynamic`` (or ``-a8``), the linear layers stored as int8 run so; with
    ``weight-sharing``, shared weights are rebuilt dense from their codebooks.

    Raises UnsupportedFormat naming missing, unexpected or wrongly shaped tensors.
    """
    from maas.runtime.int8_linear import INT8_DYNAMIC, check_int8, dynamic_int8, is_scale

    module = build(architecture, arguments)
    expected = module.state_dict()
    if quantization == "weight-sharing":  # codebooks and codes back into dense weights
        from maas.runtime.shared_weights import check_shared, dense_state

        shapes = {k: v.shape for k, v in expected.items()}
        check_shared(state_dict, shapes)
        state_dict = dense_state(state_dict, shapes)
    if quantization in INT8_DYNAMIC:  # int8 weights keep their float shapes; scales beside
        check_int8(state_dict)
        scales = [k for k in state_dict if is_scale(k)]
        expected = expected | {k: state_dict[k] for k in scales}
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    problems = []
    if missing:
        problems.append(f"missing {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected {_some(unexpected)}")
    for key, tensor in expected.items():
        if key in state_dict and state_dict[key].shape != tensor.shape:
            problems.append(
                f"{key} has shape {list(state_dict[key].shape)}, expected {list(tensor.shape)}"
            )
    if problems:
        raise UnsupportedFormat(f"weights do not fit {architecture}: {'; '.join(problems)}")
    if quantization in INT8_DYNAMIC:
        return dynamic_int8(module, state_dict, INT8_DYNAMIC[quantization]).eval()
    module.load_state_dict(state_dict, strict=True)
    return module.eval()


def _validated(description: Any) -> dict[str, Any]:
    if not isinstance(description, dict):
        raise UnsupportedFormat(f"{ARCHITECTURE_FILE} should hold a JSON object")
    if description.get("format") != FORMAT:
        raise UnsupportedFormat(
            f"{ARCHITECTURE_FILE} has format {description.get('format')!r}; "
            f"this maas reads format {FORMAT}"
        )
    architecture = description.get("architecture")
    if not isinstance(architecture, str):
        raise UnsupportedFormat(f"{ARCHITECTURE_FILE} should name an architecture")
    arguments = description.get("arguments", {})
    complete = resolve_arguments(architecture, arguments)
    labels = description.get("labels")
    if labels is not None:
        if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
            raise UnsupportedFormat(f"{ARCHITECTURE_FILE} labels should be a list of strings")
        if "num_classes" in complete and len(labels) != complete["num_classes"]:
            raise UnsupportedFormat(
                f"{ARCHITECTURE_FILE} has {len(labels)} labels "
                f"for {complete['num_classes']} classes"
            )
    preprocessing = description.get("preprocessing") or {}
    if not isinstance(preprocessing, dict):
        raise UnsupportedFormat(f"{ARCHITECTURE_FILE} preprocessing should be a JSON object")
    quantization = description.get("quantization")
    if quantization not in (None, *QUANTIZATIONS):
        raise UnsupportedFormat(
            f"{ARCHITECTURE_FILE} quantization {quantization!r} is unknown; known: "
            + ", ".join(QUANTIZATIONS)
        )
    validated = {
        "format": FORMAT,
        "architecture": architecture,
        "arguments": arguments,
        "labels": labels,
        "preprocessing": preprocessing,
    }
    return validated | ({"quantization": quantization} if quantization else {})


def _unshared_state(module: nn.Module) -> dict[str, Tensor]:
    return _unshared(module.state_dict())


def _unshared(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous CPU tensors, each with its own memory: safetensors refuses tensors that share
    storage (tied weights; an LSTM's flattened cuDNN weights)."""
    state: dict[str, Tensor] = {}
    seen: set[int] = set()
    for key, tensor in tensors.items():
        tensor = tensor.detach().cpu().contiguous()
        if tensor.untyped_storage().data_ptr() in seen:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        state[key] = tensor
    return state


def _some(keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_KEYS_SHOWN])
    more = len(keys) - MAX_KEYS_SHOWN
    return f"{shown} (and {more} more)" if more > 0 else shown
