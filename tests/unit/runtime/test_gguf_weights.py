"""GGUF weights are read through the checked header and a memory map, not ``gguf.GGUFReader``:
the state dict must be bit for bit what the GGUFReader path (kept below as the reference) gave."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFEndian, GGUFReader, GGUFWriter
from gguf.quants import dequantize, quantize

from maas.artifacts.keyring import MasterKeyring
from maas.registry import open_registry
from maas.registry.formats.gguf_header import read_header
from maas.runtime.llm import weights
from maas.runtime.llm.config import LlamaConfig
from tests.fixtures import make_gguf

Q = GGMLQuantizationType
HIDDEN, FFN, VOCAB, HEADS, KV_HEADS, HEAD_DIM = 256, 256, 32, 4, 2, 64
"""Rows of 256, so that the k-quants fit."""
TYPES = {
    "token_embd.weight": Q.Q8_0,
    "output.weight": Q.Q6_K,
    "blk.0.attn_q.weight": Q.Q4_0,
    "blk.0.attn_k.weight": Q.Q4_1,
    "blk.0.attn_v.weight": Q.Q5_0,
    "blk.0.attn_output.weight": Q.F16,
    "blk.0.ffn_gate.weight": Q.Q4_K,
    "blk.0.ffn_up.weight": Q.BF16,
    "blk.0.ffn_down.weight": Q.Q5_1,
}
"""The rest (norms, biases) are F32."""


def reader_state(opened) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    """What ``weights._from_gguf`` did on ``gguf.GGUFReader``: the reference."""
    gguf_file = next(e.path for e in opened.manifest.files if e.path.endswith(".gguf"))
    with opened.open_file(gguf_file) as path:
        reader = GGUFReader(path)
        tensors = {t.name: t for t in reader.tensors}
        metadata = opened.manifest.config
        vocab = tensors["token_embd.weight"].shape[-1]
        config = LlamaConfig.from_gguf(metadata, int(vocab), tied="output.weight" not in tensors)
        permute = metadata.get("general.architecture") == "llama"

        def get(name):
            tensor = tensors.get(weights._GGUF_NAMES[name[0]].format(*name[1:]))
            if tensor is None:
                return None
            array = dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
            if permute and name[0] in ("q", "k"):
                heads = config.num_heads if name[0] == "q" else config.num_kv_heads
                array = weights._unpermute(array, heads)
            return torch.from_numpy(np.array(array, dtype=np.float32, order="C"))

        return config, weights._fuse(config, get, range(config.num_layers))


def make_llama_gguf(path: Path, arch: str, *, tied: bool = False) -> Path:
    """One random block of ``arch`` with a different tensor type nearly everywhere."""
    rng = np.random.default_rng(0)
    writer = GGUFWriter(str(path), arch)
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_block_count(1)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-6)
    shapes = {  # numpy order: rows, then the row
        "token_embd.weight": (VOCAB, HIDDEN),
        "output_norm.weight": (HIDDEN,),
        "blk.0.attn_norm.weight": (HIDDEN,),
        "blk.0.attn_q.weight": (HEADS * HEAD_DIM, HIDDEN),
        "blk.0.attn_k.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
        "blk.0.attn_v.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
        "blk.0.attn_output.weight": (HIDDEN, HEADS * HEAD_DIM),
        "blk.0.ffn_norm.weight": (HIDDEN,),
        "blk.0.ffn_gate.weight": (FFN, HIDDEN),
        "blk.0.ffn_up.weight": (FFN, HIDDEN),
        "blk.0.ffn_down.weight": (HIDDEN, FFN),
    }
    if not tied:
        shapes["output.weight"] = (VOCAB, HIDDEN)
    if arch == "qwen2":
        for part, rows in (("q", HEADS), ("k", KV_HEADS), ("v", KV_HEADS)):
            shapes[f"blk.0.attn_{part}.bias"] = (rows * HEAD_DIM,)
    if arch == "qwen3":
        shapes["blk.0.attn_q_norm.weight"] = shapes["blk.0.attn_k_norm.weight"] = (HEAD_DIM,)
    for name, shape in shapes.items():
        add_tensor(writer, rng, name, shape, TYPES.get(name, Q.F32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def add_tensor(writer, rng, name: str, shape: tuple[int, ...], ggml_type: Q) -> None:
    values = rng.standard_normal(shape, dtype=np.float32) / 8
    if ggml_type in (Q.Q4_K, Q.Q6_K):  # gguf-py cannot quantise these: random blocks
        block_size, type_size = GGML_QUANT_SIZES[ggml_type]
        row_bytes = shape[-1] // block_size * type_size
        # no byte of 0x7C or more, so that every float16 scale in the blocks is finite
        raw = rng.integers(0, 0x7C, (*shape[:-1], row_bytes), dtype=np.uint8)
        writer.add_tensor(name, raw, raw_dtype=ggml_type)
    elif ggml_type == Q.F32:
        writer.add_tensor(name, values)
    elif ggml_type == Q.F16:
        writer.add_tensor(name, values.astype(np.float16))
    else:
        writer.add_tensor(name, quantize(values, ggml_type), raw_dtype=ggml_type)


def assert_same_bits(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    """Equal bit for bit, not only as numbers (-0.0 == 0.0)."""
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        assert (tensor.dtype, tensor.shape) == (theirs[name].dtype, theirs[name].shape), name
        assert torch.equal(tensor.view(torch.int32), theirs[name].view(torch.int32)), name


@pytest.mark.parametrize(
    ("arch", "tied", "sealed"),
    [("llama", False, False), ("llama", True, False), ("qwen2", False, False),
     ("qwen3", True, False), ("llama", False, True)],
)  # fmt: skip
def test_state_dict_is_what_gguf_reader_gave(settings, tmp_path, arch, tied, sealed):
    if sealed:  # the weights are decrypted into a memory file, mapped from /proc/self/fd
        MasterKeyring.create(settings.home / "master.keys")
        settings = settings.model_copy(
            update={"encryption_key_file": settings.home / "master.keys"}
        )
    registry = open_registry(settings)
    try:
        registry.import_model(make_llama_gguf(tmp_path / "tiny.gguf", arch, tied=tied), "tiny")
        opened = registry.open_version("tiny")
        assert bool(opened.data_keys) == sealed
        config, state = weights.read_state(opened)
        reference_config, reference = reader_state(opened)
    finally:
        registry.close()
    assert config == reference_config
    assert config.tie_word_embeddings == tied and config.vocab_size == VOCAB
    assert_same_bits(state, reference)


def big_endian_gguf(path: Path) -> Path:
    writer = GGUFWriter(str(path), "llama", endianess=GGUFEndian.BIG)
    writer.add_tensor("w", np.linspace(-1, 1, 64, dtype=np.float32).reshape(2, 32))
    writer.add_tensor("h", np.linspace(-1, 1, 64, dtype=np.float16).reshape(2, 32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("kind", ["make_gguf", "no-template", "llama", "big-endian"])
def test_each_tensor_dequantises_to_what_gguf_reader_gave(tmp_path, kind):
    path = tmp_path / "model.gguf"
    if kind == "make_gguf":
        make_gguf(path)
    elif kind == "no-template":
        make_gguf(path, chat_template=None, arch="qwen2")
    elif kind == "llama":
        make_llama_gguf(path, "llama")
    else:
        big_endian_gguf(path)
    header = read_header(path)
    data = np.memmap(path, mode="r")
    reader = GGUFReader(path)
    assert [t.name for t in header.tensors] == [t.name for t in reader.tensors]
    for tensor, theirs in zip(header.tensors, reader.tensors, strict=True):
        ours = dequantize(weights.tensor_bytes(data, header.data_offset, tensor), tensor.ggml_type)
        expected = dequantize(theirs.data, theirs.tensor_type)
        assert (ours.dtype, ours.shape) == (expected.dtype, expected.shape), tensor.name
        assert ours.tobytes() == expected.tobytes(), tensor.name
