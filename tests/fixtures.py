"""Factories for tiny model files, built in memory: no hub, no real weights."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
from gguf import GGUFWriter
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import save_file

CHAT_TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
WEIGHT_PATTERN = np.arange(16, dtype=np.float32).reshape(4, 4) / 7.0


def make_hf_folder(
    folder: Path,
    *,
    architecture: str = "LlamaForCausalLM",
    model_type: str = "llama",
    chat_template: str | None = CHAT_TEMPLATE,
    config_extra: dict | None = None,
    tokenizer_extra: dict | None = None,
    sharded: bool = False,
) -> Path:
    """A Hugging Face folder with config, safetensors weights and a tokenizer config."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": [architecture],
        "model_type": model_type,
        "hidden_size": 4,
        "max_position_embeddings": 64,
        **(config_extra or {}),
    }
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer = {"model_max_length": 64, **(tokenizer_extra or {})}
    if chat_template:
        tokenizer["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer))
    (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}))
    if sharded:
        save_file({"a": WEIGHT_PATTERN}, str(folder / "model-00001-of-00002.safetensors"))
        save_file({"b": WEIGHT_PATTERN + 1}, str(folder / "model-00002-of-00002.safetensors"))
        index = {
            "weight_map": {
                "a": "model-00001-of-00002.safetensors",
                "b": "model-00002-of-00002.safetensors",
            }
        }
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        save_file({"weight": WEIGHT_PATTERN}, str(folder / "model.safetensors"))
    return folder


def make_gguf(
    path: Path, *, chat_template: str | None = CHAT_TEMPLATE, arch: str = "llama"
) -> Path:
    """A tiny GGUF file with llama metadata, a vocabulary and two tensors."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(str(path), arch)
    writer.add_name("tiny")
    writer.add_context_length(128)
    writer.add_embedding_length(4)
    writer.add_block_count(1)
    writer.add_head_count(1)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["<s>", "</s>", "a", "b"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    if chat_template:
        writer.add_chat_template(chat_template)
    writer.add_tensor("token_embd.weight", WEIGHT_PATTERN)
    writer.add_tensor("output_norm.weight", np.ones(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def make_onnx(path: Path, *, external_location: str | None = None, scale: float = 1.0) -> Path:
    """y = x @ (scale * W) + 1 with x: FP32[batch, 4]; W can live in an external data file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    weight = numpy_helper.from_array((WEIGHT_PATTERN * scale).astype(np.float32), name="W")
    if external_location is not None:
        weight.ClearField("raw_data")
        weight.data_location = TensorProto.EXTERNAL
        for key, value in (("location", external_location), ("offset", "0"), ("length", "64")):
            entry = weight.external_data.add()
            entry.key, entry.value = key, value
    one = numpy_helper.from_array(np.ones(4, dtype=np.float32), name="one")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "one"], ["y"]),
        ],
        "tiny_linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        initializer=[weight, one],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


def make_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    """A .tar.gz from raw members, so tests can build entries no honest tool would."""
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return path


def tar_file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def tar_link(name: str, target: str, *, hard: bool = False) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.LNKTYPE if hard else tarfile.SYMTYPE
    info.linkname = target
    return info, None


def tar_folder(path: Path, folder: Path, arcname: str) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder, arcname=arcname)
    return path


def make_zip(path: Path, members: dict[str, bytes], symlinks: dict[str, str] | None = None) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = 0o120777 << 16
            zf.writestr(info, target)
    return path


