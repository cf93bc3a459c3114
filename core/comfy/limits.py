"""What the bot accepts from a ComfyUI server: size caps, capped reads, no redirects, and
the once-per-kind log of malformed input.

A rented GPU belongs to a stranger, so a ComfyUI server is untrusted input:

* **Sizes.** Every answer is read in chunks against the cap for its kind and refused as
  soon as it passes it (or as soon as its Content-Length says it will), so a 300 MiB
  answer costs at most the cap in memory. The caps have a wide margin over what a real
  ComfyUI 0.3.64 sends (shared reference ``comfyui.md``): ``/object_info`` of a stock
  install is 497 KB and grows with custom nodes and model lists, so 64 MiB; other JSON
  (``/history/{id}``, ``/queue`` with its pending prompts, ``/system_stats``) 16 MiB;
  ``/view`` and WebSocket frames carry whole images (previews are 55-80 KB JPEGs,
  SaveImageWebsocket sends full-size PNGs, trace 17), so 64 MiB. They are a constructor
  argument (:class:`ResponseLimits`) of the client and the stream.
* **Redirects.** ComfyUI's API never redirects, so none is followed, neither by HTTP calls
  (``allow_redirects=False``) nor by the WebSocket handshake (aiohttp's ``ws_connect``
  always follows them, so the stream's session refuses them in a trace hook before the
  second request is sent). Otherwise a hostile server could make the bot fetch an
  internal URL and show members what came back.
* **Malformed input** is skipped and logged by :class:`MalformedLog`: once per kind and
  interval, not once per message, so a server sending junk cannot flood the log.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from core.comfy.errors import ComfyResponseTooLarge

MiB = 1024 * 1024
_CHUNK = 256 * 1024


@dataclass(frozen=True, slots=True)
class ResponseLimits:
    """Byte caps per kind of answer (see the module docstring for the sizes' reasons)."""

    json: int = 16 * MiB
    object_info: int = 64 * MiB
    view: int = 64 * MiB
    ws_message: int = 64 * MiB
    # An error answer is only shown as a status and logged; its start is enough.
    error_body: int = 64 * 1024


DEFAULT_LIMITS = ResponseLimits()


async def read_capped(resp: aiohttp.ClientResponse, limit: int, path: str) -> bytes:
    """The body of ``resp``, or :class:`ComfyResponseTooLarge` once it passes ``limit``.

    Chunks are kept in a list (not a growing bytearray, whose reallocation can briefly
    need twice the size), so a refused body costs at most ``limit`` plus one chunk.
    """
    length = resp.content_length
    if length is not None and length > limit:
        resp.close()  # drop the connection rather than drain a huge body
        raise ComfyResponseTooLarge(path, limit)
    chunks: list[bytes] = []
    total = 0
    async for chunk in resp.content.iter_chunked(_CHUNK):
        total += len(chunk)
        if total > limit:
            chunks.clear()
            resp.close()
            raise ComfyResponseTooLarge(path, limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def read_prefix(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """At most the first ``limit`` bytes of an answer we only log (error bodies)."""
    chunks: list[bytes] = []
    total = 0
    async for chunk in resp.content.iter_chunked(_CHUNK):
        chunks.append(chunk[: limit - total])
        total += len(chunks[-1])
        if total >= limit:
            resp.close()
            break
    return b"".join(chunks)


class RedirectRefused(aiohttp.ClientError):
    """Raised from the trace hook below: the WebSocket handshake was redirected."""


async def _refuse_redirect(
    _session: aiohttp.ClientSession, _ctx: Any, params: aiohttp.TraceRequestRedirectParams
) -> None:
    # Called before aiohttp sends the redirected request; raising aborts it.
    params.response.close()
    raise RedirectRefused(f"redirect to another URL refused (HTTP {params.response.status})")


def no_redirects_trace() -> aiohttp.TraceConfig:
    """A trace config that makes every redirect an error, for sessions (like a WebSocket
    handshake's) where ``allow_redirects=False`` cannot be passed."""
    trace = aiohttp.TraceConfig()
    trace.on_request_redirect.append(_refuse_redirect)
    return trace


class MalformedLog:
    """Logs malformed input from one server at most once per kind per ``interval``.

    The first occurrence of a kind is logged at once; later ones are counted and the count
    is reported with the next line of that kind after the interval.
    """

    def __init__(self, logger: logging.Logger, source: str, *, interval: float = 300.0) -> None:
        self._log = logger
        self._source = source
        self._interval = interval
        self._last: dict[str, float] = {}
        self._skipped: dict[str, int] = {}

    def report(self, kind: str, problem: str, *, exc_info: BaseException | None = None) -> None:
        now = time.monotonic()
        last = self._last.get(kind)
        if last is not None and now - last < self._interval:
            self._skipped[kind] = self._skipped.get(kind, 0) + 1
            return
        self._last[kind] = now
        skipped = self._skipped.pop(kind, 0)
        more = f"; {skipped} more since the last report" if skipped else ""
        self._log.warning(
            "ComfyUI %s sent a malformed %s (%s); skipped%s",
            self._source, kind, _clip(problem), more, exc_info=exc_info,
        )


def _clip(text: str, limit: int = 200) -> str:
    """Server-chosen text in one log line: short, and without line breaks."""
    text = text.replace("\n", " ").replace("\r", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"
