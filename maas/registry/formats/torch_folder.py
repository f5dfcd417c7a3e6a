"""maas's own folders for built-in PyTorch architectures: ``maas-architecture.json`` names the
architecture and its constructor arguments, ``model.safetensors`` holds the weights."""

from __future__ import annotations

from pathlib import Path

from maas.registry.formats.huggingface import check_safetensors
from maas.registry.formats.info import FormatInfo
from maas.registry.manifest import TASKS, TensorSpec

ARCHITECTURE_FILE = "maas-architecture.json"
DEFAULT_TASKS = {
    "small-cnn": "image-classification",
    "lstm-classifier": "text-classification",
    "transformer-classifier": "text-classification",
}


def inspect(folder: Path) -> FormatInfo:
    # torch is imported only when such a folder is imported
    from maas.runtime.architectures import resolve_arguments, signature
    from maas.runtime.architectures.folder import WEIGHTS_FILE, read_architecture

    description = read_architecture(folder)
    check_safetensors(folder / WEIGHTS_FILE, WEIGHTS_FILE)
    name = description["architecture"]
    arguments = resolve_arguments(name, description["arguments"])
    inputs, outputs = signature(name, arguments)
    options: dict = {}
    if description.get("preprocessing"):
        options["preprocessing"] = description["preprocessing"]
    tokenizer = {"kind": "huggingface", "files": ["tokenizer.json"]}
    return FormatInfo(
        format="torch",
        runtime="torch",
        default_task=DEFAULT_TASKS.get(name, "tensor"),
        tasks=(DEFAULT_TASKS.get(name, "tensor"), "tensor") if name in DEFAULT_TASKS else TASKS,
        architecture=name,
        config={"architecture": name, "arguments": arguments, "weights": WEIGHTS_FILE}
        | ({"quantization": description["quantization"]} if "quantization" in description else {}),
        inputs=[TensorSpec(**spec) for spec in inputs],
        outputs=[TensorSpec(**spec) for spec in outputs],
        labels=description.get("labels"),
        tokenizer=tokenizer if (folder / "tokenizer.json").is_file() else None,
        task_options=options,
        weight_files=[WEIGHTS_FILE],
    )
