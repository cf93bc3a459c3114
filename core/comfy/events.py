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

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from core.comfy.errors import ComfyError, ComfyExecutionError
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
    value: int
    max: int


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
    image_bytes: bytes = field(repr=False)
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


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


def decode_message(message: dict[str, Any]) -> ComfyEvent:
    """Decode one text frame ``{"type":..., "data":...}``."""
    kind = str(message.get("type", ""))
    data = message.get("data")
    if not isinstance(data, dict):
        return UnknownMessage(kind, data)
    pid = _opt_str(data.get("prompt_id"))
    ts = data.get("timestamp")
    if kind == "status":
        info = (data.get("status") or {}).get("exec_info") or {}
        return Status(int(info.get("queue_remaining", 0)), _opt_str(data.get("sid")))
    if kind == "feature_flags":
        return FeatureFlags(dict(data))
    if pid is None and kind != "executing" and kind != "progress":
        return UnknownMessage(kind, data)
    if kind == "execution_start":
        return ExecutionStart(str(pid), ts)
    if kind == "execution_cached":
        return ExecutionCached(str(pid), tuple(str(n) for n in data.get("nodes") or ()), ts)
    if kind == "executing":
        return Executing(pid, _opt_str(data.get("node")), _opt_str(data.get("display_node")))
    if kind == "progress":
        return Progress(pid, _opt_str(data.get("node")), data.get("value", 0), data.get("max", 0))
    if kind == "progress_state":
        nodes = {
            str(node_id): NodeProgress(
                node_id=str(info.get("node_id", node_id)),
                value=info.get("value", 0),
                max=info.get("max", 0),
                state=str(info.get("state", "")),
                display_node_id=_opt_str(info.get("display_node_id")),
                parent_node_id=_opt_str(info.get("parent_node_id")),
                real_node_id=_opt_str(info.get("real_node_id")),
            )
            for node_id, info in (data.get("nodes") or {}).items()
            if isinstance(info, dict)
        }
        return ProgressState(str(pid), nodes)
    if kind == "executed":
        node = str(data.get("node"))
        output = data.get("output") or {}
        return Executed(
            str(pid),
            node,
            _opt_str(data.get("display_node")),
            dict(output),
            tuple(parse_images(node, output)),
        )
    if kind == "execution_success":
        return ExecutionSuccess(str(pid), ts)
    if kind == "execution_error":
        return ExecutionError(
            prompt_id=str(pid),
            node_id=_opt_str(data.get("node_id")),
            node_type=_opt_str(data.get("node_type")),
            exception_message=str(data.get("exception_message") or ""),
            exception_type=str(data.get("exception_type") or ""),
            executed=tuple(str(n) for n in data.get("executed") or ()),
            traceback=tuple(str(line) for line in data.get("traceback") or ()),
            timestamp=ts,
        )
    if kind == "execution_interrupted":
        return ExecutionInterrupted(
            prompt_id=str(pid),
            node_id=_opt_str(data.get("node_id")),
            node_type=_opt_str(data.get("node_type")),
            executed=tuple(str(n) for n in data.get("executed") or ()),
            timestamp=ts,
        )
    return UnknownMessage(kind, data, pid)


def decode_binary(
    frame: bytes, *, current_prompt: str | None = None, current_node: str | None = None
) -> PreviewEvent | TextEvent | None:
    """Decode one binary frame; None for types we do not understand."""
    if len(frame) < 8:
        return None
    (event_type,) = struct.unpack(">I", frame[:4])
    if event_type == BINARY_PREVIEW_IMAGE:
        (fmt,) = struct.unpack(">I", frame[4:8])
        mime = _PREVIEW_FORMATS.get(fmt, "application/octet-stream")
        return PreviewEvent(current_prompt, current_node, frame[8:], mime)
    if event_type == BINARY_PREVIEW_IMAGE_WITH_METADATA:
        (length,) = struct.unpack(">I", frame[4:8])
        try:
            meta = json.loads(frame[8 : 8 + length])
        except ValueError:
            return None
        if not isinstance(meta, dict):
            return None
        return PreviewEvent(
            _opt_str(meta.get("prompt_id")),
            _opt_str(meta.get("node_id")),
            frame[8 + length :],
            str(meta.get("image_type") or "image/jpeg"),
            meta,
        )
    if event_type == BINARY_TEXT:
        (length,) = struct.unpack(">I", frame[4:8])
        node_id = frame[8 : 8 + length].decode("utf-8", "replace")
        return TextEvent(current_prompt, node_id, frame[8 + length :].decode("utf-8", "replace"))
    return None
