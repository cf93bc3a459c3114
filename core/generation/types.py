"""What the rest of the product sees of a generation job.

The request a member makes, the snapshot the Discord side renders, the observer interface
it implements, and the two errors a job can end with. Nothing here touches the database
or ComfyUI.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from core.audit import Actor
from core.db.models import GenerationStatus
from core.errors import ComfyVastError, ValidationFailed
from core.images import ImageFile


class GenerationFailed(ComfyVastError):
    """A job ended in failure; ``str()`` is the sentence shown to the user."""


class ServerFailure(Exception):
    """The server under a job went away; the job may move to another server once.

    ``retry_here`` is set when the server answers again but forgot the job (ComfyUI was
    restarted): then the job is queued again on the same server.
    """

    def __init__(self, reason: str, *, retry_here: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_here = retry_here


@dataclass(frozen=True, slots=True)
class InputImage:
    filename: str
    data: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    actor: Actor
    prompt: str
    negative: str = ""
    model: str | None = None
    width: int = 1024
    height: int = 1024
    steps: int = 25
    cfg: float = 7.0
    seed: int | None = None
    sampler: str = "euler"
    scheduler: str = "normal"
    batch: int = 1
    lora: str | None = None
    lora_strength: float = 1.0
    image: InputImage | None = None
    denoise: float = 0.75
    workflow: str | None = None
    server: str | None = None
    parent_id: int | None = None
    kind: str = "generate"  # generate | reroll | variation | upscale
    upscale_model: str | None = None


@dataclass(frozen=True, slots=True)
class JobView:
    """What the Discord side renders: a snapshot of one job."""

    id: int
    user_id: int
    guild_id: int | None
    channel_id: int | None
    message_id: int | None
    server_id: int | None
    server_name: str | None
    status: str
    prompt: str
    negative: str | None
    parameters: dict[str, Any]
    queue_position: int | None = None
    current_node: str | None = None
    step: int | None = None
    max_steps: int | None = None
    progress: float = 0.0
    eta_seconds: float | None = None
    error: str | None = None
    notice: str | None = None
    created_at: dt.datetime | None = None
    started_at: dt.datetime | None = None
    completed_at: dt.datetime | None = None
    image_count: int = 0

    @property
    def finished(self) -> bool:
        return GenerationStatus(self.status).finished

    @property
    def running(self) -> bool:
        return self.status == GenerationStatus.RUNNING

    @property
    def seed(self) -> int | None:
        seed = self.parameters.get("seed")
        return seed if isinstance(seed, int) else None


# Job ids are a 32-bit Integer column: a larger number is no job (and PostgreSQL would
# refuse it in a lookup rather than find nothing).
MAX_JOB_ID = 2**31 - 1


@dataclass(frozen=True, slots=True)
class Viewer:
    """Who asks to see jobs (/history, /progress), and what they may see.

    Prompts are the members' own words: a job is shown only inside the guild it ran in,
    and there only to members who can see its channel (the Discord side passes the
    channels the member can view), to its author, and to admins (``channel_ids`` None:
    the whole guild). Outside a guild (a DM) a member sees only their own DM jobs.
    """

    user_id: int | None
    guild_id: int | None
    channel_ids: frozenset[int] | None = frozenset()

    def can_see(self, job: JobView) -> bool:
        if job.guild_id != self.guild_id:
            return False
        if self.guild_id is None:
            return job.user_id == self.user_id
        if self.channel_ids is None or job.user_id == self.user_id:
            return True
        return job.channel_id in self.channel_ids


class JobObserver:
    """How the Discord side watches jobs; this base ignores everything (the default).

    Every method must tolerate being called again for the same job.
    """

    async def on_update(self, job: JobView, preview: bytes | memoryview | None) -> None:
        """The job changed. For live progress ``job`` may lack the newest step: read
        :meth:`GenerationService.snapshot` when rendering."""

    async def deliver(
        self, job: JobView, images: list[ImageFile], *, check_existing: bool = False
    ) -> None:
        """Post the result; with ``check_existing`` (a delivery interrupted by a restart)
        first look for a result message already posted."""

    async def on_finished(self, job: JobView) -> None:
        """The job ended (completed, failed or cancelled)."""


def job_parameters(req: GenerationRequest, model: str | None, seed: int) -> dict[str, Any]:
    """The parameters a job's row keeps: everything needed to build its workflow again."""
    return {
        "kind": req.kind,
        "model": model,
        "width": req.width,
        "height": req.height,
        "steps": req.steps,
        "cfg": req.cfg,
        "seed": seed,
        "sampler": req.sampler,
        "scheduler": req.scheduler,
        "batch": req.batch,
        "lora": req.lora,
        "lora_strength": req.lora_strength,
        "denoise": req.denoise if req.image else 1.0,
        "workflow": req.workflow,
        "explicit_server": req.server is not None,
        "upscale_model": req.upscale_model,
        "parent_id": req.parent_id,
    }


def request_from(job: JobView, actor: Actor, **changes: Any) -> GenerationRequest:
    """A new request with a finished job's settings (re-roll, variations)."""
    p = job.parameters
    req = GenerationRequest(
        actor=actor,
        prompt=job.prompt,
        negative=job.negative or "",
        model=p.get("model"),
        width=p.get("width", 1024),
        height=p.get("height", 1024),
        steps=p.get("steps", 25),
        cfg=p.get("cfg", 7.0),
        sampler=p.get("sampler", "euler"),
        scheduler=p.get("scheduler", "normal"),
        batch=p.get("batch", 1),
        lora=p.get("lora"),
        lora_strength=p.get("lora_strength", 1.0),
        workflow=p.get("workflow"),
        parent_id=job.id,
    )
    input_path = p.get("input_path")
    if input_path:
        # Input images are deleted when their job ends (they can be 20 MB each), so a
        # finished img2img job cannot be run again from its image: say so rather than
        # quietly drawing from the prompt alone.
        try:
            data = Path(input_path).read_bytes()
        except OSError:
            raise ValidationFailed(
                "This job started from an image, which is not kept after a job ends; "
                "run /generate with the image again."
            ) from None
        req = replace(
            req,
            image=InputImage(Path(input_path).name, data),
            denoise=p.get("denoise", 0.75),
        )
    return replace(req, **changes)
