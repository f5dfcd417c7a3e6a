"""Runtimes for classic models: ONNX, built-in torch architectures, Hugging Face encoders."""

from __future__ import annotations

from maas.errors import UnsupportedFormat
from maas.registry.records import OpenedVersion
from maas.runtime.base import Runtime, RuntimeOptions


def runtime_for(opened: OpenedVersion, options: RuntimeOptions) -> Runtime:
    """The runtime class the version's manifest names (imported only when needed)."""
    kind = opened.manifest.runtime
    if kind == "onnx":
        from maas.runtime.classic.onnx import OnnxRuntime

        return OnnxRuntime(opened, options)
    if kind == "torch":
        from maas.runtime.classic.torch_module import TorchModuleRuntime

        return TorchModuleRuntime(opened, options)
    if kind == "transformers" and opened.manifest.task != "chat":
        from maas.runtime.classic.transformers_task import TransformersRuntime

        return TransformersRuntime(opened, options)
    raise UnsupportedFormat(
        f"{opened.record.reference} is a {opened.manifest.task} model for the {kind} runtime; "
        "it is served by the generation engine, not here"
    )
