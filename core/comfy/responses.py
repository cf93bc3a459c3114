"""What a ComfyUI server answers over HTTP, as frozen dataclasses, and the parsers that
build them: queued prompts, the queue, finished prompts from ``/history``, output images,
system stats and uploads. Shared by :mod:`core.comfy.client` and the event stream."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from core.comfy.errors import ComfyExecutionError, ComfyInterrupted

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


def parse_images(node_id: str | None, output: Mapping[str, Any] | None) -> list[OutputImage]:
    images: list[OutputImage] = []
    for item in (output or {}).get("images") or []:
        if isinstance(item, dict) and "filename" in item:
            images.append(
                OutputImage(
                    filename=str(item["filename"]),
                    subfolder=str(item.get("subfolder") or ""),
                    type=str(item.get("type") or "output"),
                    node_id=node_id,
                )
            )
    return images


def parse_history_entry(prompt_id: str, entry: Mapping[str, Any]) -> PromptResult:
    """Turn one ``/history`` value into a :class:`PromptResult`.

    ``status_str`` is "error" for both failures and interrupts (traces 09, 12, 19); the
    ``messages`` list says which one it was.
    """
    status = entry.get("status") or {}
    outputs: list[OutputImage] = []
    for node_id, output in (entry.get("outputs") or {}).items():
        outputs.extend(parse_images(str(node_id), output))
    result_status: PromptStatus = "success"
    node_id = node_type = message = exc_type = None
    for kind, data in status.get("messages") or []:
        if kind == "execution_error":
            result_status = "error"
            node_id, node_type = data.get("node_id"), data.get("node_type")
            message, exc_type = data.get("exception_message"), data.get("exception_type")
        elif kind == "execution_interrupted":
            result_status = "interrupted"
            node_id, node_type = data.get("node_id"), data.get("node_type")
    if status.get("status_str") == "error" and result_status == "success":
        # An error with no message recorded: still an error, just without details.
        result_status = "error"
    return PromptResult(
        prompt_id=prompt_id,
        status=result_status,
        completed=bool(status.get("completed", result_status == "success")),
        outputs=tuple(outputs),
        node_id=None if node_id is None else str(node_id),
        node_type=node_type,
        exception_message=message,
        exception_type=exc_type,
    )


def parse_queue_items(raw: Any) -> tuple[QueueItem, ...]:
    items: list[QueueItem] = []
    for row in raw or []:
        # [number, prompt_id, prompt, extra_data, outputs_to_execute] (traces 12, 20)
        if not isinstance(row, list) or len(row) < 2:
            continue
        extra = row[3] if len(row) > 3 and isinstance(row[3], dict) else {}
        outputs = row[4] if len(row) > 4 and isinstance(row[4], list) else []
        items.append(
            QueueItem(
                number=int(row[0]),
                prompt_id=str(row[1]),
                client_id=extra.get("client_id"),
                outputs_to_execute=tuple(str(o) for o in outputs),
            )
        )
    items.sort(key=lambda item: item.number)
    return tuple(items)
