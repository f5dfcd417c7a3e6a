"""JSON request bodies must be text: ``loads`` is ``json.loads`` that also refuses a string
holding half of a UTF-16 surrogate pair.

JSON lets a string escape one half alone (``"\\ud800"``); clients that cut a string in the
middle of an emoji send it. Python keeps it as a lone surrogate, which no tokenizer, file
name or UTF-8 answer can encode, so it would fail deep inside a route as a 500. JSON bodies go
through here instead (``hardening.StrictJSONRoute``, the v2 codec; ``:predict`` parses with
pydantic, which refuses it too) and it is a 400.
"""

from __future__ import annotations

import json
import re
from typing import Any

SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def loads(body: bytes) -> Any:
    """The JSON document in ``body``; ``json.JSONDecodeError`` if it is not JSON text."""
    doc = json.loads(body)
    # In UTF-8 only an escape makes a surrogate (bytes that encode one are not UTF-8), and the
    # parser joins pairs: so look for one left alone only when there are such escapes.
    utf8 = json.detect_encoding(body) == "utf-8"
    escape = SURROGATE_ESCAPE.search(body) if utf8 else None
    if escape or not utf8:
        try:
            json.dumps(doc, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            message = "a string holds half of a surrogate pair (\\ud800-\\udfff), not text"
            where = escape.start() if escape else 0  # the first escape: it or one before it
            raise json.JSONDecodeError(message, body.decode("utf-8", "replace"), where) from None
    return doc
