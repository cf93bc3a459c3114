"""Replay a recorded trace's requests against a server and compare the WebSocket streams.

Used by the fidelity tests: the same POST /prompt body the real ComfyUI received is sent
to the fake over a raw aiohttp socket, and both streams are reduced to a *shape* (message
types in order, their keys, node ids, states, progress values, binary frame types) that
does not depend on ids, timestamps or random file name parts.
"""

from __future__ import annotations

import asyncio
import json
import re
import struct
import uuid
from typing import Any

import aiohttp

from tests.fakecomfy import facts

Shape = tuple[Any, ...]


def _files(output: dict[str, Any] | None) -> tuple[Any, ...]:
    out = []
    for image in (output or {}).get("images", []):
        # Random parts: the temp prefix suffix and the counter.
        name = re.sub(r"_temp_[a-z]{5}_", "_temp_?_", image["filename"])
        name = re.sub(r"_\d{5}_\.png$", "_N_.png", name)
        out.append((name, image["subfolder"], image["type"]))
    return tuple(out)


def text_shape(message: dict[str, Any]) -> Shape:
    kind = message["type"]
    data = message["data"]
    keys = tuple(data.keys()) if isinstance(data, dict) else ()
    if kind == "status":
        return (kind, keys, data["status"]["exec_info"]["queue_remaining"])
    if kind == "executing":
        return (kind, keys, data.get("node"))
    if kind == "execution_cached":
        return (kind, keys, tuple(data["nodes"]))
    if kind == "executed":
        return (kind, keys, data["node"], _files(data["output"]))
    if kind == "progress":
        return (kind, keys, data["value"], data["max"], data["node"])
    if kind == "progress_state":
        nodes = tuple(
            (nid, tuple(info.keys()), info["state"], info["value"], info["max"],
             type(info["value"]).__name__)
            for nid, info in data["nodes"].items()
        )
        return (kind, keys, nodes)
    if kind in ("execution_error", "execution_interrupted"):
        # "executed" is built from a Python set in ComfyUI: its order is arbitrary.
        return (kind, keys, data["node_id"], data["node_type"], tuple(sorted(data["executed"])))
    return (kind, keys)


def binary_shape(event_type: int, head: dict[str, Any]) -> Shape:
    if event_type == 4:
        meta = head["metadata"]
        return ("binary", 4, tuple(meta.keys()), meta["node_id"], meta["image_type"])
    return ("binary", event_type, head.get("format"))


def trace_shapes(name: str, post_index: int = 0, *, prompt_id: str | None = None,
                 ws: str | None = None) -> list[Shape]:
    """Shapes of a trace's received frames after its ``post_index``-th POST /prompt, up to
    the end of ``prompt_id`` (default: the prompt of that POST)."""
    trace = facts.load_trace(name)
    events = trace["events"]
    posts = [i for i, e in enumerate(events)
             if e["kind"] == "http" and e["request"]["path"] == "/prompt"
             and e["request"]["method"] == "POST"]
    start = posts[post_index]
    if prompt_id is None:
        prompt_id = events[start]["response"]["json"]["prompt_id"]
    shapes: list[Shape] = []
    for event in events[start + 1:]:
        if event["kind"] != "ws_in" or (ws is not None and event.get("ws") != ws):
            continue
        if event["frame"] == "binary":
            head = {"metadata": event.get("metadata"), "format": event.get("image_format_code")}
            shapes.append(binary_shape(event["event_type"], head))
            continue
        message = event["message"]
        shapes.append(text_shape(message))
        data = message["data"]
        if (message["type"] == "executing" and data.get("node") is None
                and data.get("prompt_id") == prompt_id):
            break
    return shapes


def trace_prompt_bodies(name: str) -> list[dict[str, Any]]:
    trace = facts.load_trace(name)
    return [e["request"]["json"] for e in facts.http_events(trace, path="/prompt", method="POST")
            if "json" in e["request"]]


async def record_prompt(
    session: aiohttp.ClientSession,
    base_url: str,
    body: dict[str, Any],
    *,
    feature_flags: bool = False,
    ws: aiohttp.ClientWebSocketResponse | None = None,
    client_id: str | None = None,
    timeout: float = 10.0,
) -> tuple[dict[str, Any], list[Shape], list[dict[str, Any]]]:
    """POST ``body`` (its client_id replaced by ours) and record frames until the prompt's
    ``executing {node: null}``. Returns (POST response json, shapes, raw text messages)."""
    own_ws = ws is None
    client_id = client_id or uuid.uuid4().hex
    if ws is None:
        ws = await session.ws_connect(f"{base_url}/ws", params={"clientId": client_id})
        if feature_flags:
            await ws.send_json({"type": "feature_flags",
                                "data": {"supports_preview_metadata": True}})
        await ws.receive_json(timeout=timeout)  # status with sid
        if feature_flags:
            await ws.receive_json(timeout=timeout)  # feature_flags answer
    body = dict(body)
    if "client_id" in body:
        body["client_id"] = client_id
    async with session.post(f"{base_url}/prompt", json=body) as resp:
        answer = await resp.json()
    prompt_id = answer["prompt_id"]
    shapes: list[Shape] = []
    raw: list[dict[str, Any]] = []
    try:
        async with asyncio.timeout(timeout):
            while True:
                msg = await ws.receive()
                if msg.type == aiohttp.WSMsgType.BINARY:
                    (event_type,) = struct.unpack(">I", msg.data[:4])
                    head: dict[str, Any] = {}
                    if event_type == 4:
                        (length,) = struct.unpack(">I", msg.data[4:8])
                        head["metadata"] = json.loads(msg.data[8:8 + length])
                    else:
                        head["format"] = struct.unpack(">I", msg.data[4:8])[0]
                    shapes.append(binary_shape(event_type, head))
                    continue
                if msg.type != aiohttp.WSMsgType.TEXT:
                    raise AssertionError(f"socket ended: {msg.type}")
                message = json.loads(msg.data)
                raw.append(message)
                shapes.append(text_shape(message))
                data = message["data"]
                if (message["type"] == "executing" and data.get("node") is None
                        and data.get("prompt_id") == prompt_id):
                    break
    finally:
        if own_ws:
            await ws.close()
    return answer, shapes, raw
