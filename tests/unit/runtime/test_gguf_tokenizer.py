"""A GGUF file's tokenizer: converted once, in a child process, into the local cache, then
loaded without torch, giving what ``transformers``' own conversion gives."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGUFWriter
from transformers import AutoTokenizer

from maas.artifacts.keyring import MasterKeyring
from maas.errors import UnsupportedFormat
from maas.registry import open_registry
from maas.runtime.llm import gguf_tokenizer
from maas.runtime.llm.tokenizer import load_tokenizer

TEXTS = ["ab", "ba ab", "a b", ""]

PROBE = """
import sys
from maas.config import Settings
from maas.registry import open_registry
from maas.runtime.llm.tokenizer import load_tokenizer
registry = open_registry(Settings(home=sys.argv[1]))
tokenizer = load_tokenizer(registry.open_version("tiny"))
print([tokenizer.encode(t) for t in ("ab", "ba ab")], sorted(tokenizer.eos_token_ids))
print(sorted(m for m in ("torch",) if m in sys.modules))
"""


TOKENS = ["<s>", "</s>", "a", "b", "ab", "\u0120", "\u0120a", "\u0120b", "\u0120ab"]


def gguf_with_vocabulary(path, tokens=TOKENS, weight=0.0, file_type=None):
    """A GGUF file whose byte-level BPE vocabulary ``transformers`` can convert."""
    writer = GGUFWriter(str(path), "llama")
    if file_type is not None:  # first, as a quantizer may write it; the others have none
        writer.add_file_type(file_type)
    writer.add_context_length(128)
    writer.add_embedding_length(4)
    writer.add_block_count(1)
    writer.add_head_count(1)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types([3, 3] + [1] * (len(tokens) - 2))  # control, then normal
    writer.add_token_merges(["a b", "\u0120 a", "\u0120 b", "\u0120a b"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_tensor("token_embd.weight", np.full((len(tokens), 4), weight, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def tiny(settings, tmp_path, monkeypatch):
    monkeypatch.setenv("MAAS_CACHE_DIR", str(tmp_path / "cache"))
    registry = open_registry(settings)
    registry.import_model(gguf_with_vocabulary(tmp_path / "tiny.gguf"), "tiny")
    yield registry.open_version("tiny")
    registry.close()


def transformers_own(opened):
    path = opened.folder / "tiny.gguf"
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def test_the_converted_tokenizer_is_transformers_own_and_is_kept(tiny, tmp_path, monkeypatch):
    tokenizer = load_tokenizer(tiny)
    own = transformers_own(tiny)
    for text in TEXTS:
        assert tokenizer.encode(text) == own.encode(text, add_special_tokens=True)
    ids = own.encode("ab ba")
    assert tokenizer.decode(ids) == own.decode(ids, skip_special_tokens=True)
    assert tokenizer.eos_token_ids == {1} and tokenizer.vocab_size == len(own)
    kept = list((tmp_path / "cache" / "tokenizers").iterdir())
    assert len(kept) == 1 and (kept[0] / "tokenizer.json").is_file()
    assert kept[0].name.startswith(gguf_tokenizer.vocabulary_key(tiny.folder / "tiny.gguf")[:32])

    def no_child(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(gguf_tokenizer.subprocess, "run", no_child)
    assert load_tokenizer(tiny).encode("ba ab") == tokenizer.encode("ba ab")  # from the cache


def test_a_server_process_loads_it_without_torch(tiny, settings):
    load_tokenizer(tiny)  # converted (the child imports torch), kept in the cache
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(settings.home)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    encoded, loaded = done.stdout.strip().splitlines()
    assert loaded == "[]"
    own = transformers_own(tiny)
    assert encoded == f"{[own.encode(t) for t in ('ab', 'ba ab')]} [1]"


def test_files_that_differ_only_in_their_weights_share_one_conversion(tmp_path, monkeypatch):
    monkeypatch.setenv("MAAS_CACHE_DIR", str(tmp_path / "cache"))
    first = gguf_tokenizer.converted(gguf_with_vocabulary(tmp_path / "a.gguf"))
    runs = []
    real_run = subprocess.run
    monkeypatch.setattr(
        gguf_tokenizer.subprocess, "run", lambda *a, **k: runs.append(a) or real_run(*a, **k)
    )
    # other weights, and a file type written first (the keys in another order)
    other = gguf_with_vocabulary(tmp_path / "b.gguf", weight=1.0, file_type=7)
    assert gguf_tokenizer.converted(other) == first and runs == []
    another = gguf_with_vocabulary(tmp_path / "c.gguf", tokens=[*TOKENS, "ba"])
    assert gguf_tokenizer.converted(another) != first and len(runs) == 1
    assert len(list((tmp_path / "cache" / "tokenizers").iterdir())) == 2


def test_a_file_that_cannot_be_converted_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MAAS_CACHE_DIR", str(tmp_path / "cache"))
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(UnsupportedFormat, match="tokenizer could not be read: GGUF version 0"):
        gguf_tokenizer.converted(broken)
    writer = GGUFWriter(str(broken), "llama")  # a header, but no vocabulary in it
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedFormat, match="tokenizer could not be read"):
        gguf_tokenizer.converted(broken)
    assert list((tmp_path / "cache" / "tokenizers").iterdir()) == []  # nothing half-written


FOLDER_PROBE = """
import sys
from types import SimpleNamespace
from maas.runtime.llm.tokenizer import _folder_tokenizer
tokenizer = _folder_tokenizer(SimpleNamespace(folder=__import__("pathlib").Path(sys.argv[1])))
print([tokenizer.encode(t) for t in ("ab", "ba ab")], "torch" in sys.modules)
"""


def probe_folder(folder) -> str:
    done = subprocess.run(
        [sys.executable, "-c", FOLDER_PROBE, str(folder)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_tokenizer_maas_saved_loads_without_torch_and_others_through_autotokenizer(
    tiny, tmp_path
):
    saved = tmp_path / "saved"
    load_tokenizer(tiny).save(saved)  # as quantized and fine-tuned versions are written
    (saved / "config.json").write_text(json.dumps({"model_type": "llama"}))
    own = transformers_own(tiny)
    assert probe_folder(saved) == f"{[own.encode(t) for t in ('ab', 'ba ab')]} False"
    # a model type whose generic class AutoTokenizer replaces by its own tokenizer
    (saved / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    assert probe_folder(saved).endswith("True")
    # a tokenizer class of its own
    (saved / "config.json").write_text(json.dumps({"model_type": "llama"}))
    config = saved / "tokenizer_config.json"
    named = json.loads(config.read_text())
    config.write_text(json.dumps({**named, "tokenizer_class": "GPT2Tokenizer"}))
    assert probe_folder(saved).endswith("True")


def test_without_a_writable_cache_the_tokenizer_is_converted_in_process(
    tiny, tmp_path, monkeypatch
):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    monkeypatch.setenv("MAAS_CACHE_DIR", str(blocked))
    tokenizer = load_tokenizer(tiny)
    own = transformers_own(tiny)
    assert [tokenizer.encode(t) for t in TEXTS] == [own.encode(t) for t in TEXTS]
    assert blocked.read_text() == ""


def test_an_encrypted_gguf_s_vocabulary_is_never_written_out(settings, tmp_path, monkeypatch):
    monkeypatch.setenv("MAAS_CACHE_DIR", str(tmp_path / "cache"))
    MasterKeyring.create(settings.home / "master.keys")
    sealed = settings.model_copy(update={"encryption_key_file": settings.home / "master.keys"})
    registry = open_registry(sealed)
    registry.import_model(gguf_with_vocabulary(tmp_path / "tiny.gguf"), "tiny")
    opened = registry.open_version("tiny")
    assert opened.manifest.files[0].encrypted
    tokenizer = load_tokenizer(opened)
    registry.close()
    plain = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tiny.gguf")
    assert [tokenizer.encode(t) for t in TEXTS] == [plain.encode(t) for t in TEXTS]
    assert not (tmp_path / "cache").exists()
