"""Pure checks of a generation request against the configured limits.

Nothing here reads the database: the rate-limit check gets the caller's counts from the
store and only decides.
"""

from __future__ import annotations

from pathlib import Path

from core.config import LimitsSettings
from core.errors import RateLimited, ValidationFailed
from core.generation.types import GenerationRequest

INPUT_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp"}
MAX_INPUT_BYTES = 20 * 1024 * 1024


def check_input_size(size: int) -> None:
    """Refuse an input image over MAX_INPUT_BYTES (the cog checks before downloading it)."""
    if size > MAX_INPUT_BYTES:
        raise ValidationFailed("The input image is larger than 20 MB.")


def validate(req: GenerationRequest, limits: LimitsSettings) -> None:
    """Refuse a request whose prompt, size, sampling settings or input image are out of
    bounds; the first problem found is the sentence shown."""
    prompt = req.prompt.strip()
    if not prompt and req.kind != "upscale":
        raise ValidationFailed("The prompt must not be empty.")
    if len(req.prompt) > limits.max_prompt_length:
        raise ValidationFailed(
            f"The prompt is {len(req.prompt)} characters; the limit is "
            f"{limits.max_prompt_length}."
        )
    if len(req.negative) > limits.max_prompt_length:
        raise ValidationFailed(
            f"The negative prompt is longer than {limits.max_prompt_length} characters."
        )
    for label, value, maximum in (
        ("Width", req.width, limits.max_width),
        ("Height", req.height, limits.max_height),
    ):
        if value % 8 or not limits.min_size <= value <= maximum:
            raise ValidationFailed(
                f"{label} must be a multiple of 8 between {limits.min_size} and {maximum}."
            )
    if not 1 <= req.steps <= limits.max_steps:
        raise ValidationFailed(f"Steps must be between 1 and {limits.max_steps}.")
    if not 0 < req.cfg <= limits.max_cfg:
        raise ValidationFailed(f"CFG must be above 0 and at most {limits.max_cfg:g}.")
    if not 1 <= req.batch <= limits.max_batch:
        raise ValidationFailed(f"Batch must be between 1 and {limits.max_batch}.")
    if req.seed is not None and not 0 <= req.seed < 2**64:
        raise ValidationFailed("The seed must be between 0 and 18446744073709551615.")
    if not 0.0 < req.denoise <= 1.0:
        raise ValidationFailed("Denoise must be above 0 and at most 1.")
    if not -10.0 <= req.lora_strength <= 10.0:
        raise ValidationFailed("LoRA strength must be between -10 and 10.")
    if req.image is not None:
        suffix = Path(req.image.filename).suffix.lower()
        if suffix not in INPUT_EXTENSIONS:
            raise ValidationFailed("The input image must be a PNG, JPEG or WebP file.")
        check_input_size(len(req.image.data))
    if req.kind == "upscale" and (req.image is None or not req.upscale_model):
        raise ValidationFailed("Upscaling needs an image and an upscale model.")


def check_rate_limits(limits: LimitsSettings, *, active: int, recent: int, count: int) -> None:
    """Refuse ``count`` more jobs for a member with ``active`` jobs in progress and
    ``recent`` started in the last minute."""
    if active + count > limits.user_concurrent_jobs:
        if count > 1:
            raise RateLimited(
                f"That needs {count} job slots and you have {active} job(s) in progress "
                f"(the limit is {limits.user_concurrent_jobs})."
            )
        raise RateLimited(
            f"You already have {active} job(s) in progress (the limit is "
            f"{limits.user_concurrent_jobs}); wait for one to finish or cancel it."
        )
    if recent + count > limits.user_jobs_per_minute:
        raise RateLimited(
            f"You can start {limits.user_jobs_per_minute} jobs a minute; "
            "try again in a minute.",
            retry_after=60.0,
        )
