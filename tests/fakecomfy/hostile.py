"""Hostile modes for FakeComfy: what a stranger's rented server can send instead of
ComfyUI's answers.

None of this is ComfyUI behaviour. A Vast host controls the ComfyUI the bot talks to, so
each mode models one attack that was reproduced against the bot (issue 12, "Untrusted
servers"): junk WebSocket frames, junk rows and definitions, redirects to internal URLs,
and answers far larger than any real one. ``FakeComfy.hostile`` holds one
:class:`HostileModes`; its middleware asks :meth:`HostileModes.answer` first.
"""

from __future__ import annotations

import contextlib
import json
import struct
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

MiB = 1024 * 1024

# Text frames a hostile server can send: every message type the bot decodes, with wrong
# shapes (the first one is the message that used to kill the event task for good), plus
# frames that are not JSON objects at all. Progress values as strings raised TypeError
# in the progress display.
JUNK_TEXT_FRAMES: tuple[str, ...] = (
    json.dumps({"type": "status", "data": {"status": "junk"}}),
    json.dumps({"type": "status", "data": {"status": {"exec_info": {"queue_remaining": "x"}}}}),
    json.dumps({"type": "status", "data": {"status": {"exec_info": []}}}),
    json.dumps({"type": "status", "data": "junk"}),
    json.dumps({"type": "feature_flags", "data": ["junk"]}),
    json.dumps({"type": "execution_start", "data": {"prompt_id": {"a": 1}}}),
    json.dumps({"type": "execution_start", "data": {}}),
    json.dumps({"type": "execution_cached", "data": {"prompt_id": "p", "nodes": "abc"}}),
    json.dumps({"type": "execution_cached", "data": {"prompt_id": "p", "nodes": [{"x": 1}]}}),
    json.dumps({"type": "executing", "data": {"node": ["1"], "prompt_id": "p"}}),
    json.dumps({"type": "executing", "data": {"node": "1", "prompt_id": 3.5}}),
    json.dumps({"type": "progress", "data": {"value": "5", "max": "20", "prompt_id": "p"}}),
    json.dumps({"type": "progress", "data": {"value": None, "max": [], "node": "3"}}),
    json.dumps({"type": "progress_state", "data": {"prompt_id": "p", "nodes": "junk"}}),
    json.dumps({"type": "progress_state", "data": {"prompt_id": "p", "nodes": {"3": "junk"}}}),
    json.dumps({"type": "progress_state",
                "data": {"prompt_id": "p", "nodes": {"3": {"value": "1", "max": 2}}}}),
    json.dumps({"type": "executed", "data": {"prompt_id": "p", "node": "9", "output": "x"}}),
    json.dumps({"type": "executed", "data": {"prompt_id": "p", "node": None, "output": {}}}),
    json.dumps({"type": "executed",
                "data": {"prompt_id": "p", "node": "9", "output": {"images": "x"}}}),
    json.dumps({"type": "executed", "data": {"prompt_id": "p", "node": "9",
                                             "output": {"images": [1, {"filename": []}]}}}),
    json.dumps({"type": "execution_success", "data": {"prompt_id": ["p"]}}),
    json.dumps({"type": "execution_error", "data": {"prompt_id": "p", "exception_message": {},
                                                    "traceback": "x", "executed": 5}}),
    json.dumps({"type": "execution_interrupted", "data": {"prompt_id": "p", "executed": {}}}),
    json.dumps({"type": "execution_interrupted", "data": None}),
    json.dumps({"type": 5, "data": {}}),
    json.dumps({"data": {}}),
    json.dumps(["status", {}]),
    json.dumps("status"),
    json.dumps(None),
    "{not json",
    "",
    "[" * 5000 + "]" * 5000,  # deeper than json's recursion limit
    '{"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 1e400}}}}',
)


def _meta(blob: bytes) -> bytes:
    return struct.pack(">II", 4, len(blob)) + blob


