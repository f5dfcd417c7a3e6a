"""Built-in model definitions in plain PyTorch, by name.

Each architecture is an ``nn.Module`` whose constructor takes only JSON values (the
``arguments`` stored next to its weights, see ``folder``) and whose ``forward`` takes and
returns plain tensors. Its static ``tensor_signature(arguments)`` describes those tensors in
Open Inference Protocol v2 terms; the input names are the ``forward`` parameter names, so
``module(**{spec["name"]: tensor})`` works.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Sequence
from typing import Any

from torch import nn

from maas.errors import UnsupportedFormat
from maas.runtime.architectures.cnn import SmallCNN
from maas.runtime.architectures.lstm import LSTMClassifier
from maas.runtime.architectures.transformer_encoder import TransformerClassifier

ARCHITECTURES: dict[str, type[nn.Module]] = {
    "small-cnn": SmallCNN,
    "lstm-classifier": LSTMClassifier,
    "transformer-classifier": TransformerClassifier,
}

TensorSpecs = list[dict[str, Any]]
"""``[{"name": str, "datatype": "FP32" | "INT64", "shape": [int, ...]}]``, -1 for a dimension of
any size: the fields of ``maas.registry.manifest.TensorSpec``."""


def build(name: str, arguments: dict[str, Any]) -> nn.Module:
    """A fresh (randomly initialised) module. Raises UnsupportedFormat for an unknown name or
    for arguments the constructor cannot take, naming the argument."""
    complete = resolve_arguments(name, arguments)
    try:
        return ARCHITECTURES[name](**complete)
    except (TypeError, ValueError) as err:
        raise UnsupportedFormat(f"invalid arguments for {name}: {err}") from None


def signature(name: str, arguments: dict[str, Any]) -> tuple[TensorSpecs, TensorSpecs]:
    """The (inputs, outputs) tensors of ``build(name, arguments)``, without building it."""
    return ARCHITECTURES[name].tensor_signature(resolve_arguments(name, arguments))


def resolve_arguments(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """Every constructor argument, defaults filled in, after checking names and JSON types."""
    parameters = inspect.signature(_architecture(name)).parameters
    if not isinstance(arguments, dict):
        raise UnsupportedFormat(f"arguments for {name} should be a JSON object")
    unknown = sorted(set(arguments) - set(parameters))
    if unknown:
        raise UnsupportedFormat(
            f"{name} has no argument {unknown[0]!r}; it takes {', '.join(parameters)}"
        )
    hints = typing.get_type_hints(ARCHITECTURES[name].__init__)
    complete = {}
    for parameter in parameters.values():
        if parameter.name in arguments:
            _check_type(name, parameter.name, arguments[parameter.name], hints[parameter.name])
            complete[parameter.name] = arguments[parameter.name]
        elif parameter.default is inspect.Parameter.empty:
            raise UnsupportedFormat(f"{name} needs argument {parameter.name!r}")
        else:
            complete[parameter.name] = parameter.default
    return complete


def _architecture(name: str) -> type[nn.Module]:
    if name not in ARCHITECTURES:
        raise UnsupportedFormat(
            f"unknown architecture {name!r}; known: {', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[name]


def _check_type(name: str, argument: str, value: Any, hint: Any) -> None:
    if typing.get_origin(hint) in (list, tuple, Sequence):
        ok = isinstance(value, list | tuple) and all(_is_int(item) for item in value)
        kind = "a list of integers"
    elif hint is bool:
        ok, kind = isinstance(value, bool), "true or false"
    elif hint is int:
        ok, kind = _is_int(value), "an integer"
    elif hint is float:
        ok, kind = _is_int(value) or isinstance(value, float), "a number"
    else:
        return
    if not ok:
        raise UnsupportedFormat(f"{name} argument {argument!r} should be {kind}, not {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


__all__ = [
    "ARCHITECTURES",
    "LSTMClassifier",
    "SmallCNN",
    "TensorSpecs",
    "TransformerClassifier",
    "build",
    "resolve_arguments",
    "signature",
]
