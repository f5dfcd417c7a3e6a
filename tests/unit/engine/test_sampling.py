"""Every field of SamplingParams: the sampler on hand-made logits, the detokenizer's stop
strings, and each field's effect on what the engine generates."""

from __future__ import annotations

import copy
import math
from collections import Counter

import pytest
import torch

from maas.engine.detokenizer import Detokenizer
from maas.messages import SamplingParams
from maas.runtime.llm.sampler import SampleRow, _filtered_probs, _penalise, greedy_tokens, sample
from tests.unit.engine.conftest import (
    finish_reason,
    generate_alone,
    greedy,
    run_to_end,
    submit,
    text_of,
    token_ids,
)

PROMPT_TEXT = "paris is the capital of france and berlin"
OTHER_TEXT = "the cat sat on the mat"
# probabilities 0.5, 0.3, 0.15, 0.05 for tokens 0..3
LOGITS = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()


def normalised(values: list[float]) -> list[float]:
    return [v / sum(values) for v in values]


def row(**fields) -> SampleRow:
    history = Counter(fields.pop("history", {}))
    seen = set(fields.pop("seen", ()))
    banned = tuple(fields.pop("banned", ()))
    generator = fields.pop("generator", None)
    return SampleRow(SamplingParams(**fields), generator, history, seen, banned)


@pytest.fixture(scope="module")
def prompt(llama_tokenizer) -> list[int]:
    return llama_tokenizer.encode(PROMPT_TEXT)


@pytest.fixture(scope="module")
def other_prompt(llama_tokenizer) -> list[int]:
    return llama_tokenizer.encode(OTHER_TEXT)


# The sampler on hand-made logits


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"presence_penalty": 0.5}, [1.0, 2.0, -0.5, 0.0, 0.5]),
        ({"frequency_penalty": 0.25}, [1.0, 2.0, -0.75, 0.0, 0.75]),
        ({"presence_penalty": 0.5, "frequency_penalty": 0.25}, [1.0, 2.0, -1.25, 0.0, 0.25]),
        ({"presence_penalty": -1.0}, [1.0, 2.0, 1.0, 0.0, 2.0]),  # negative: encourage
        # divides positive logits and multiplies negative ones, of prompt and output tokens
        ({"repetition_penalty": 2.0}, [1.0, 1.0, 0.0, 0.0, 0.5]),
    ],
)
def test_penalties_lower_the_logits_of_repeated_tokens_by_the_right_amount(fields, expected):
    logits = torch.tensor([1.0, 2.0, 0.0, 0.0, 1.0])
    # token 1 is in the prompt; tokens 2 (3 times) and 4 (once) were generated
    _penalise(logits, row(history={2: 3, 4: 1}, seen={1, 2, 4}, **fields))
    assert logits.tolist() == pytest.approx(expected)


def test_a_strong_enough_penalty_makes_greedy_pick_another_token():
    logits = torch.tensor([[3.0, 2.0, 0.0]])
    assert sample(logits, [row(temperature=0, history={0: 2})])[0].token == 0
    assert sample(logits, [row(temperature=0, history={0: 2}, frequency_penalty=0.6)])[0].token == 1
    assert sample(logits, [row(temperature=0, seen={0}, repetition_penalty=2.0)])[0].token == 1


@pytest.mark.parametrize(
    "fields",
    [
        {"temperature": 0.0},
        {"top_k": 1},
        {"top_p": 1e-6},
        {"min_p": 0.999},
    ],
    ids=["temperature-0", "top_k-1", "top_p-tiny", "min_p-near-1"],
)
def test_settings_that_leave_one_candidate_pick_the_argmax(fields):
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(0)) * 3
    generator = torch.Generator().manual_seed(1)
    picked = sample(logits, [row(generator=generator, **fields) for _ in range(64)])
    assert [p.token for p in picked] == logits.argmax(dim=-1).tolist()


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, [0.5, 0.3, 0.15, 0.05]),
        ({"top_k": 2}, [0.625, 0.375, 0, 0]),
        ({"top_k": 10}, [0.5, 0.3, 0.15, 0.05]),  # more than the vocabulary: no cut
        ({"top_p": 0.7}, [0.625, 0.375, 0, 0]),  # the smallest set reaching 0.7
        ({"top_p": 0.85}, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0]),
        ({"min_p": 0.5}, [0.625, 0.375, 0, 0]),  # at least half the top probability
        ({"min_p": 0.2}, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0]),
        ({"temperature": 2.0}, normalised([math.sqrt(p) for p in (0.5, 0.3, 0.15, 0.05)])),
        ({"temperature": 0.5}, normalised([p * p for p in (0.5, 0.3, 0.15, 0.05)])),
    ],
)
def test_temperature_top_k_top_p_and_min_p_shape_the_distribution(fields, expected):
    # every row of one batch has its own settings: run each case beside a plain row
    params = [SamplingParams(), SamplingParams(**fields)]
    probs = _filtered_probs(LOGITS.repeat(2, 1), params)
    assert probs[0].tolist() == pytest.approx([0.5, 0.3, 0.15, 0.05], abs=1e-6)
    assert probs[1].tolist() == pytest.approx(expected, abs=1e-4)


