"""The messages a ComfyUI WebSocket carries, as typed events, and their decoding.

Text frames are ``{"type": ..., "data": ...}`` (:func:`decode_message`). Binary frames
start with a big-endian u32 type (:func:`decode_binary`): 1 = ``[fmt u32][image]`` (fmt 1
JPEG, 2 PNG) with no prompt id, 4 = ``[json_len u32][json metadata][image]`` once the
client sent ``feature_flags {supports_preview_metadata: true}`` as its first frame, 3 =
text (read from ComfyUI's code, never observed). Type 2 (UNENCODED_PREVIEW_IMAGE) is
internal to the server: it is encoded into type 1 before it is sent, so it never reaches us.

:class:`PromptDone` is not a ComfyUI message: the stream synthesises it, once per tracked
prompt (see :mod:`core.comfy.stream`).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from core import fastjson
from core.comfy.errors import ComfyError, ComfyExecutionError, ComfyMalformed
from core.comfy.responses import OutputImage, parse_images

# Binary event types (comfy server.py BinaryEventTypes).
BINARY_PREVIEW_IMAGE = 1
BINARY_UNENCODED_PREVIEW_IMAGE = 2
BINARY_TEXT = 3
BINARY_PREVIEW_IMAGE_WITH_METADATA = 4
_PREVIEW_FORMATS = {1: "image/jpeg", 2: "image/png"}


# ---------------------------------------------------------------------------------------
# Events


@dataclass(frozen=True, slots=True)
class Status:
    queue_remaining: int
    sid: str | None = None
    prompt_id: None = None


@dataclass(frozen=True, slots=True)
class FeatureFlags:
    flags: dict[str, Any]
    prompt_id: None = None


@dataclass(frozen=True, slots=True)
class ExecutionStart:
    prompt_id: str
    timestamp: int | None = None


@dataclass(frozen=True, slots=True)
class ExecutionCached:
    prompt_id: str
    nodes: tuple[str, ...]
    timestamp: int | None = None


@dataclass(frozen=True, slots=True)
class Executing:
    """A node started. ``node is None`` with a prompt_id is the end of that prompt;
    ``prompt_id is None`` is the replay sent after a reconnect (trace 22)."""

    prompt_id: str | None
    node: str | None
    display_node: str | None = None


@dataclass(frozen=True, slots=True)
class NodeProgress:
    node_id: str
    value: float
    max: float
    state: str
    display_node_id: str | None = None
    parent_node_id: str | None = None
    real_node_id: str | None = None


@dataclass(frozen=True, slots=True)
class ProgressState:
    """The full per-node progress so far (not a delta)."""

    prompt_id: str
    nodes: dict[str, NodeProgress]


@dataclass(frozen=True, slots=True)
class Progress:
    prompt_id: str | None
    node: str | None
    value: float  # ComfyUI sends ints for samplers; custom nodes may send floats
    max: float


@dataclass(frozen=True, slots=True)
class Executed:
    prompt_id: str
    node: str
    display_node: str | None
    output: dict[str, Any]
    images: tuple[OutputImage, ...]


@dataclass(frozen=True, slots=True)
class ExecutionSuccess:
    prompt_id: str
    timestamp: int | None = None


@dataclass(frozen=True, slots=True)
class ExecutionError:
    prompt_id: str
    node_id: str | None
    node_type: str | None
    exception_message: str
    exception_type: str
    executed: tuple[str, ...] = ()
    traceback: tuple[str, ...] = ()
    timestamp: int | None = None

    def to_exception(self) -> ComfyExecutionError:
        return ComfyExecutionError(
            self.node_id,
            self.node_type,
            self.exception_message,
            exception_type=self.exception_type,
            prompt_id=self.prompt_id,
        )


@dataclass(frozen=True, slots=True)
class ExecutionInterrupted:
    prompt_id: str
    node_id: str | None
    node_type: str | None
    executed: tuple[str, ...] = ()
    timestamp: int | None = None


@dataclass(frozen=True, slots=True)
class PreviewEvent:
    """A preview image. Legacy type-1 frames carry no ids; we attribute them to the
    prompt/node currently running for our client, because ComfyUI sends them only to
    that prompt's socket and runs one prompt at a time."""

    prompt_id: str | None
    node_id: str | None
    image_bytes: bytes | memoryview = field(repr=False)  # a view into the frame
    mime: str
    metadata: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class TextEvent:
    prompt_id: str | None
    node_id: str
    text: str


@dataclass(frozen=True, slots=True)
class UnknownMessage:
    type: str
    data: Any
    prompt_id: str | None = None


