"""Tokenizer and chat template of a model, from its Hugging Face files or its GGUF metadata.

Both go through ``transformers``' fast tokenizers (the GGUF vocabulary is converted the way
``AutoTokenizer.from_pretrained(..., gguf_file=...)`` does it, once per file: see
gguf_tokenizer.py), so special tokens and the chat template behave as they do in
``transformers``.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from maas.errors import InvalidRequest, UnsupportedFormat
from maas.registry.records import OpenedVersion
from maas.runtime.llm.trial_prompts import PROBE, QUESTION

log = logging.getLogger(__name__)


class ChatTokenizer:
    def __init__(self, tokenizer: Any, chat_template: str | None, eos_token_ids: set[int]) -> None:
        self._tokenizer = tokenizer
        self.chat_template = chat_template
        self.eos_token_ids = eos_token_ids
        self.vocab_size = len(tokenizer)

    def encode(self, text: str) -> list[int]:
        """Token ids of a plain prompt, with the BOS token when the model expects one."""
        return list(self._tokenizer.encode(text, add_special_tokens=True))

    def render_chat(
        self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True
    ) -> str:
        """The chat as the model's template writes it, by default ready for the assistant's
        reply (without: a finished conversation, as fine-tuning learns from)."""
        if not self.chat_template:
            raise InvalidRequest(
                "this model has no chat template; use /v1/completions", param="model"
            )
        try:
            return self._tokenizer.apply_chat_template(
                messages,
                chat_template=self.chat_template,
                add_generation_prompt=add_generation_prompt,
                tokenize=False,
            )
        except Exception as err:  # jinja errors from the model's template, e.g. raise_exception
            raise InvalidRequest(f"the model's chat template refused the messages: {err}") from None

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        return self.encode_rendered(self.render_chat(messages))

    def encode_rendered(self, text: str) -> list[int]:
        """Token ids of text the chat template wrote: it writes BOS itself where the model
        wants one, so none is added."""
        return list(self._tokenizer.encode(text, add_special_tokens=False))

    @property
    def pad_token_id(self) -> int:
        """The id padding takes (masked out wherever it is used): the tokenizer's pad token,
        else an end-of-sequence token."""
        pad = self._tokenizer.pad_token_id
        return pad if pad is not None else min(self.eos_token_ids)

    def save(self, folder) -> None:
        """The tokenizer's Hugging Face files (a GGUF vocabulary converted) into ``folder``,
        with the chat template (chat_template.jinja) and the end-of-sequence ids
        (generation_config.json, merged into one already there), so that a model saved
        beside them generates as this one does."""
        from pathlib import Path

        folder = Path(folder)
        self._tokenizer.save_pretrained(folder)
        if self.chat_template:
            (folder / "chat_template.jinja").write_text(self.chat_template)
        generation = folder / "generation_config.json"
        settings = json.loads(generation.read_text()) if generation.exists() else {}
        settings["eos_token_id"] = sorted(self.eos_token_ids)
        generation.write_text(json.dumps(settings, indent=2))

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def token_text(self, token_id: int) -> str:
        """What one token reads as on its own (for logprobs)."""
        return self._tokenizer.decode([token_id])

    def token_bytes(self, token_id: int) -> bytes:
        """The token's own bytes (OpenAI's logprobs ``bytes``): part of a character where a
        character spans tokens, which its text (U+FFFD) cannot tell."""
        piece = self._tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(piece, str):
            if self._byte_level and all(c in _byte_of() for c in piece):
                return bytes(_byte_of()[c] for c in piece)
            if match := _BYTE_FALLBACK.fullmatch(piece):  # SentencePiece's <0xE6>
                return bytes([int(match.group(1), 16)])
        return self.token_text(token_id).encode("utf-8")

    @functools.cached_property
    def _byte_level(self) -> bool:
        """Whether tokens are GPT-2's byte-level pieces (each byte spelled as one character)."""
        backend = getattr(self._tokenizer, "backend_tokenizer", None)
        return type(getattr(backend, "decoder", None)).__name__ == "ByteLevel"

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return self._tokenizer.convert_ids_to_tokens(ids)

    def for_engine(self) -> EngineTokenizer:
        """What the engine needs of this tokenizer (see ``EngineTokenizer``)."""
        try:
            question = self.encode_chat(QUESTION)
        except InvalidRequest:  # no chat template, or one that refuses it: the question alone
            question = self.encode(QUESTION[0]["content"])
        return EngineTokenizer(
            _plain_decoder(self._tokenizer),
            frozenset(self.eos_token_ids),
            tuple(self.encode(PROBE)),
            tuple(question),
        )


