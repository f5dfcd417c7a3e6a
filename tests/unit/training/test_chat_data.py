"""Chat examples for fine-tuning: the loss falls on the assistant's tokens only, and every
prompt is the token sequence serving feeds the model."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from maas.runtime.llm.tokenizer import ChatTokenizer
from maas.training.chat_data import (
    IGNORE,
    TemplateMismatch,
    collate,
    encode_chat,
    encode_chats,
)
from tests.fixtures import LLAMA_CHAT_TEMPLATE, make_tiny_llama


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> ChatTokenizer:
    folder = make_tiny_llama(tmp_path_factory.mktemp("llama"))
    loaded = AutoTokenizer.from_pretrained(folder)
    return ChatTokenizer(loaded, LLAMA_CHAT_TEMPLATE, {loaded.eos_token_id})


def learnt_text(tokenizer: ChatTokenizer, ids: list[int], labels: list[int]) -> list[str]:
    """The learnt stretches, decoded with their special tokens."""
    stretches, current = [], []
    for token, label in zip(ids, labels, strict=True):
        if label != IGNORE:
            assert label == token
            current.append(token)
        elif current:
            stretches.append(current)
            current = []
    if current:
        stretches.append(current)
    return [tokenizer._tokenizer.decode(s) for s in stretches]


def test_the_loss_covers_each_reply_and_its_end_of_turn(tokenizer):
    chat = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "the cat"},
        {"role": "assistant", "content": "sat on the mat"},
        {"role": "user", "content": "and the dog"},
        {"role": "assistant", "content": "ran to the park"},
    ]
    example = encode_chat(chat, tokenizer)
    assert learnt_text(tokenizer, example.ids, example.labels) == [
        "sat on the mat<|end|>",
        "ran to the park<|end|>",
    ]
    # each reply follows exactly the tokens serving would feed for its prompt
    for turn in (2, 4):
        prompt = tokenizer.encode_chat(chat[:turn])
        assert example.ids[: len(prompt)] == prompt
        assert example.labels[len(prompt) - 1] == IGNORE != example.labels[len(prompt)]
    first_prompt = len(tokenizer.encode_chat(chat[:2]))
    assert all(label == IGNORE for label in example.labels[:first_prompt])


def test_a_weight_of_zero_makes_a_reply_context_only(tokenizer):
    chat = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "world", "weight": 0},
        {"role": "user", "content": "how are you"},
        {"role": "assistant", "content": "fine thanks"},
    ]
    example = encode_chat(chat, tokenizer)
    assert learnt_text(tokenizer, example.ids, example.labels) == ["fine thanks<|end|>"]


def test_long_examples_are_cut_and_those_left_with_nothing_to_learn_are_dropped(tokenizer):
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    long = [{"role": "user", "content": "the cat " * 20}, {"role": "assistant", "content": "ok"}]
    data = encode_chats([(1, short), (2, long)], tokenizer, max_length=12)
    assert data.truncated == 1 and len(data.examples) == 1
    assert data.dropped == ["line 2: no assistant token to learn from within its first 12 tokens"]
    assert data.tokens == len(data.examples[0].ids) <= 12


def test_a_template_that_rewrites_earlier_turns_is_refused(tokenizer):
    shifty = ChatTokenizer(
        tokenizer._tokenizer,
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% else %}<|end|>{% endif %}",
        tokenizer.eos_token_ids,
    )
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    with pytest.raises(TemplateMismatch):
        encode_chat(chat, shifty)


def test_batches_are_right_padded_with_shifted_labels(tokenizer):
    chats = [
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello world"}],
        [{"role": "user", "content": "the cat sat"}, {"role": "assistant", "content": "ok"}],
    ]
    examples = [encode_chat(c, tokenizer) for c in chats]
    ids, mask, labels = collate(examples, pad_id=0)
    for row, example in enumerate(examples):
        n = len(example.ids)
        assert ids[row, :n].tolist() == example.ids and mask[row].sum() == n
        assert labels[row, : n - 1].tolist() == example.labels[1:]
        assert (labels[row, n - 1 :] == IGNORE).all() and (ids[row, n:] == 0).all()
