"""Recognise the model format of a staged folder and read what the manifest needs from it.

One module per format; ``inspect_folder`` picks the right one from the files present.
"""

from __future__ import annotations

from pathlib import Path

from maas.errors import InvalidRequest, UnsupportedFormat
from maas.registry.formats import gguf_file, huggingface, torch_folder
from maas.registry.formats.info import FormatInfo

SUPPORTED = (
    "a Hugging Face folder (config.json with *.safetensors), a .gguf file, a .onnx file, "
    "a maas architecture folder (maas-architecture.json with model.safetensors), "
    "or a .tar.gz/.tgz/.tar/.zip archive of one of these"
)

__all__ = ["SUPPORTED", "FormatInfo", "inspect_folder", "choose_task"]


def inspect_folder(folder: Path) -> FormatInfo:
    """Detect the format of the files at the top of ``folder`` and inspect them."""
    files = sorted(path for path in folder.iterdir() if path.is_file())
    ggufs = [path for path in files if path.suffix.lower() == ".gguf"]
    onnxs = [path for path in files if path.suffix.lower() == ".onnx"]
    has_config = (folder / "config.json").is_file()
    if (folder / torch_folder.ARCHITECTURE_FILE).is_file():
        return torch_folder.inspect(folder)
    if ggufs:
        if len(ggufs) > 1:
            names = ", ".join(path.name for path in ggufs)
            raise UnsupportedFormat(f"several GGUF files ({names}); import one at a time")
        return gguf_file.inspect(ggufs[0])
    if has_config and huggingface.weight_files(folder):
        return huggingface.inspect(folder)
    if onnxs:
        if len(onnxs) > 1 and not (folder / "model.onnx").is_file():
            names = ", ".join(path.name for path in onnxs)
            raise UnsupportedFormat(f"several ONNX files ({names}); name the main one model.onnx")
        main = folder / "model.onnx" if len(onnxs) > 1 else onnxs[0]
        from maas.registry.formats import onnx_file  # onnx: 7 MiB where no ONNX is read

        return onnx_file.inspect(folder, main)
    if has_config:
        raise UnsupportedFormat(
            "this Hugging Face folder has no *.safetensors weights; maas loads only "
            "safetensors (see docs/registry.md for converting)"
        )
    raise UnsupportedFormat(f"no model found; maas imports {SUPPORTED}")


def choose_task(info: FormatInfo, requested: str | None) -> str:
    """The task to register: the requested one if the format can serve it, else the default."""
    if requested is None:
        if info.default_task is None:
            raise InvalidRequest(
                f"cannot tell the task of this {info.format} model; give one with --task",
                param="task",
            )
        return info.default_task
    if info.tasks is not None and requested not in info.tasks:
        raise InvalidRequest(
            f"a {info.format} model of architecture {info.architecture} cannot serve task "
            f"{requested!r}; it can serve: {', '.join(info.tasks)}",
            param="task",
        )
    if requested == "chat" and not info.chat_template:
        raise InvalidRequest(
            "this model has no chat template, so it cannot serve 'chat'; "
            "import it with --task text-generation",
            param="task",
        )
    return requested