def test_a_top_k_beyond_the_vocabulary_samples_like_no_top_k():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(0))

    def draw(top_k):
        rows = [row(top_k=top_k, generator=torch.Generator().manual_seed(i)) for i in range(4)]
        return [p.token for p in sample(logits, rows)]

    assert draw(1000) == draw(0)


def test_sampling_follows_the_distribution_and_a_seed_reproduces_it():
    logits = LOGITS[None].repeat(4000, 1)

    def draw(seed, **fields):
        generator = torch.Generator().manual_seed(seed)
        rows = [row(generator=generator, **fields) for _ in range(4000)]
        return [p.token for p in sample(logits, rows)]

    counts = Counter(draw(0))
    assert [counts[t] / 4000 for t in range(4)] == pytest.approx([0.5, 0.3, 0.15, 0.05], abs=0.03)
    assert draw(0) == draw(0) and draw(0) != draw(1)
    assert set(draw(0, top_k=2)) == {0, 1}
    assert set(draw(0, top_p=0.85)) == {0, 1, 2}


def test_banned_tokens_are_never_picked():
    logits = torch.tensor([[5.0, 4.0, 0.0], [5.0, 4.0, 0.0]])
    rows = [row(temperature=0, banned=[0]), row(top_k=1, banned=[0, 1])]
    assert [p.token for p in sample(logits, rows)] == [1, 2]


def test_logprobs_are_of_the_raw_distribution_whatever_the_sampling_settings():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    expected = torch.log_softmax(logits[0], dim=-1)
    settings = {"temperature": 0.3, "top_k": 2, "repetition_penalty": 3.0, "seen": {0}}
    [picked] = sample(logits, [row(logprobs=3, **settings)])
    assert picked.logprob == pytest.approx(float(expected[picked.token]))
    assert [t for t, _ in picked.top] == [0, 1, 2]
    assert [lp for _, lp in picked.top] == pytest.approx(expected[:3].tolist())
    [plain] = sample(logits, [row(temperature=0, logprobs=0)])
    assert (plain.token, plain.top) == (0, ())
    assert plain.logprob == pytest.approx(float(expected[0]))
    [none] = sample(logits, [row(temperature=0)])
    assert (none.logprob, none.top) == (0.0, ())


# The detokenizer


class PieceTokenizer:
    """Token ``i`` reads as ``pieces[i]``."""

    def __init__(self, *pieces: str) -> None:
        self.pieces = pieces

    def decode(self, ids: list[int]) -> str:
        return "".join(self.pieces[i] for i in ids)


def detokenize(
    tokenizer, ids: list[int], stop: tuple[str, ...] = ()
) -> tuple[list[str], Detokenizer]:
    detokenizer = Detokenizer(tokenizer, stop)
    shown = []
    for token in ids:
        shown.append(detokenizer.add(token))
        if detokenizer.stopped:
            break
    return shown, detokenizer


def test_a_stop_string_split_across_tokens_is_never_shown():
    tokenizer = PieceTokenizer("Hel", "lo ", "wor", "ld")
    shown, detokenizer = detokenize(tokenizer, [0, 1, 2, 3], stop=("o w",))
    # "o " is held back after "lo " until "wor" shows it begins the stop string
    assert shown == ["H", "ell", ""]
    assert detokenizer.stopped and detokenizer.text == "Hell"


