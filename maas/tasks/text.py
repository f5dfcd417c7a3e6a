"""Texts in: tokenised with the model's own ``tokenizer.json`` (the ``tokenizers`` library)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from maas.errors import InvalidRequest, UnsupportedFormat


class TextEncoder:
    def __init__(self, tokenizer_file: Path, max_length: int) -> None:
        from tokenizers import Tokenizer

        if not tokenizer_file.is_file():
            raise UnsupportedFormat("this model has no tokenizer.json; text input needs one")
        self._tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_length)
        self.max_length = max_length
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, texts: list[str]) -> list[dict[str, np.ndarray]]:
        """One row per text: input_ids, attention_mask, token_type_ids (1-D int64 each)."""
        rows = []
        for encoding in self._tokenizer.encode_batch(texts):
            ids = np.asarray(encoding.ids, dtype=np.int64)
            rows.append(
                {
                    "input_ids": ids,
                    "attention_mask": np.ones_like(ids),
                    "token_type_ids": np.asarray(encoding.type_ids, dtype=np.int64),
                }
            )
        return rows

    def from_ids(self, sequences: list[list[int]]) -> list[dict[str, np.ndarray]]:
        """Rows for token ids given by the caller, checked against the vocabulary."""
        rows = []
        for index, sequence in enumerate(sequences):
            if not sequence:
                raise InvalidRequest(f"input {index} is an empty list of tokens", param="input")
            ids = np.asarray(sequence[: self.max_length], dtype=np.int64)
            if ids.min() < 0 or ids.max() >= self.vocab_size:
                raise InvalidRequest(
                    f"input {index} has a token id outside 0..{self.vocab_size - 1}", param="input"
                )
            rows.append(
                {
                    "input_ids": ids,
                    "attention_mask": np.ones_like(ids),
                    "token_type_ids": np.zeros_like(ids),
                }
            )
        return rows


def text_encoder(deployment) -> TextEncoder:
    """The deployment's tokenizer, made once (``tokenizer.json`` in the version folder)."""
    encoder = deployment.helpers.get("text")
    if encoder is None:
        manifest = deployment.manifest
        options = manifest.task_options
        max_length = (
            options.get("max_seq_length")
            or options.get("preprocessing", {}).get("max_length")
            or manifest.context_length
            or 512
        )
        path = deployment.opened_folder / "tokenizer.json"
        encoder = deployment.helpers["text"] = TextEncoder(path, int(max_length))
    return encoder