@dataclass(frozen=True)
class EngineTokenizer:
    """What the engine needs of a model's tokenizer: ids to text, the end-of-sequence ids, and
    the prompts ``MAAS_LLM_DTYPE=auto`` checks candidates on (trial_prompts.py), already
    encoded, since the question goes through the chat template. Decoding goes through the
    ``tokenizers`` library's own tokenizer wherever ``transformers`` adds nothing to its
    decoding (``_plain_decoder``), so the engine process that unpickles this imports
    neither ``transformers`` nor its tokenizer class: for the demo, 35 MiB of RSS where the
    whole ``ChatTokenizer`` took 68."""

    decoder: Any
    """A ``tokenizers.Tokenizer``, or the ``transformers`` tokenizer where its decoding
    differs from that."""
    eos_token_ids: frozenset[int]
    probe_ids: tuple[int, ...]
    question_ids: tuple[int, ...]

    def decode(self, ids: list[int]) -> str:
        """As ``ChatTokenizer.decode``: special tokens left out."""
        return self.decoder.decode(ids, skip_special_tokens=True)


def _plain_decoder(tokenizer: Any) -> Any:
    """``tokenizer``'s ``tokenizers.Tokenizer`` where ``tokenizer.decode`` is that
    tokenizer's decode and nothing more: a fast tokenizer whose class decodes as
    ``transformers``' base class does, without cleaning up spaces (which that does after
    decoding); else ``tokenizer`` itself."""
    from transformers import PreTrainedTokenizerFast

    backend = getattr(tokenizer, "backend_tokenizer", None)
    plain = (
        backend is not None
        and not getattr(tokenizer, "clean_up_tokenization_spaces", True)
        and type(tokenizer).decode is PreTrainedTokenizerFast.decode
        and type(tokenizer)._decode is PreTrainedTokenizerFast._decode
    )
    return backend if plain else tokenizer


def load_tokenizer(opened: OpenedVersion) -> ChatTokenizer:
    manifest = opened.manifest
    if manifest.format == "gguf":
        tokenizer = _gguf_tokenizer(opened)
        eos = {manifest.tokenizer.get("eos_token_id")} if manifest.tokenizer else set()
    else:
        tokenizer = _folder_tokenizer(opened)
        eos = _eos_ids(opened)
    if tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    eos.discard(None)
    if not eos:
        raise UnsupportedFormat("the tokenizer names no end-of-sequence token")
    return ChatTokenizer(tokenizer, manifest.chat_template, set(eos))


GENERIC_CLASSES = {"TokenizersBackend", "PreTrainedTokenizerFast"}
"""Tokenizer classes that are a ``tokenizer.json`` and nothing more, as a GGUF vocabulary is
saved: loaded without ``AutoTokenizer``, which reads the model's config (and so imports
torch). Any other class may add rules of its own, so ``AutoTokenizer`` loads it."""

PLAIN_MODEL_TYPES = {"llama", "mistral"}
"""Model types whose folders ``AutoTokenizer`` loads as the class they name. For some others
(qwen2, phi3...) it replaces a generic class named on the Hub by the model's own tokenizer."""


def _folder_tokenizer(opened: OpenedVersion) -> Any:
    folder = opened.folder
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        model_type = None
    if model_type in PLAIN_MODEL_TYPES and _generic(folder):
        return _fast(folder)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)


def _generic(folder: Path) -> bool:
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False
    named = config.get("tokenizer_class") if isinstance(config, dict) else None
    return named in GENERIC_CLASSES and (folder / "tokenizer.json").is_file()


def _fast(folder: Path) -> Any:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(folder, local_files_only=True)


def _gguf_tokenizer(opened: OpenedVersion) -> Any:
    """The GGUF vocabulary as ``transformers`` converts it: from the local cache (converted
    once, in a child process: see gguf_tokenizer.py), or converted here where the cache
    cannot be used: for an encrypted file, whose vocabulary is never written out in the
    clear, or a cache folder that cannot be written."""
    entry = next(e for e in opened.manifest.files if e.path.endswith(".gguf"))
    if not entry.encrypted:
        from maas.runtime.llm.gguf_tokenizer import converted

        try:
            folder = converted(opened.folder / entry.path)
        except (OSError, RuntimeError, subprocess.TimeoutExpired) as err:
            log.warning("GGUF tokenizer not cached (%s): converting it in this process", err)
        else:
            if _generic(folder):
                return _fast(folder)
            from transformers import AutoTokenizer  # a class of its own, as converted

            return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    from transformers import AutoTokenizer

    with opened.open_file(entry.path) as path:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _eos_ids(opened: OpenedVersion) -> set[int]:
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        if any(entry.path == name for entry in opened.manifest.files):
            value = json.loads(opened.read_bytes(name)).get("eos_token_id")
            ids.update(value if isinstance(value, list) else [value] if value is not None else [])
    return ids


@functools.cache
def _byte_of() -> dict[str, int]:
    """GPT-2's byte-to-character table, inverted."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {character: byte for byte, character in bytes_to_unicode().items()}


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")
