"""What a ComfyUI server answers over HTTP, as frozen dataclasses, and the parsers that
build them: queued prompts, the queue, finished prompts from ``/history``, output images,
system stats and uploads. Shared by :mod:`core.comfy.client` and the event stream."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from core.comfy.errors import (
    ComfyExecutionError,
    ComfyInterrupted,
    ComfyMalformed,
    ComfyValidationError,
)

ImageType = Literal["output", "input", "temp"]
PromptStatus = Literal["success", "error", "interrupted"]


@dataclass(frozen=True, slots=True)
class OutputImage:
    """One file a node produced (``executed.output.images`` / history ``outputs``)."""

    filename: str
    subfolder: str
    type: str
    node_id: str | None = None


@dataclass(frozen=True, slots=True)
class QueuedPrompt:
    """The 200 answer of ``POST /prompt``."""

    prompt_id: str
    number: int
    node_errors: dict[str, Any] = field(default_factory=dict)

    @property
    def partial(self) -> bool:
        """True when some outputs failed validation and were dropped (trace 08)."""
        return bool(self.node_errors)


@dataclass(frozen=True, slots=True)
class QueueItem:
    number: int
    prompt_id: str
    client_id: str | None
    outputs_to_execute: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class QueueState:
    """``GET /queue``: at most one running item, pending items sorted by number."""

    running: tuple[QueueItem, ...]
    pending: tuple[QueueItem, ...]

    @property
    def running_ids(self) -> list[str]:
        return [item.prompt_id for item in self.running]

    @property
    def pending_ids(self) -> list[str]:
        return [item.prompt_id for item in self.pending]

    def position(self, prompt_id: str) -> int | None:
        """0 while running, 1.. for the place in the pending line, None if absent."""
        if prompt_id in self.running_ids:
            return 0
        for index, item in enumerate(self.pending, start=1):
            if item.prompt_id == prompt_id:
                return index
        return None

    def __contains__(self, prompt_id: object) -> bool:
        return isinstance(prompt_id, str) and self.position(prompt_id) is not None


@dataclass(frozen=True, slots=True)
class PromptResult:
    """A finished prompt, parsed from its ``/history`` entry."""

    prompt_id: str
    status: PromptStatus
    completed: bool
    outputs: tuple[OutputImage, ...]
    node_id: str | None = None
    node_type: str | None = None
    exception_message: str | None = None
    exception_type: str | None = None

    def raise_for_status(self) -> None:
        if self.status == "error":
            raise ComfyExecutionError(
                self.node_id,
                self.node_type,
                self.exception_message or "",
                exception_type=self.exception_type or "",
                prompt_id=self.prompt_id,
            )
        if self.status == "interrupted":
            raise ComfyInterrupted(self.prompt_id, self.node_id, self.node_type)


@dataclass(frozen=True, slots=True)
class DeviceStats:
    name: str
    type: str
    vram_total: int
    vram_free: int


@dataclass(frozen=True, slots=True)
class SystemStats:
    comfyui_version: str
    python_version: str
    pytorch_version: str
    devices: tuple[DeviceStats, ...]
    raw: dict[str, Any]


@dataclass(frozen=True, slots=True)
class UploadedImage:
    """``POST /upload/image`` answer. ComfyUI may rename on a clash (``name (1).png``)."""

    name: str
    subfolder: str
    type: str

    @property
    def load_image_value(self) -> str:
        """The value a LoadImage node wants: ``subfolder/name`` (trace 13)."""
        return f"{self.subfolder}/{self.name}" if self.subfolder else self.name


# Told about each skipped row or definition: (kind, problem). The client passes its
# rate-limited MalformedLog.report; pure callers may pass nothing.
Report = Callable[[str, str], None]


def _ignore(_kind: str, _problem: str) -> None:
    return None


def _opt_text(value: Any) -> str | None:
    """An id or name ComfyUI sends as a string (or a number); anything else is junk."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and abs(value) < 2**63


def _byte_count(value: Any) -> int:
    """A VRAM size from /system_stats; junk counts as 0 (it is only shown)."""
    return int(value) if _is_number(value) and value >= 0 else 0


def parse_system_stats(raw: dict[str, Any]) -> SystemStats:
    """``GET /system_stats``; fields of the wrong type read as empty (they are only shown)."""
    system = raw.get("system")
    system = system if isinstance(system, dict) else {}
    devices_raw = raw.get("devices")
    devices = tuple(
        DeviceStats(
            name=str(d.get("name", ""))[:200],
            type=str(d.get("type", ""))[:50],
            vram_total=_byte_count(d.get("vram_total")),
            vram_free=_byte_count(d.get("vram_free")),
        )
        for d in (devices_raw if isinstance(devices_raw, list) else [])
        if isinstance(d, dict)
    )
    return SystemStats(
        comfyui_version=str(system.get("comfyui_version", ""))[:80],
        python_version=str(system.get("python_version", ""))[:200],
        pytorch_version=str(system.get("pytorch_version", ""))[:80],
        devices=devices,
        raw=raw,
    )


def parse_queued(status: int, data: dict[str, Any]) -> QueuedPrompt:
    """The answer of ``POST /prompt``: 200 queued, 400 :class:`ComfyValidationError`."""
    node_errors = data.get("node_errors") or {}
    if not isinstance(node_errors, dict):
        raise ComfyMalformed("answer to /prompt", "node_errors is not an object")
    if status == 400:
        error = data.get("error")
        raise ComfyValidationError(node_errors, error if isinstance(error, dict) else None)
    number = data.get("number", 0)
    if not isinstance(data.get("prompt_id"), str) or not _is_number(number):
        raise ComfyMalformed("answer to /prompt", "no prompt_id or number")
    return QueuedPrompt(prompt_id=data["prompt_id"], number=int(number), node_errors=node_errors)


