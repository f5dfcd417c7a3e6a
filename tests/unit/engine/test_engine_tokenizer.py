"""What the engine process gets of a model's tokenizer (``EngineTokenizer``): it decodes as the
server's ``ChatTokenizer`` does, carries the dtype trial's prompts as ids, and unpickles in a
Python that never imports ``transformers``."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

from maas.runtime.llm.tokenizer import ChatTokenizer, load_tokenizer
from maas.runtime.llm.trial_prompts import PROBE, QUESTION

UNPICKLE = """
import pickle, sys
tokenizer = pickle.load(open(sys.argv[1], "rb"))
ids = [int(i) for i in sys.argv[2].split(",")]
print(repr(tokenizer.decode(ids)))
print(sorted(tokenizer.eos_token_ids), "transformers" in sys.modules)
"""


def sample_ids(tokenizer: ChatTokenizer) -> list[list[int]]:
    """A chat (special tokens and all), unicode, and every token alone."""
    chat = tokenizer.encode_chat([{"role": "user", "content": "ünïcödé words like 12345"}])
    specials = sorted(tokenizer.eos_token_ids) + tokenizer.encode("the cat")
    return [chat, specials, *([i] for i in range(tokenizer.vocab_size))]


def test_it_decodes_as_the_chat_tokenizer_through_the_tokenizers_library_alone(
    llama_tokenizer, tmp_path
):
    engine = llama_tokenizer.for_engine()
    assert type(engine.decoder).__module__.startswith("tokenizers")
    for ids in sample_ids(llama_tokenizer):
        assert engine.decode(ids) == llama_tokenizer.decode(ids)
    assert engine.eos_token_ids == llama_tokenizer.eos_token_ids
    assert list(engine.probe_ids) == llama_tokenizer.encode(PROBE)
    assert list(engine.question_ids) == llama_tokenizer.encode_chat(QUESTION)

    path = tmp_path / "engine-tokenizer.pkl"
    path.write_bytes(pickle.dumps(engine))
    chat = sample_ids(llama_tokenizer)[0]
    done = subprocess.run(
        [sys.executable, "-c", UNPICKLE, str(path), ",".join(map(str, chat))],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    text, rest = done.stdout.strip().splitlines()
    assert text == repr(llama_tokenizer.decode(chat))
    assert rest == f"{sorted(llama_tokenizer.eos_token_ids)} False"


def test_a_tokenizer_whose_decoding_adds_to_the_library_s_keeps_its_own(llama_version, tmp_path):
    """``transformers`` cleans up spaces after decoding when a tokenizer asks for it: the
    engine then decodes through the ``transformers`` tokenizer, as the server does."""
    folder = tmp_path / "cleaning"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        (folder / name).write_bytes((llama_version.folder / name).read_bytes())
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(
        json.dumps({**config, "clean_up_tokenization_spaces": True})
    )
    from transformers import PreTrainedTokenizerFast

    cleaning = ChatTokenizer(PreTrainedTokenizerFast.from_pretrained(folder), None, {0})
    engine = cleaning.for_engine()
    assert engine.decoder is cleaning._tokenizer
    for ids in sample_ids(load_tokenizer(llama_version))[:2]:
        assert engine.decode(ids) == cleaning.decode(ids)
    # without a chat template, the trial's question is its text alone
    assert list(engine.question_ids) == cleaning.encode(QUESTION[0]["content"])