@dataclass(frozen=True, slots=True)
class Disconnected:
    reason: str
    prompt_id: None = None


@dataclass(frozen=True, slots=True)
class Reconnected:
    """The socket is back; tracked prompts are being reconciled from /queue + /history."""

    attempts: int
    downtime: float
    prompt_id: None = None


DoneStatus = Literal["success", "error", "interrupted", "lost"]


@dataclass(frozen=True, slots=True)
class PromptDone:
    """Synthesised by the stream, exactly once per tracked prompt: the prompt is over.

    ``recovered`` is True when the outcome came from ``/history`` (or from its absence)
    instead of the live messages, e.g. because the socket was down when it finished.
    """

    prompt_id: str
    status: DoneStatus
    outputs: tuple[OutputImage, ...] = ()
    error: ComfyError | None = None
    recovered: bool = False

    @property
    def ok(self) -> bool:
        return self.status == "success"

    def raise_for_status(self) -> None:
        if self.error is not None:
            raise self.error


ComfyEvent = (
    Status
    | FeatureFlags
    | ExecutionStart
    | ExecutionCached
    | Executing
    | ProgressState
    | Progress
    | Executed
    | ExecutionSuccess
    | ExecutionError
    | ExecutionInterrupted
    | PreviewEvent
    | TextEvent
    | UnknownMessage
    | Disconnected
    | Reconnected
    | PromptDone
)
Listener = Callable[[ComfyEvent], None]


# ---------------------------------------------------------------------------------------
# Decoding (pure functions)


# Known message types: the wrong shape for one of these is malformed; an unknown type is
# passed on as UnknownMessage (ComfyUI and its extensions add types).
_KNOWN = frozenset({
    "status", "feature_flags", "execution_start", "execution_cached", "executing", "progress",
    "progress_state", "executed", "execution_success", "execution_error",
    "execution_interrupted",
})
_PREVIEW_MIMES = frozenset({"image/jpeg", "image/png", "image/webp"})


class _Bad(Exception):
    """A field of the wrong type; decode_message turns it into ComfyMalformed."""