def parse_uploaded(raw: dict[str, Any]) -> UploadedImage:
    name, sub, kind = raw.get("name"), raw.get("subfolder") or "", raw.get("type")
    if not (isinstance(name, str) and isinstance(sub, str) and isinstance(kind, str)):
        raise ComfyMalformed("answer to /upload/image", "no name, subfolder or type")
    return UploadedImage(name=name, subfolder=sub, type=kind)


def parse_images(node_id: str | None, output: Any) -> list[OutputImage]:
    """The ``images`` of one node output; items of the wrong shape are skipped."""
    items = output.get("images") if isinstance(output, Mapping) else None
    images: list[OutputImage] = []
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict) or not isinstance(item.get("filename"), str):
            continue
        subfolder, kind = item.get("subfolder") or "", item.get("type") or "output"
        if not isinstance(subfolder, str) or not isinstance(kind, str):
            continue
        images.append(OutputImage(item["filename"], subfolder, kind, node_id))
    return images


def parse_history_entry(prompt_id: str, entry: Mapping[str, Any]) -> PromptResult:
    """Turn one ``/history`` value into a :class:`PromptResult`.

    ``status_str`` is "error" for both failures and interrupts (traces 09, 12, 19); the
    ``messages`` list says which one it was. An entry whose status or outputs are not
    objects raises :class:`ComfyMalformed`: its outcome cannot be known.
    """
    status = entry.get("status") or {}
    outputs_raw = entry.get("outputs") or {}
    if not isinstance(status, dict) or not isinstance(outputs_raw, dict):
        raise ComfyMalformed("history entry", "status or outputs is not an object")
    outputs: list[OutputImage] = []
    for node_id, output in outputs_raw.items():
        outputs.extend(parse_images(str(node_id), output))
    result_status: PromptStatus = "success"
    node_id = node_type = message = exc_type = None
    messages = status.get("messages")
    for item in messages if isinstance(messages, list) else []:
        if not isinstance(item, list) or len(item) != 2 or not isinstance(item[1], dict):
            continue
        kind, data = item
        if kind == "execution_error":
            result_status = "error"
            node_id, node_type = _opt_text(data.get("node_id")), _opt_text(data.get("node_type"))
            message = _opt_text(data.get("exception_message"))
            exc_type = _opt_text(data.get("exception_type"))
        elif kind == "execution_interrupted":
            result_status = "interrupted"
            node_id, node_type = _opt_text(data.get("node_id")), _opt_text(data.get("node_type"))
    if status.get("status_str") == "error" and result_status == "success":
        # An error with no message recorded: still an error, just without details.
        result_status = "error"
    return PromptResult(
        prompt_id=prompt_id,
        status=result_status,
        completed=bool(status.get("completed", result_status == "success")),
        outputs=tuple(outputs),
        node_id=node_id,
        node_type=node_type,
        exception_message=message,
        exception_type=exc_type,
    )


def parse_queue_items(raw: Any, report: Report = _ignore) -> tuple[QueueItem, ...]:
    """``queue_running``/``queue_pending`` rows; a row of the wrong shape is skipped."""
    items: list[QueueItem] = []
    for row in raw if isinstance(raw, list) else []:
        # [number, prompt_id, prompt, extra_data, outputs_to_execute] (traces 12, 20)
        if (
            not isinstance(row, list)
            or len(row) < 2
            or not isinstance(row[0], int | float)
            or isinstance(row[0], bool)
            or not abs(row[0]) < 2**63  # also false for NaN
            or not isinstance(row[1], str)
        ):
            report("queue row", f"{type(row).__name__} without a number and prompt id")
            continue
        extra = row[3] if len(row) > 3 and isinstance(row[3], dict) else {}
        outputs = row[4] if len(row) > 4 and isinstance(row[4], list) else []
        client_id = extra.get("client_id")
        items.append(
            QueueItem(
                number=int(row[0]),
                prompt_id=row[1],
                client_id=client_id if isinstance(client_id, str) else None,
                outputs_to_execute=tuple(o for o in map(_opt_text, outputs) if o is not None),
            )
        )
    items.sort(key=lambda item: item.number)
    return tuple(items)


_SECTIONS = ("required", "optional", "hidden")


def clean_object_info(raw: Mapping[str, Any], report: Report = _ignore) -> dict[str, Any]:
    """``/object_info`` with every definition in the documented shape (trace 03).

    A definition is kept when it is an object whose ``input`` is an object of sections
    (objects of inputs, each a list with a type or a combo list first) and whose
    ``output`` is a list; anything else is dropped and reported once.
    """
    clean: dict[str, Any] = {}
    for name, definition in raw.items():
        problem = _definition_problem(definition)
        if problem:
            report("object_info definition", f"{str(name)[:80]}: {problem}")
            continue
        clean[name] = definition
    return clean


def _definition_problem(definition: Any) -> str | None:
    if not isinstance(definition, dict):
        return "not an object"
    inputs = definition.get("input") or {}
    if not isinstance(inputs, dict):
        return "input is not an object"
    for section in _SECTIONS:
        entries = inputs.get(section) or {}
        if not isinstance(entries, dict):
            return f"input.{section} is not an object"
        for spec in entries.values():
            if isinstance(spec, list) and not spec:
                return "an input has an empty spec"
    if not isinstance(definition.get("output") or [], list):
        return "output is not a list"
    return None