def test_the_earliest_of_several_stop_strings_wins():
    tokenizer = PieceTokenizer("Hel", "lo ", "wor", "ld")
    shown, detokenizer = detokenize(tokenizer, [0, 1, 2, 3], stop=("world", "lo"))
    assert "".join(shown) == "Hel" and detokenizer.stopped


def test_held_back_text_comes_out_when_the_sequence_ends_otherwise():
    tokenizer = PieceTokenizer("ab", "c", "d")
    shown, detokenizer = detokenize(tokenizer, [0, 1, 2], stop=("xyz",))
    assert shown == ["", "a", "b"] and not detokenizer.stopped
    assert detokenizer.flush() == "cd"
    without_stops, _ = detokenize(tokenizer, [0, 1, 2])
    assert without_stops == ["ab", "c", "d"]  # nothing is held back


def test_a_character_split_across_tokens_is_shown_only_when_whole(llama_tokenizer):
    ids = llama_tokenizer.encode("日本 ok")
    assert len(ids) > 3  # bytes of each character are separate tokens
    shown, detokenizer = detokenize(llama_tokenizer, ids)
    assert all("\ufffd" not in piece for piece in shown)
    assert "".join(shown) + detokenizer.flush() == "日本 ok"


def test_token_bytes_are_the_bytes_of_the_text_even_within_a_character(llama_tokenizer):
    text = "ok 日本 and ünïcödé"
    ids = llama_tokenizer.encode(text)
    pieces = [llama_tokenizer.token_bytes(i) for i in ids]
    assert b"".join(pieces) == text.encode("utf-8")
    assert any("\ufffd" in llama_tokenizer.token_text(i) for i in ids)  # partial characters


def test_the_text_shown_up_to_any_end_is_the_decoded_tokens(llama_tokenizer):
    ids = llama_tokenizer.encode("ok 日本 and ünïcödé")
    for end in range(1, len(ids) + 1):
        shown, detokenizer = detokenize(llama_tokenizer, ids[:end])
        # ending mid-character, the text before it is not lost
        assert "".join(shown) + detokenizer.flush() == llama_tokenizer.decode(ids[:end])


# Each field through the engine


def sampled(max_tokens: int = 24, **fields) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=1.0, ignore_eos=True, **fields)


def test_a_seed_reproduces_a_sampled_output_alone_or_in_a_batch(make_engine, prompt, other_prompt):
    first = token_ids(generate_alone(make_engine, prompt, sampled(seed=11)))
    engine = make_engine()
    noise = submit(engine, "noise", other_prompt, sampled())
    same = submit(engine, "same", prompt, sampled(seed=11))
    other_seed = submit(engine, "other", prompt, sampled(seed=12))
    run_to_end(engine)
    assert token_ids(same) == first
    assert token_ids(other_seed) != first
    assert token_ids(noise) != first


@pytest.mark.parametrize(
    "fields",
    [{"temperature": 0.0}, {"top_k": 1}, {"top_p": 1e-9}, {"min_p": 0.999}],
    ids=["temperature-0", "top_k-1", "top_p-tiny", "min_p-near-1"],
)
def test_settings_that_leave_one_candidate_generate_the_greedy_tokens(make_engine, prompt, fields):
    expected = token_ids(generate_alone(make_engine, prompt, greedy(24)))
    params = SamplingParams(max_tokens=24, ignore_eos=True, **{"temperature": 1.0, **fields})
    assert token_ids(generate_alone(make_engine, prompt, params)) == expected


@pytest.mark.parametrize(
    "fields",
    [{"presence_penalty": 2.0}, {"frequency_penalty": 2.0}, {"repetition_penalty": 2.0}],
)
def test_penalties_stop_greedy_decoding_from_looping(make_engine, other_prompt, fields):
    looping = token_ids(generate_alone(make_engine, other_prompt, greedy(40)))
    penalised = token_ids(generate_alone(make_engine, other_prompt, greedy(40, **fields)))
    assert Counter(looping).most_common(1)[0][1] >= 3  # this tiny model repeats itself
    assert Counter(penalised).most_common(1)[0][1] == 1
    assert penalised[0] == looping[0]  # nothing to penalise yet for the first token