def make_zip_bomb(
    path: Path, size: int, *, name: str = "zeros.safetensors", declared: int | None = None
) -> Path:
    """A zip of one entry of ``size`` zeros (a multiple of 1 MiB), about ``size / 1000`` bytes.

    Built without compressing it all: one deflated MiB of zeros, flushed so that the next MiB
    deflates to the same bytes, is repeated. ``declared`` is the size its headers claim
    (default: the truth), for bombs that lie about their size.
    """
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)  # raw deflate, as zip stores it
    zeros = b"\0" * 1024**2
    block = compressor.compress(zeros) + compressor.flush(zlib.Z_FULL_FLUSH)
    data = block * (size // len(zeros)) + compressor.flush()
    crc = 0
    for _ in range(size // len(zeros)):
        crc = zlib.crc32(zeros, crc)
    encoded = name.encode()
    sizes = (crc, len(data), size if declared is None else declared)
    # version 20, no flags, deflate (8), time 0, date 1980-01-01 (33)
    local = struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, 8, 0, 33, *sizes, len(encoded), 0)
    central = struct.pack(
        "<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, 8, 0, 33, *sizes, len(encoded), 0, 0, 0, 0, 0, 0
    )
    directory = central + encoded
    offset = len(local) + len(encoded) + len(data)
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 1, 1, len(directory), offset, 0)
    path.write_bytes(local + encoded + data + directory + end)
    return path


def disk_use(folder: Path) -> int:
    """Bytes in the regular files under ``folder``."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def files_under(folder: Path) -> set[str]:
    """Every path under ``folder`` (files and folders), relative; for 'nothing written' checks."""
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")}


def make_cnn_folder(folder: Path, *, num_classes: int = 3, seed: int = 0) -> Path:
    """A tiny SmallCNN image classifier in maas's architecture format (labels cat/dog/...)."""
    import torch

    from maas.runtime.architectures import build
    from maas.runtime.architectures.folder import save_folder

    torch.manual_seed(seed)
    arguments = {
        "num_classes": num_classes,
        "in_channels": 3,
        "image_size": 16,
        "channels": [4, 8],
        "hidden": 16,
    }
    module = build("small-cnn", arguments)
    labels = ["cat", "dog", "bird", "fish", "frog"][:num_classes]
    preprocessing = {"image_size": [16, 16], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    return save_folder(
        module,
        folder,
        architecture="small-cnn",
        arguments=arguments,
        labels=labels,
        preprocessing=preprocessing,
    )


WORDS = ["the", "cat", "dog", "sat", "on", "mat", "a", "big", "red", "car", "runs", "fast"]


def make_word_tokenizer(path: Path) -> Path:
    """A tokenizer.json: lower-cased words, [CLS] ... [SEP], like a BERT tokenizer."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return path


def make_bert_embedder(folder: Path, *, seed: int = 0) -> Path:
    """A tiny BERT with a sentence-transformers layout (mean pooling, then normalisation)."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=4 + len(WORDS),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(folder, safe_serialization=True)
    make_word_tokenizer(folder / "tokenizer.json")
    (folder / "modules.json").write_text(
        json.dumps(
            [
                {
                    "idx": 0,
                    "name": "0",
                    "path": "",
                    "type": "sentence_transformers.models.Transformer",
                },
                {
                    "idx": 1,
                    "name": "1",
                    "path": "1_Pooling",
                    "type": "sentence_transformers.models.Pooling",
                },
                {
                    "idx": 2,
                    "name": "2",
                    "path": "2_Normalize",
                    "type": "sentence_transformers.models.Normalize",
                },
            ]
        )
    )
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 16, "pooling_mode_mean_tokens": True})
    )
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 32}))
    return folder


def make_png(
    color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (20, 24)
) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def make_broken_onnx(path: Path) -> Path:
    """A model ONNX accepts (unknown custom domains are not checked) but no runtime can run."""
    path.parent.mkdir(parents=True, exist_ok=True)
    graph = helper.make_graph(
        [helper.make_node("NoSuchOp", ["x"], ["y"], domain="com.example")],
        "broken",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)]
    )
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


def make_lstm_folder(folder: Path, *, seed: int = 0) -> Path:
    """A tiny LSTM text classifier (positive/negative) with a word tokenizer."""
    import torch

    from maas.runtime.architectures import build
    from maas.runtime.architectures.folder import save_folder

    torch.manual_seed(seed)
    arguments = {
        "vocab_size": 4 + len(WORDS),
        "num_classes": 2,
        "embedding_dim": 8,
        "hidden_size": 8,
    }
    module = build("lstm-classifier", arguments)
    save_folder(
        module,
        folder,
        architecture="lstm-classifier",
        arguments=arguments,
        labels=["negative", "positive"],
        preprocessing={"max_length": 32},
    )
    make_word_tokenizer(folder / "tokenizer.json")
    return folder


