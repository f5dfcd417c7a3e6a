from __future__ import annotations

import json

import pytest

from maas.api import strict_json


@pytest.mark.parametrize(
    "body",
    [
        b'{"text": "plain"}',
        b'{"emoji": "\\ud83d\\ude00"}',  # a whole surrogate pair is one character
        '{"emoji": "\U0001f600"}'.encode(),
        b'{"text": "\\\\ud800"}',  # an escaped backslash, then letters: no surrogate
        b"[1.5, NaN, 12345678901234567890123]",
    ],
)
def test_json_text_is_read_as_json_loads_reads_it(body):
    assert json.dumps(strict_json.loads(body)) == json.dumps(json.loads(body))  # NaN != NaN


@pytest.mark.parametrize(
    "body",
    [
        b'{"text": "a\\ud800b"}',
        b'["\\udc00"]',
        b'{"\\ud83d": 1}',  # in a key too
        b'"\\ude00\\ud83d"',  # the halves in the wrong order
        '["\\ud800"]'.encode("utf-16"),  # JSON in UTF-16, which json.loads also reads
    ],
)
def test_half_a_surrogate_pair_is_not_text(body):
    with pytest.raises(json.JSONDecodeError, match="surrogate"):
        strict_json.loads(body)