def test_a_stop_token_ends_the_output_without_showing_it(make_engine, prompt, llama_tokenizer):
    reference = generate_alone(make_engine, prompt, greedy(24))
    ids = token_ids(reference)
    stop_id = ids[5]
    end = ids.index(stop_id) + 1
    deltas = generate_alone(make_engine, prompt, greedy(24, stop_token_ids=(stop_id,)))
    assert token_ids(deltas) == ids[:end]
    assert finish_reason(deltas) == "stop"
    assert text_of(deltas) == llama_tokenizer.decode(ids[: end - 1])


def test_a_stop_token_before_min_tokens_is_not_generated(make_engine, prompt):
    ids = token_ids(generate_alone(make_engine, prompt, greedy(24)))
    stop_id = ids[1]
    deltas = generate_alone(
        make_engine, prompt, greedy(24, stop_token_ids=(stop_id,), min_tokens=6)
    )
    output = token_ids(deltas)
    assert len(output) > 6 and stop_id not in output[:6]
    assert output[:1] == ids[:1]
    assert finish_reason(deltas) == ("stop" if output[-1] == stop_id else "length")


def test_end_of_sequence_ends_the_output_unless_ignored_or_before_min_tokens(
    make_engine, prompt, llama_tokenizer
):
    ids = token_ids(generate_alone(make_engine, prompt, greedy(24)))
    eos = ids[4]  # this random model never says <|end|>: pretend it means a token it says
    end = ids.index(eos) + 1
    tokenizer = copy.copy(llama_tokenizer)
    tokenizer.eos_token_ids = {eos}

    def run(**fields):
        params = SamplingParams(max_tokens=24, temperature=0.0, **fields)
        return generate_alone(make_engine, prompt, params, tokenizer=tokenizer)

    stopped = run()
    assert token_ids(stopped) == ids[:end] and finish_reason(stopped) == "stop"
    assert text_of(stopped) == llama_tokenizer.decode(ids[: end - 1])
    assert token_ids(run(ignore_eos=True)) == ids
    held = token_ids(run(min_tokens=end + 2))
    assert len(held) > end + 2 and eos not in held[: end + 2]
    assert held[: end - 1] == ids[: end - 1]


def test_a_stop_string_ends_the_output_and_is_never_shown(make_engine, prompt):
    reference = generate_alone(make_engine, prompt, greedy(40))
    full = text_of(reference)
    pieces = [d.text for d in reference]
    # two characters across a token boundary, late enough to have output before it
    i = next(
        i
        for i in range(5, len(pieces) - 1)
        if pieces[i] and pieces[i + 1] and "\ufffd" not in pieces[i][-1] + pieces[i + 1][0]
    )
    stop = pieces[i][-1] + pieces[i + 1][0]
    deltas = generate_alone(make_engine, prompt, greedy(40, stop=(stop,)))
    assert text_of(deltas) == full[: full.index(stop)]
    assert finish_reason(deltas) == "stop"
    assert len(token_ids(deltas)) <= i + 2
    assert token_ids(deltas) == token_ids(reference)[: len(token_ids(deltas))]


def test_stop_strings_count_only_from_min_tokens_on(make_engine, prompt):
    reference = generate_alone(make_engine, prompt, greedy(24))
    full, pieces = text_of(reference), [d.text for d in reference]
    early = next(i for i in range(1, 6) if pieces[i].strip() and "\ufffd" not in pieces[i])
    stop = pieces[early]  # shown within the first tokens
    deltas = generate_alone(make_engine, prompt, greedy(24, stop=(stop,), min_tokens=12))
    text = text_of(deltas)
    # the early stop string passes, untouched; a later one (if any) ends the output
    assert full.startswith(text) and text.startswith("".join(pieces[:12]))
    assert len(token_ids(deltas)) >= 12
    if finish_reason(deltas) == "stop":
        assert full[len(text) :].startswith(stop)
    else:
        assert text == full


def test_a_temperature_too_small_to_divide_by_is_greedy():
    logits = torch.tensor([[0.1, 3.0, -1.0, 0.5]] * 2)
    rows = [row(temperature=1e-40), row(temperature=1e-6, seed=1)]
    assert [s.token for s in sample(logits, rows)] == [1, 1]