def make_transformer_folder(folder: Path, *, seed: int = 0) -> Path:
    """A tiny transformer-classifier (positive/negative) with a word tokenizer."""
    import torch

    from maas.runtime.architectures import build
    from maas.runtime.architectures.folder import save_folder

    torch.manual_seed(seed)
    arguments = {
        "vocab_size": 4 + len(WORDS),
        "num_classes": 2,
        "d_model": 16,
        "nhead": 2,
        "num_layers": 1,
        "dim_feedforward": 32,
        "max_length": 32,
    }
    save_folder(
        build("transformer-classifier", arguments),
        folder,
        architecture="transformer-classifier",
        arguments=arguments,
        labels=["negative", "positive"],
        preprocessing={"max_length": 32},
    )
    make_word_tokenizer(folder / "tokenizer.json")
    return folder


def make_bert_classifier(folder: Path, *, seed: int = 0) -> Path:
    """A tiny BertForSequenceClassification with labels and a word tokenizer."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=4 + len(WORDS),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        id2label={0: "negative", 1: "neutral", 2: "positive"},
        label2id={"negative": 0, "neutral": 1, "positive": 2},
    )
    BertForSequenceClassification(config).save_pretrained(folder, safe_serialization=True)
    make_word_tokenizer(folder / "tokenizer.json")
    return folder


def make_vit_classifier(folder: Path, *, seed: int = 0) -> Path:
    """A tiny ViTForImageClassification (16x16 images) with its preprocessor config."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=16,
        patch_size=8,
        num_channels=3,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        id2label={0: "red", 1: "green"},
        label2id={"red": 0, "green": 1},
    )
    ViTForImageClassification(config).save_pretrained(folder, safe_serialization=True)
    (folder / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "do_resize": True,
                "size": {"height": 16, "width": 16},
                "do_rescale": True,
                "rescale_factor": 1 / 255,
                "do_normalize": True,
                "image_mean": [0.5, 0.5, 0.5],
                "image_std": [0.5, 0.5, 0.5],
            }
        )
    )
    return folder


LLAMA_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CORPUS = [
    "the cat sat on the mat and the dog ran to the park",
    "paris is the capital of france and berlin is the capital of germany",
    "hello world, how are you today? fine thanks, and you?",
    "numbers like 12345 and words like ünïcödé also appear here",
] * 20


def make_tiny_llama(
    folder: Path, *, seed: int = 0, vocab_target: int = 320, num_layers: int = 2, **config_extra
) -> Path:
    """A random Llama (``num_layers`` layers, hidden 32, grouped-query attention) with a
    byte-level BPE tokenizer, special tokens and a chat template, as a Hugging Face folder."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    trainer = ByteLevelBPETokenizer()
    specials = ["<|end|>", "<|user|>", "<|assistant|>", "<|system|>", "<s>"]
    trainer.train_from_iterator(CORPUS, vocab_size=vocab_target, special_tokens=specials)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=trainer._tokenizer, eos_token="<|end|>", bos_token="<s>"
    )
    tokenizer.chat_template = LLAMA_CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **{"tie_word_embeddings": False, **config_extra},
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # sharper logits than the default init, so argmax ties are rare
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def wide_console(monkeypatch, columns: int = 200) -> None:
    """Rich tables as wide as ``columns``, whatever COLUMNS was when the CLI's consoles were
    made (Rich fixes a console's width from COLUMNS then: a pytest-xdist worker has 80)."""
    from maas.cli import output

    monkeypatch.setenv("COLUMNS", str(columns))
    for console in (output.console, output.err_console):
        monkeypatch.setattr(console, "width", columns)