def _opt_str(value: Any) -> str | None:
    """An id or name: ComfyUI sends strings (node ids may be numbers in old extensions)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise _Bad(f"{type(value).__name__} where a string belongs")


def _str(value: Any) -> str:
    text = _opt_str(value)
    if text is None:
        raise _Bad("a string is missing")
    return text


def _text(value: Any) -> str:
    """Free text (an exception message): absent is empty."""
    return _opt_str(value) or ""


def _number(value: Any) -> int | float:
    """A progress value or count: a finite number >= 0 (a string here once raised
    TypeError in the progress display)."""
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < 2**63:
        return value
    what = "a negative number" if _finite(value) else type(value).__name__
    raise _Bad(f"{what} where a count belongs")


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and abs(value) < 2**63


def _strings(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _Bad("a list is missing")
    return tuple(_str(item) for item in value)


def _object(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _Bad(f"{type(value).__name__} where an object belongs")
    return value


def _timestamp(value: Any) -> int | None:
    # Only informative: junk becomes None instead of refusing the message.
    if isinstance(value, int | float) and not isinstance(value, bool) and abs(value) < 2**63:
        return int(value)
    return None


def decode_message(message: Any) -> ComfyEvent:
    """Decode one text frame ``{"type":..., "data":...}``.

    Raises :class:`ComfyMalformed` (and nothing else) when the frame is not an object or
    a known message type has the wrong shape; the stream logs and skips it.
    """
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ComfyMalformed("WebSocket message", "not an object with a type")
    kind: str = message["type"]
    data = message.get("data")
    if kind not in _KNOWN:
        prompt_id = data.get("prompt_id") if isinstance(data, dict) else None
        return UnknownMessage(kind, data, prompt_id if isinstance(prompt_id, str) else None)
    try:
        if not isinstance(data, dict):
            raise _Bad("data is not an object")
        return _decode(kind, data)
    except _Bad as exc:
        raise ComfyMalformed(f"{kind[:40]} message", str(exc)) from None


def _decode(kind: str, data: dict[str, Any]) -> ComfyEvent:
    pid = _opt_str(data.get("prompt_id"))
    ts = _timestamp(data.get("timestamp"))
    if kind == "status":
        info = _object(_object(data.get("status")).get("exec_info"))
        remaining = _number(info.get("queue_remaining", 0))
        return Status(max(0, int(remaining)), _opt_str(data.get("sid")))
    if kind == "feature_flags":
        return FeatureFlags(dict(data))
    if pid is None and kind != "executing" and kind != "progress":
        raise _Bad("prompt_id is missing")
    if kind == "execution_start":
        return ExecutionStart(_str(pid), ts)
    if kind == "execution_cached":
        return ExecutionCached(_str(pid), _strings(data.get("nodes")), ts)
    if kind == "executing":
        return Executing(pid, _opt_str(data.get("node")), _opt_str(data.get("display_node")))
    if kind == "progress":
        return Progress(
            pid, _opt_str(data.get("node")),
            _number(data.get("value", 0)), _number(data.get("max", 0)),
        )
    if kind == "progress_state":
        nodes: dict[str, NodeProgress] = {}
        for node_id, info in _object(data.get("nodes")).items():
            info = _object(info)
            nodes[node_id] = NodeProgress(
                node_id=_str(info.get("node_id", node_id)),
                value=_number(info.get("value", 0)),
                max=_number(info.get("max", 0)),
                state=_text(info.get("state")),
                display_node_id=_opt_str(info.get("display_node_id")),
                parent_node_id=_opt_str(info.get("parent_node_id")),
                real_node_id=_opt_str(info.get("real_node_id")),
            )
        return ProgressState(_str(pid), nodes)
    if kind == "executed":
        node = _str(data.get("node"))
        output = _object(data.get("output"))
        return Executed(
            _str(pid), node, _opt_str(data.get("display_node")), dict(output),
            tuple(parse_images(node, output)),
        )
    if kind == "execution_success":
        return ExecutionSuccess(_str(pid), ts)
    if kind == "execution_error":
        traceback = data.get("traceback")
        return ExecutionError(
            prompt_id=_str(pid),
            node_id=_opt_str(data.get("node_id")),
            node_type=_opt_str(data.get("node_type")),
            exception_message=_text(data.get("exception_message")),
            exception_type=_text(data.get("exception_type")),
            executed=_strings(data.get("executed")),
            # Only logged: lines that are not strings are dropped rather than refused.
            traceback=tuple(
                line for line in (traceback if isinstance(traceback, list) else [])
                if isinstance(line, str)
            ),
            timestamp=ts,
        )
    # execution_interrupted (the last of _KNOWN)
    return ExecutionInterrupted(
        prompt_id=_str(pid),
        node_id=_opt_str(data.get("node_id")),
        node_type=_opt_str(data.get("node_type")),
        executed=_strings(data.get("executed")),
        timestamp=ts,
    )


def decode_binary(
    frame: bytes, *, current_prompt: str | None = None, current_node: str | None = None
) -> PreviewEvent | TextEvent | None:
    """Decode one binary frame; None for types we do not understand.

    Raises :class:`ComfyMalformed` for a known type whose header or metadata is junk.
    """
    if len(frame) < 8:
        return None
    event_type, second = struct.unpack(">II", frame[:8])
    if event_type == BINARY_PREVIEW_IMAGE:
        mime = _PREVIEW_FORMATS.get(second)
        if mime is None:
            raise ComfyMalformed("preview frame", f"unknown image format {second}")
        # A view, not a copy: at 100 servers ~2,000 previews of ~65 KB arrive a second,
        # and nearly all are superseded unread.
        return PreviewEvent(current_prompt, current_node, memoryview(frame)[8:], mime)
    if event_type == BINARY_PREVIEW_IMAGE_WITH_METADATA:
        if 8 + second > len(frame):
            raise ComfyMalformed("preview frame", "metadata longer than the frame")
        try:
            meta = fastjson.loads(frame[8 : 8 + second])
        except (ValueError, RecursionError):
            raise ComfyMalformed("preview frame", "metadata is not JSON") from None
        mime = meta.get("image_type", "image/jpeg") if isinstance(meta, dict) else None
        if mime not in _PREVIEW_MIMES:
            raise ComfyMalformed("preview frame", "metadata without a known image type")
        try:
            prompt_id, node_id = _opt_str(meta.get("prompt_id")), _opt_str(meta.get("node_id"))
        except _Bad as exc:
            raise ComfyMalformed("preview frame", str(exc)) from None
        return PreviewEvent(prompt_id, node_id, memoryview(frame)[8 + second :], mime, meta)
    if event_type == BINARY_TEXT:
        if 8 + second > len(frame):
            raise ComfyMalformed("text frame", "node id longer than the frame")
        node_id = frame[8 : 8 + second].decode("utf-8", "replace")
        return TextEvent(current_prompt, node_id, frame[8 + second :].decode("utf-8", "replace"))
    return None