def test_a_ban_on_every_token_is_lifted_rather_than_leave_nothing_to_pick():
    logits = torch.tensor([[0.1, 3.0, -1.0, 0.5], [0.1, 3.0, -1.0, 0.5]])
    rows = [row(temperature=1.0, banned=(0, 1, 2, 3, 3)), row(temperature=0.0, banned=(1,))]
    tokens = [s.token for s in sample(logits, rows)]
    assert tokens[0] in range(4) and tokens[1] == 3


def test_parameters_that_break_sampling_do_not_touch_the_rest_of_the_batch(
    make_engine, prompt, other_prompt, llama_tokenizer
):
    everything = tuple(range(llama_tokenizer.vocab_size))
    odd = [
        SamplingParams(max_tokens=8, temperature=1e-40, ignore_eos=True),
        SamplingParams(max_tokens=8, stop_token_ids=everything, min_tokens=4),
    ]
    engine = make_engine()
    normal = submit(engine, "normal", prompt, greedy(12))
    odd_deltas = [submit(engine, f"odd{i}", other_prompt, p) for i, p in enumerate(odd)]
    run_to_end(engine)
    assert token_ids(normal) == token_ids(generate_alone(make_engine, prompt, greedy(12)))
    assert all(not d.error for deltas in odd_deltas for d in deltas)
    assert len(token_ids(odd_deltas[0])) == 8
    assert len(token_ids(odd_deltas[1])) == 5  # min_tokens, then any token is a stop token


def test_max_tokens_ends_the_output_with_length(make_engine, prompt):
    deltas = generate_alone(make_engine, prompt, greedy(7))
    assert len(token_ids(deltas)) == 7
    assert finish_reason(deltas) == "length"
    assert (deltas[-1].completion_tokens, deltas[-1].prompt_tokens) == (7, len(prompt))
    assert all(d.finish_reason is None for d in deltas[:-1])


def test_the_end_of_the_context_ends_the_output_with_length(make_engine, prompt):
    deltas = generate_alone(make_engine, prompt, greedy(100), max_model_len=32)
    assert len(prompt) + len(token_ids(deltas)) == 32
    assert finish_reason(deltas) == "length"


def test_n_gives_n_sequences_each_with_its_index(make_engine, prompt):
    engine = make_engine()
    deltas = submit(engine, "r", prompt, sampled(10, seed=3), n=3)
    run_to_end(engine)
    outputs = [token_ids(deltas, index) for index in range(3)]
    assert {d.index for d in deltas} == {0, 1, 2}
    assert [finish_reason(deltas, index) for index in range(3)] == ["length"] * 3
    assert all(len(output) == 10 for output in outputs)
    assert len({tuple(output) for output in outputs}) == 3
    assert outputs[0] == token_ids(generate_alone(make_engine, prompt, sampled(10, seed=3)))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_logprobs_are_the_log_softmax_of_the_models_logits(
    make_engine, prompt, monkeypatch, temperature
):
    engine = make_engine()
    seen = []
    forward = engine.runner.forward

    def recording(step):
        seen.append(forward(step))
        return seen[-1]

    monkeypatch.setattr(engine.runner, "forward", recording)
    params = SamplingParams(max_tokens=6, temperature=temperature, seed=0, logprobs=3)
    deltas = submit(engine, "r", prompt, params)
    run_to_end(engine)
    assert len(seen) == len(deltas) == 6
    for logits, delta in zip(seen, deltas, strict=True):
        expected = torch.log_softmax(logits[0], dim=-1)
        [item] = delta.logprobs
        assert item.token == delta.token_ids[0]
        assert item.logprob == pytest.approx(float(expected[item.token]), abs=1e-5)
        values, ids = expected.topk(3)
        assert [t for t, _ in item.top] == ids.tolist()
        assert [lp for _, lp in item.top] == pytest.approx(values.tolist(), abs=1e-5)
        if temperature == 0:
            assert item.token == ids[0]


def test_greedy_tokens_are_argmaxs_the_first_of_equal_logits_included():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 1000, generator=generator)
    logits[1, [7, 300]] = 50.0  # a tie: the first wins
    logits[2, [999, 3]] = 50.0
    logits[3, 11] = float("nan")  # NaN counts as the largest, as in argmax
    tokens = greedy_tokens(logits)
    assert torch.equal(tokens, logits.argmax(dim=-1))
    assert tokens[1:4].tolist() == [7, 3, 11]
