"""core.fastjson decodes what json.loads decodes, the same way, and fails the same way."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core import fastjson
from core.comfy.errors import ComfyMalformed
from core.comfy.events import decode_message

# What orjson refuses and the standard library takes: these go the slow way.
REFUSED_BY_ORJSON = [
    '{"type": "progress", "data": {"value": NaN, "max": Infinity}}',
    '"\\ud800"',
]


@pytest.mark.parametrize("text", REFUSED_BY_ORJSON)
def test_what_orjson_refuses_decodes_as_the_standard_library_does(text: str) -> None:
    got, want = fastjson.loads(text), json.loads(text)
    assert json.dumps(got) == json.dumps(want)


def test_an_integer_beyond_64_bits_is_refused_by_the_event_decoders_either_way() -> None:
    # The one result that differs: orjson gives a float. The decoders refuse both.
    text = '{"type": "progress", "data": {"value": 123456789012345678901234567890, "max": 3}}'
    assert isinstance(fastjson.loads(text)["data"]["value"], float)
    for message in (fastjson.loads(text), json.loads(text)):
        with pytest.raises(ComfyMalformed):
            decode_message(message)


def test_nan_survives_the_fallback() -> None:
    assert math.isnan(fastjson.loads('{"v": NaN}')["v"])


@pytest.mark.parametrize("text", ["", "{", '{"a": }', "[1, 2", "nope"])
def test_junk_raises_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        fastjson.loads(text)


def test_nesting_past_both_limits_raises_recursion_error() -> None:
    with pytest.raises(RecursionError):
        fastjson.loads("[" * 100_000 + "]" * 100_000)


@given(st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
))
def test_same_value_as_json_loads(value: object) -> None:
    text = json.dumps(value)
    assert fastjson.loads(text) == json.loads(text)
    assert fastjson.loads(text.encode()) == json.loads(text.encode())
