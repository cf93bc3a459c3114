"""JSON decoding for the hot paths (ComfyUI's event frames): orjson where it accepts the
text, the standard library for what it refuses, so every frame decodes as it did before.

orjson is several times faster on ComfyUI's per-step messages (bench.relay --scale
decodes 100,000 of them in a round). It refuses some of what ``json.loads`` accepts
(``NaN``, ``Infinity``, lone surrogates, nesting past 1,024): those go the slow way. One
difference stays: an integer beyond 64 bits comes back as a float. No decoder of ours
takes a number that large (core.comfy.events refuses any beyond 2**63 either way).
"""

from __future__ import annotations

import json
from typing import Any

import orjson


def loads(text: str | bytes) -> Any:
    """Like :func:`json.loads`, with its results and its errors (ValueError,
    RecursionError)."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)
