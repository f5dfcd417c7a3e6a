"""Recipes read from text or JSON, with every option's range checked."""

from __future__ import annotations

import pytest

from maas.errors import InvalidRequest
from maas.optimize.recipe import Step, parse


def test_a_recipe_string_reads_as_steps_with_their_options():
    steps = parse(
        "prune 0.5 structured -> distil -> share 4 -> quantize int8-dynamic -> export onnx"
    )
    assert steps == [
        Step("prune", {"amount": 0.5, "structure": "structured", "fine_tune_steps": 0}),
        Step("distil", {}),
        Step("share", {"bits": 4}),
        Step("quantize", {"method": "int8-dynamic"}),
        Step("export", {"format": "onnx"}),
    ]
    assert str(steps[0]) == "prune 0.5 structured"
    assert not steps[0].needs_data and steps[1].needs_data
    # A learning option left unset takes the default of the model it runs on.
    assert [steps[1].setting(n) for n in ("steps", "learning_rate", "alpha")] == [300, 1e-3, 0.7]
    assert [steps[1].setting(n, "llm") for n in ("steps", "learning_rate", "alpha")] == [
        100,
        1e-4,
        1.0,
    ]
    assert str(steps[1]) == "distil"


def test_named_options_read_as_numbers_or_text():
    prune, distil = parse(
        "prune 0.5 structured fine_tune_steps=200 learning_rate=0.002 -> "
        "distil width=0.25 steps=50 teacher=big@production"
    )
    assert prune.options == {
        "amount": 0.5,
        "structure": "structured",
        "fine_tune_steps": 200,
        "learning_rate": 0.002,
    }
    assert prune.needs_data
    assert str(prune) == "prune 0.5 structured fine_tune_steps=200 learning_rate=0.002"
    assert distil.options["width"] == 0.25 and distil.options["steps"] == 50
    assert distil.options["teacher"] == "big@production"


def test_a_json_recipe_reads_the_same_and_fills_defaults():
    assert parse([{"step": "prune", "amount": 0.25}]) == [
        Step("prune", {"amount": 0.25, "structure": "unstructured", "fine_tune_steps": 0})
    ]


@pytest.mark.parametrize(
    ("recipe", "says"),
    [
        ("prune", "amount is the fraction"),
        ("prune 0", "above 0 and below 1"),
        ("prune half", "not a number"),
        ("prune 0.5 sideways", "not a number"),
        ("share 9", "bits is from 2 to 8"),
        ("export tflite", "format is onnx or gguf"),
        ("quantize", "method is one of"),
        ("distil now", "cannot read"),
        ("prune 0.5 ->", "empty step"),
        ([{"step": "prune", "amount": 0.5, "ratio": 2}], "unknown option 'ratio'"),
        ([{"amount": 0.5}], "should be an object with a 'step'"),
        ("compress 2", "unknown step"),
        ("prune 0.5 fine_tune_steps=-1", "fine_tune_steps is a whole number"),
        ("prune 0.5 fine_tune_steps=2.5", "fine_tune_steps is a whole number"),
        ("prune 0.5 fine_tune_steps=10 learning_rate=5", "learning_rate is above 0"),
        ("prune 0.5 steps=", "write name=value"),
        ("distil width=0", "width is the student's share"),
        ("distil width=1.5", "width is the student's share"),
        ("distil steps=0", "steps is a whole number"),
        ("distil layers=0", "layers is the student's number"),
        ("distil temperature=0", "temperature is above 0"),
        ("distil alpha=2", "alpha weighs"),
        ([{"step": "distil", "teacher": 3}], "teacher is a model reference"),
        ("distil student=tiny", "unknown option 'student'"),
    ],
)
def test_bad_steps_are_refused_naming_them(recipe, says):
    with pytest.raises(InvalidRequest) as refused:
        parse(recipe)
    assert says in str(refused.value.message) and refused.value.param == "recipe"


def test_int4_takes_a_group_size_the_kernel_takes_and_hides_the_default():
    from maas.optimize import recipe
    from maas.runtime.llm import quantized

    assert recipe.GROUP_SIZES == quantized.GROUP_SIZES  # written twice: recipe imports no torch
    (default,) = parse("quantize int4")
    assert default.options == {"method": "int4", "group_size": 32} and str(default) == (
        "quantize int4"
    )
    (wider,) = parse("quantize int4 group_size=64")
    assert str(wider) == "quantize int4 group_size=64"
    for bad, says in (("quantize int4 group_size=48", "group_size is one of 32, 64, 128, 256"),
                      ("quantize int8 group_size=32", "group_size is int4's")):  # fmt: skip
        with pytest.raises(InvalidRequest, match=says):
            parse(bad)
