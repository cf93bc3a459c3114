"""Pure builders of the ComfyUI workflow a job runs.

The runner reads the input image and uploads it (I/O); everything after that, turning a
job's stored parameters into a workflow, is here and needs no server.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from core.comfy.workflows import GenerationParams, LoraSpec, apply_param_map, build_workflow
from core.generation.types import GenerationFailed


@dataclass(frozen=True, slots=True)
class JobSpec:
    """What the workflow of a job is built from, read once per attempt."""

    parameters: dict[str, Any]
    prompt: str
    negative: str
    custom: tuple[dict[str, Any], dict[str, Any]] | None  # (workflow, param map)


def upscale_workflow(image: str, model: str, job_id: int) -> dict[str, Any]:
    """LoadImage -> UpscaleModelLoader + ImageUpscaleWithModel -> SaveImage."""
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": model}},
        "3": {
            "class_type": "ImageUpscaleWithModel",
            "inputs": {"upscale_model": ["2", 0], "image": ["1", 0]},
        },
        "4": {
            "class_type": "SaveImage",
            "inputs": {"images": ["3", 0], "filename_prefix": f"comfyvast/upscale-{job_id}"},
        },
    }


def job_workflow(job_id: int, spec: JobSpec, uploaded: str | None) -> dict[str, Any]:
    """The workflow for one attempt; ``uploaded`` is the input image's name on the server."""
    p = spec.parameters
    if p.get("kind") == "upscale":
        if uploaded is None:
            raise GenerationFailed("Nothing to upscale.")
        return upscale_workflow(uploaded, p["upscale_model"], job_id)
    if spec.custom is not None:
        custom_workflow, mapping = spec.custom
        values: dict[str, Any] = {}
        for key, value in (
            ("prompt", spec.prompt),
            ("negative", spec.negative),
            ("seed", p.get("seed")),
            ("steps", p.get("steps")),
            ("cfg", p.get("cfg")),
            ("width", p.get("width")),
            ("height", p.get("height")),
            ("model", p.get("model")),
            ("sampler", p.get("sampler")),
            ("scheduler", p.get("scheduler")),
            ("batch", p.get("batch")),
            ("image", uploaded),
        ):
            if key in mapping and value is not None:
                values[key] = value
        return apply_param_map(
            custom_workflow, {k: [tuple(t) for t in v] for k, v in mapping.items()}, values
        )
    loras = (LoraSpec(p["lora"], float(p.get("lora_strength", 1.0))),) if p.get("lora") else ()
    params = GenerationParams(
        prompt=spec.prompt,
        negative=spec.negative,
        model=p["model"],
        width=p["width"],
        height=p["height"],
        steps=p["steps"],
        cfg=p["cfg"],
        seed=p["seed"],
        sampler=p["sampler"],
        scheduler=p["scheduler"],
        batch=p["batch"],
        loras=loras,
        init_image=uploaded,
        denoise=float(p.get("denoise", 1.0)),
        filename_prefix=f"comfyvast/job-{job_id}",
    )
    return build_workflow(params)
