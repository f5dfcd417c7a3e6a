"""Hugging Face folders: config.json, safetensors weights (one file or sharded), tokenizer."""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

from safetensors import SafetensorError, safe_open

from maas.artifacts.json_files import load_json
from maas.errors import RefusedArtifact, UnsupportedFormat
from maas.registry.formats.info import LLAMA_FAMILY, FormatInfo, generation_tasks
from maas.registry.manifest import TensorSpec

INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")


def weight_files(folder: Path) -> list[str]:
    """Relative paths of the safetensors weights: the index's shards, or every top-level file."""
    index = folder / INDEX
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise UnsupportedFormat(f"{INDEX} has no weight_map")
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            _check_shard_name(folder, shard)
        return shards
    return sorted(path.name for path in folder.glob("*.safetensors") if path.is_file())


def inspect(folder: Path) -> FormatInfo:
    config = read_json(folder / "config.json")
    weights = weight_files(folder)
    for relpath in weights:
        check_safetensors(folder / relpath, relpath)
    tokenizer_config = read_json(folder / "tokenizer_config.json", missing_ok=True)
    chat_template = _chat_template(folder, tokenizer_config)
    architecture = (config.get("architectures") or [None])[0]
    info = FormatInfo(
        format="huggingface",
        runtime="transformers",
        default_task=None,
        tasks=None,
        architecture=architecture,
        config=config,
        tokenizer=_tokenizer(folder),
        chat_template=chat_template,
        context_length=next(
            (config[k] for k in CONTEXT_KEYS if isinstance(config.get(k), int)), None
        ),
        generation_config=read_json(folder / "generation_config.json", missing_ok=True) or None,
        weight_files=weights,
    )
    _fill_task(info, folder, config, architecture or "")
    return info


def _fill_task(info: FormatInfo, folder: Path, config: dict[str, Any], architecture: str) -> None:
    """The task, labels and v2 tensor signature an architecture implies."""
    classes = len(config.get("id2label") or {}) or config.get("num_labels", 2)
    if architecture.endswith(("ForCausalLM", "LMHeadModel")):
        info.default_task, info.tasks = generation_tasks(info.chat_template)
        if config.get("model_type") in LLAMA_FAMILY:
            info.runtime = "llm"
    elif architecture.endswith("ForSequenceClassification"):
        info.default_task, info.tasks = "text-classification", ("text-classification",)
        info.labels = _labels(config)
        info.inputs = _text_inputs(config)
        info.outputs = [TensorSpec(name="logits", datatype="FP32", shape=[-1, classes])]
    elif architecture.endswith("ForImageClassification"):
        info.default_task, info.tasks = "image-classification", ("image-classification",)
        info.labels = _labels(config)
        preprocessor = read_json(folder / "preprocessor_config.json", missing_ok=True)
        if preprocessor:
            info.task_options["preprocessor"] = preprocessor
        channels = config.get("num_channels", 3)
        info.inputs = [
            TensorSpec(name="pixel_values", datatype="FP32", shape=[-1, channels, -1, -1])
        ]
        info.outputs = [TensorSpec(name="logits", datatype="FP32", shape=[-1, classes])]
    elif (folder / "modules.json").is_file() or architecture.endswith("Model"):
        info.default_task, info.tasks = "embeddings", ("embeddings",)
        info.task_options.update(_sentence_transformers_options(folder))
        info.inputs = _text_inputs(config)
        hidden = config.get("hidden_size", -1)
        info.outputs = [
            TensorSpec(name="last_hidden_state", datatype="FP32", shape=[-1, -1, hidden])
        ]


def _text_inputs(config: dict[str, Any]) -> list[TensorSpec]:
    names = ["input_ids", "attention_mask"]
    if "type_vocab_size" in config:  # BERT-like: the model takes token type ids
        names.append("token_type_ids")
    return [TensorSpec(name=name, datatype="INT64", shape=[-1, -1]) for name in names]


def _labels(config: dict[str, Any]) -> list[str] | None:
    id2label = config.get("id2label")
    if not isinstance(id2label, dict) or not id2label:
        return None
    try:
        return [str(id2label[key]) for key in sorted(id2label, key=int)]
    except ValueError:
        raise UnsupportedFormat("config.json id2label keys must be class numbers") from None


def _sentence_transformers_options(folder: Path) -> dict[str, Any]:
    """Pooling and normalisation as sentence-transformers would apply them."""
    options: dict[str, Any] = {}
    modules = read_json(folder / "modules.json", missing_ok=True, kind=list) or []
    for module in modules:
        kind = str(module.get("type", "")) if isinstance(module, dict) else ""
        if kind.endswith("Pooling"):
            pooling = read_json(
                _inside(folder, module.get("path")) / "config.json", missing_ok=True
            )
            modes = [
                key.removeprefix("pooling_mode_").removesuffix("_tokens")
                for key, enabled in pooling.items()
                if key.startswith("pooling_mode_") and enabled is True
            ]
            if modes:
                options["pooling"] = modes[0]
        elif kind.endswith("Normalize"):
            options["normalize"] = True
    bert_config = read_json(folder / "sentence_bert_config.json", missing_ok=True)
    if isinstance(bert_config.get("max_seq_length"), int):
        options["max_seq_length"] = bert_config["max_seq_length"]
    return options


def _inside(folder: Path, relpath: object) -> Path:
    pure = PurePosixPath(str(relpath or ""))
    if pure.is_absolute() or ".." in pure.parts:
        raise RefusedArtifact(f"modules.json points outside the model folder: {relpath!r}")
    return folder / pure


def _chat_template(folder: Path, tokenizer_config: dict[str, Any]) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template: Any = read_json(folder / "chat_template.json", missing_ok=True).get("chat_template")
    if template is None:
        template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _tokenizer(folder: Path) -> dict[str, Any] | None:
    present = [name for name in TOKENIZER_FILES if (folder / name).is_file()]
    return {"kind": "huggingface", "files": present} if present else None


def check_safetensors(path: Path, relpath: str) -> None:
    """Let the safetensors library validate the header and the offsets."""
    try:
        with safe_open(path, framework="numpy") as weights:
            weights.keys()
    except (SafetensorError, OSError) as err:
        raise RefusedArtifact(f"{relpath} is not a valid safetensors file: {err}") from None


def _check_shard_name(folder: Path, shard: object) -> None:
    if not isinstance(shard, str) or "\\" in shard:
        raise UnsupportedFormat(f"{INDEX} names an invalid shard {shard!r}")
    pure = PurePosixPath(shard)
    if pure.is_absolute() or ".." in pure.parts:
        raise RefusedArtifact(f"{INDEX} points outside the model folder: {shard!r}")
    if not (folder / pure).is_file():
        raise UnsupportedFormat(f"{INDEX} names shard {shard!r}, which is missing")


def read_json(path: Path, *, missing_ok: bool = False, kind: type = dict) -> Any:
    """Read a JSON file of the expected top-level type; missing gives an empty one if allowed."""
    if not path.is_file():
        if missing_ok:
            return kind()
        raise UnsupportedFormat(f"{path.name} is missing")
    try:
        data = load_json(path)
    except ValueError as err:
        raise UnsupportedFormat(f"{path.name} cannot be read: {err}") from None
    if not isinstance(data, kind):
        raise UnsupportedFormat(f"{path.name} should hold a JSON {kind.__name__}")
    return data