# Binary frames: too short, unknown types, unknown image formats, metadata lengths past
# the end, metadata that is not JSON or not an object, and the type 2 that ComfyUI keeps
# internal (comfyui.md, "Binary frames").
JUNK_BINARY_FRAMES: tuple[bytes, ...] = (
    b"",
    b"\x00\x00\x00\x01",
    struct.pack(">II", 99, 0) + b"junk",
    struct.pack(">II", 2, 1) + b"raw",
    struct.pack(">II", 1, 7) + b"\x89PNG",
    struct.pack(">II", 4, 2**32 - 1) + b"{}",
    struct.pack(">II", 4, 5) + b"nojsonxx",
    struct.pack(">II", 4, 2) + b"[]",
    _meta(b'{"image_type": "text/html"}') + b"<html>",
    _meta(b'{"prompt_id": [], "image_type": "image/png"}') + b"\x89PNG",
    struct.pack(">II", 3, 1000) + b"abc",
)


@dataclass
class HostileModes:
    """What the fake answers instead of ComfyUI, by path prefix (first match wins)."""

    # Answer with a redirect to another URL: models a server pointing the bot at an
    # internal address (a metadata service, an admin port) to read it out through the bot.
    redirects: dict[str, tuple[int, str]] = field(default_factory=dict)
    # Answer with this many bytes, streamed in 1 MiB chunks (never held in memory):
    # models a server exhausting the bot's memory. ``declared`` sends Content-Length.
    huge: dict[str, tuple[int, bool]] = field(default_factory=dict)
    # Answer with this JSON: models wrong shapes in /queue, /history, /object_info, ...
    junk_json: dict[str, Any] = field(default_factory=dict)
    huge_sent: int = 0  # bytes of huge answers actually written (the client stopped early)
    # Save this many images per SaveImage node whatever the batch: models a server that
    # announces a flood of outputs for the bot to fetch.
    output_count: int | None = None

    def redirect(self, path: str, location: str, status: int = 302) -> None:
        self.redirects[path] = (status, location)

    def huge_answer(self, path: str, size: int, *, declared: bool = False) -> None:
        self.huge[path] = (size, declared)

    def junk(self, path: str, body: Any) -> None:
        self.junk_json[path] = body

    async def answer(self, request: web.Request) -> web.StreamResponse | None:
        path = request.path
        for prefix, (status, location) in self.redirects.items():
            if path.startswith(prefix):
                return web.Response(status=status, headers={"Location": location})
        for prefix, (size, declared) in self.huge.items():
            if path.startswith(prefix):
                return await self._stream(request, size, declared)
        for prefix, body in self.junk_json.items():
            if path.startswith(prefix):
                return web.json_response(body)
        return None

    async def _stream(self, request: web.Request, size: int, declared: bool) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "image/png"})
        if declared:
            response.content_length = size
        await response.prepare(request)
        chunk = b"\x89PNG" + b"\0" * (MiB - 4)
        left = size
        # The client hangs up once it has seen enough; that ends the stream.
        with contextlib.suppress(ConnectionError, RuntimeError):
            while left > 0:
                part = chunk if left >= MiB else chunk[:left]
                await response.write(part)
                self.huge_sent += len(part)
                left -= len(part)
            await response.write_eof()
        return response


async def send_junk(sockets: list[web.WebSocketResponse]) -> None:
    """Every junk frame above, to each socket (text and binary)."""
    for ws in sockets:
        for text in JUNK_TEXT_FRAMES:
            await ws.send_str(text)
        for frame in JUNK_BINARY_FRAMES:
            await ws.send_bytes(frame)


async def flood_progress(sockets: list[web.WebSocketResponse], prompt_id: str, count: int,
                         preview: bytes) -> None:
    """``count`` rounds of a ``progress`` message and a type-4 preview frame for one
    prompt, as fast as the sockets take them: a server outrunning a reader that waits on
    Discord (a real ComfyUI sends one of each per sampler step; comfyui.md, trace 3)."""
    meta = json.dumps({"node_id": "3", "prompt_id": prompt_id, "display_node_id": "3",
                       "parent_node_id": None, "real_node_id": "3",
                       "image_type": "image/jpeg"}).encode("utf-8")
    frame = _meta(meta) + preview
    for ws in sockets:
        for step in range(count):
            await ws.send_str(json.dumps({"type": "progress", "data": {
                "value": step + 1, "max": count, "prompt_id": prompt_id, "node": "3"}}))
            await ws.send_bytes(frame)


@dataclass
class HitRecorder:
    """A loopback server standing for an internal service: it records every request, so
    a test can show the bot never reached it."""

    hits: list[str] = field(default_factory=list)
    port: int = 0
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        async def record(request: web.Request) -> web.Response:
            self.hits.append(request.path_qs)
            return web.json_response({"secret": "internal data"})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", record)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
