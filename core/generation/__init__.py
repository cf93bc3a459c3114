"""Generation jobs: validate, record, pick a server, queue, track, deliver.

The row is written before every side effect, so a restarted bot resumes each unfinished
job: it is tracked again, or delivered from ComfyUI's history if it finished while the
bot was away. The Discord side observes jobs through :class:`JobObserver`; it never
touches the database or ComfyUI.

Modules, each depending only on those above it:

- ``types``: requests, views, the observer base, the errors a job ends with.
- ``validation``: pure checks of a request and of a member's rate limits.
- ``workflow``: pure builders of the ComfyUI workflow a job runs.
- ``store``: the only writer of generation rows, one guarded statement per transition.
- ``placement``: the model catalog and server choice (reserve/release, failover target).
- ``live``: views, in-memory progress of running jobs, notifications to the observer.
- ``delivery``: how a job ends (images posted and completed, or failed/cancelled).
- ``follow``: following a queued prompt's events until it ends.
- ``runner``: a job's background task: queue, follow, deliver, failover.
- ``service``: :class:`GenerationService`, the facade the rest of the product uses.
"""

from core.generation.placement import CATALOG_TTL, ModelCatalog
from core.generation.service import GenerationService
from core.generation.types import (
    GenerationFailed,
    GenerationRequest,
    InputImage,
    JobObserver,
    JobView,
    ServerFailure,
    Viewer,
)
from core.generation.validation import INPUT_EXTENSIONS, MAX_INPUT_BYTES, check_input_size
from core.generation.workflow import upscale_workflow

__all__ = [
    "CATALOG_TTL",
    "INPUT_EXTENSIONS",
    "MAX_INPUT_BYTES",
    "GenerationFailed",
    "GenerationRequest",
    "GenerationService",
    "InputImage",
    "JobObserver",
    "JobView",
    "ModelCatalog",
    "ServerFailure",
    "Viewer",
    "check_input_size",
    "upscale_workflow",
]
