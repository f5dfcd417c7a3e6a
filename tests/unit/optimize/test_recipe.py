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
        Step("prune", {"amount": 0.5, "structure": "structured"}),
        Step("distil", {}),
        Step("share", {"bits": 4}),
        Step("quantize", {"method": "int8-dynamic"}),
        Step("export", {"format": "onnx"}),
    ]
    assert str(steps[0]) == "prune 0.5 structured"


def test_a_json_recipe_reads_the_same_and_fills_defaults():
    assert parse([{"step": "prune", "amount": 0.25}]) == [
        Step("prune", {"amount": 0.25, "structure": "unstructured"})
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
    ],
)
def test_bad_steps_are_refused_naming_them(recipe, says):
    with pytest.raises(InvalidRequest) as refused:
        parse(recipe)
    assert says in str(refused.value.message) and refused.value.param == "recipe"
