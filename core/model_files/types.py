"""What the model-file services share: the folders and extensions, the views and requests
they hand out, the download observer and the errors a member may see."""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from core.audit import Actor
from core.errors import ComfyVastError, ExternalServiceError
from core.servers import ServerView

# Where ComfyUI lives on a server unless told otherwise; models are in <install>/models.
DEFAULT_INSTALL_DIR = "/opt/ComfyUI"

# A fixed path, or a function of the server (sync or async), e.g. from SetupService.
InstallDir = str | Callable[[ServerView], str | Awaitable[str]]

# ComfyUI's standard model folders. "unet" and "clip" are the older names of
# "diffusion_models" and "text_encoders"; ComfyUI reads both, so both are allowed.
MODEL_FOLDERS: tuple[str, ...] = (
    "checkpoints",
    "loras",
    "vae",
    "embeddings",
    "controlnet",
    "upscale_models",
    "clip",
    "clip_vision",
    "unet",
    "diffusion_models",
    "text_encoders",
)

# What ComfyUI loads (folder_paths.supported_pt_extensions, plus GGUF for the popular loader
# nodes and ONNX for some upscalers/detectors). Plain pickles (.pkl) are left out on purpose.
MODEL_EXTENSIONS: tuple[str, ...] = (
    ".safetensors",
    ".sft",
    ".ckpt",
    ".pt",
    ".pt2",
    ".pth",
    ".bin",
    ".gguf",
    ".onnx",
)


# --------------------------------------------------------------------------- errors


class DiskFull(ComfyVastError):
    """The server does not have room for the file."""


class SourceError(ExternalServiceError):
    """The download source refused, could not find, or could not serve the file."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class DownloadFailed(ExternalServiceError):
    """curl or a check after it failed; the message says what to do."""


# --------------------------------------------------------------------------- views


@dataclass(frozen=True, slots=True)
class ModelListing:
    """What one server has, per folder; ``source`` is "comfyui" or "ssh"."""

    server_id: int
    server_name: str
    source: str
    folders: dict[str, tuple[str, ...]]
    fetched_at: dt.datetime

    def names(self, folder: str) -> tuple[str, ...]:
        return self.folders.get(folder, ())

    @property
    def total(self) -> int:
        return sum(len(v) for v in self.folders.values())


@dataclass(frozen=True, slots=True)
class DownloadRequest:
    actor: Actor
    server: str
    url: str = field(repr=False)  # may carry a signed query; repr'd only redacted
    folder: str
    filename: str | None = None
    sha256: str | None = None


@dataclass(frozen=True, slots=True)
class DownloadView:
    """A snapshot of one download, for rendering."""

    id: int
    server_id: int
    server_name: str
    url: str  # redacted
    folder: str
    filename: str
    status: str  # pending | downloading | verifying | completed | failed
    bytes_total: int | None = None
    bytes_done: int = 0
    speed: float | None = None
    eta_seconds: float | None = None
    resumed_from: int = 0
    sha256: str | None = None
    error: str | None = None
    requested_by: int | None = None
    channel_id: int | None = None
    message_id: int | None = None
    started_at: dt.datetime | None = None
    completed_at: dt.datetime | None = None

    @property
    def finished(self) -> bool:
        return self.status in ("completed", "failed")

    @property
    def fraction(self) -> float | None:
        if not self.bytes_total:
            return None
        return min(1.0, self.bytes_done / self.bytes_total)


class DownloadObserver:
    """Told about one download; the Discord side overrides it to keep a status message up
    to date. Every method does nothing here, so a plain instance watches nothing."""

    async def on_started(self, download: DownloadView) -> tuple[int, int] | None:
        """Post the status message; return its (channel id, message id) to keep editing it."""
        return None

    async def on_progress(self, download: DownloadView) -> None:
        return None

    async def on_finished(self, download: DownloadView) -> None:
        return None


def format_size(size: int | None) -> str:
    """Human size for messages: "12.3 MB", "1.2 GB"."""
    if size is None:
        return "?"
    if size >= 1024**3:
        return f"{size / 1024**3:.1f} GB"
    return f"{size / 1024**2:.1f} MB"
