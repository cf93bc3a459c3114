"""Workflows in ComfyUI's API format: the built-in templates and custom workflows.

API format is ``{node_id: {"class_type": str, "inputs": {name: value | [node_id, slot]}}}``
(a link is a two-item list). Node class and input names are exactly those of the real
server's ``/object_info`` (trace 03); the txt2img node ids are the ones ComfyUI's default
graph uses and the traces were recorded with: 4 checkpoint, 6/7 text, 5 latent,
3 KSampler, 8 VAEDecode, 9 SaveImage (traces 06 and 10).
"""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from core.errors import ValidationFailed

Workflow = dict[str, dict[str, Any]]
# {param_name: [(node_id, input_name), ...]}: where a user-facing parameter goes.
ParamMap = dict[str, list[tuple[str, str]]]

# Bounds copied from object_info (trace 03): KSampler, EmptyLatentImage, LoraLoader.
SEED_MAX = 18446744073709551615
SIZE_MIN, SIZE_MAX, SIZE_STEP = 16, 16384, 8
STEPS_MAX = 10000
CFG_MAX = 100.0
BATCH_MAX = 4096
LORA_STRENGTH_LIMIT = 100.0

# Node ids of the built-in graph.
CHECKPOINT, POSITIVE, NEGATIVE, LATENT, SAMPLER, DECODE, SAVE = "4", "6", "7", "5", "3", "8", "9"
LOAD_IMAGE, ENCODE = "10", "11"
LORA_FIRST_ID = 20  # LoRA nodes are "20", "21", ... chained in order


@dataclass(frozen=True, slots=True)
class LoraSpec:
    name: str
    strength_model: float = 1.0
    strength_clip: float | None = None  # None: same as strength_model


@dataclass(frozen=True, slots=True)
class GenerationParams:
    """What a user can set for the built-in txt2img/img2img template."""

    prompt: str
    model: str
    negative: str = ""
    width: int = 512
    height: int = 512
    steps: int = 20
    cfg: float = 7.0
    seed: int | None = None  # None: a random seed is drawn when the workflow is built
    sampler: str = "euler"
    scheduler: str = "normal"
    batch: int = 1
    loras: tuple[LoraSpec, ...] = ()
    # img2img: the LoadImage value of an uploaded image ("subfolder/name.png") and how
    # much of it to repaint (1.0 = ignore it entirely).
    init_image: str | None = None
    denoise: float = 1.0
    filename_prefix: str = "comfyvast"
    extra: dict[str, Any] = field(default_factory=dict)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValidationFailed(message)


def validate_params(params: GenerationParams) -> None:
    """Reject values ComfyUI would reject, with a sentence the user understands."""
    _check(bool(params.prompt.strip()), "The prompt must not be empty.")
    _check(bool(params.model), "Choose a checkpoint model.")
    for label, value in (("Width", params.width), ("Height", params.height)):
        _check(
            SIZE_MIN <= value <= SIZE_MAX and value % SIZE_STEP == 0,
            f"{label} must be a multiple of {SIZE_STEP} between {SIZE_MIN} and {SIZE_MAX}.",
        )
    _check(1 <= params.steps <= STEPS_MAX, f"Steps must be between 1 and {STEPS_MAX}.")
    _check(0.0 <= params.cfg <= CFG_MAX, f"CFG must be between 0 and {CFG_MAX:g}.")
    _check(1 <= params.batch <= BATCH_MAX, f"Batch size must be between 1 and {BATCH_MAX}.")
    _check(
        params.seed is None or 0 <= params.seed <= SEED_MAX,
        f"The seed must be between 0 and {SEED_MAX}.",
    )
    _check(0.0 <= params.denoise <= 1.0, "Denoise must be between 0 and 1.")
    for lora in params.loras:
        _check(bool(lora.name), "A LoRA needs a name.")
        for strength in (lora.strength_model, lora.strength_clip):
            _check(
                strength is None or abs(strength) <= LORA_STRENGTH_LIMIT,
                f"LoRA strength must be between -{LORA_STRENGTH_LIMIT:g} and "
                f"{LORA_STRENGTH_LIMIT:g}.",
            )
    _check(
        "\\" not in params.filename_prefix and ".." not in params.filename_prefix,
        "The file name prefix may not contain '..' or backslashes.",
    )


def resolve_seed(seed: int | None) -> int:
    return random.randint(0, 2**32 - 1) if seed is None else seed  # noqa: S311


def build_workflow(params: GenerationParams) -> Workflow:
    """The built-in graph: txt2img, or img2img when ``params.init_image`` is set.

    The seed is resolved here (random if None): read it back from node 3 to show it.
    """
    validate_params(params)
    model_out: list[Any] = [CHECKPOINT, 0]
    clip_out: list[Any] = [CHECKPOINT, 1]
    wf: Workflow = {
        CHECKPOINT: {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": params.model}},
    }
    # LoRAs sit between the checkpoint and every MODEL/CLIP consumer, chained in order.
    for index, lora in enumerate(params.loras):
        node_id = str(LORA_FIRST_ID + index)
        strength_clip = lora.strength_model if lora.strength_clip is None else lora.strength_clip
        wf[node_id] = {
            "class_type": "LoraLoader",
            "inputs": {
                "model": model_out,
                "clip": clip_out,
                "lora_name": lora.name,
                "strength_model": float(lora.strength_model),
                "strength_clip": float(strength_clip),
            },
        }
        model_out, clip_out = [node_id, 0], [node_id, 1]
    wf[POSITIVE] = {
        "class_type": "CLIPTextEncode",
        "inputs": {"text": params.prompt, "clip": clip_out},
    }
    wf[NEGATIVE] = {
        "class_type": "CLIPTextEncode",
        "inputs": {"text": params.negative, "clip": list(clip_out)},
    }
    if params.init_image:
        wf[LOAD_IMAGE] = {"class_type": "LoadImage", "inputs": {"image": params.init_image}}
        wf[ENCODE] = {
            "class_type": "VAEEncode",
            "inputs": {"pixels": [LOAD_IMAGE, 0], "vae": [CHECKPOINT, 2]},
        }
        latent: list[Any] = [ENCODE, 0]
        denoise = params.denoise
    else:
        wf[LATENT] = {
            "class_type": "EmptyLatentImage",
            "inputs": {"width": params.width, "height": params.height, "batch_size": params.batch},
        }
        latent = [LATENT, 0]
        denoise = 1.0
    wf[SAMPLER] = {
        "class_type": "KSampler",
        "inputs": {
            "seed": resolve_seed(params.seed),
            "steps": params.steps,
            "cfg": float(params.cfg),
            "sampler_name": params.sampler,
            "scheduler": params.scheduler,
            "denoise": float(denoise),
            "model": model_out,
            "positive": [POSITIVE, 0],
            "negative": [NEGATIVE, 0],
            "latent_image": latent,
        },
    }
    wf[DECODE] = {
        "class_type": "VAEDecode",
        "inputs": {"samples": [SAMPLER, 0], "vae": [CHECKPOINT, 2]},
    }
    wf[SAVE] = {
        "class_type": "SaveImage",
        "inputs": {"images": [DECODE, 0], "filename_prefix": params.filename_prefix},
    }
    return wf


def build_txt2img(params: GenerationParams) -> Workflow:
    if params.init_image:
        raise ValidationFailed("txt2img does not take an input image.")
    return build_workflow(params)


def build_img2img(params: GenerationParams, image: str) -> Workflow:
    """img2img from an uploaded image (the LoadImage value, e.g. ``discord/x.png``)."""
    from dataclasses import replace

    return build_workflow(replace(params, init_image=image))


def workflow_seed(workflow: Mapping[str, Any]) -> int | None:
    """The seed of the first KSampler, to show the user what was used."""
    for node in workflow.values():
        if node.get("class_type") == "KSampler":
            seed = node.get("inputs", {}).get("seed")
            return seed if isinstance(seed, int) else None
    return None


# ---------------------------------------------------------------------------------------
# Custom workflows


def is_link(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], str)
        and isinstance(value[1], int)
        and not isinstance(value[1], bool)
    )


# An API workflow is node -> inputs -> value, and a value is at most a small list or
# object: real exports stay under 10 levels. Deeper JSON is refused before anything
# recursive (copy.deepcopy, the JSON column, aiohttp's json.dumps) meets it.
MAX_WORKFLOW_DEPTH = 32


def json_depth_exceeds(value: Any, limit: int) -> bool:
    """True if ``value`` nests lists/objects deeper than ``limit`` (iterative: no
    RecursionError however deep the input is)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Iterable[Any] = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def load_api_workflow(text: str | bytes) -> Workflow:
    """Parse a workflow exported with "Save (API Format)"; reject the UI format clearly."""
    try:
        data = json.loads(text)
    except RecursionError:
        # json's C decoder recurses per level; thousands of "[" raise this.
        raise ValidationFailed(
            f"The workflow is nested too deeply (more than {MAX_WORKFLOW_DEPTH} levels)."
        ) from None
    except ValueError as exc:
        raise ValidationFailed("The workflow file is not valid JSON.") from exc
    if json_depth_exceeds(data, MAX_WORKFLOW_DEPTH):
        raise ValidationFailed(
            f"The workflow is nested too deeply (more than {MAX_WORKFLOW_DEPTH} levels)."
        )
    if not isinstance(data, dict):
        raise ValidationFailed("The workflow must be a JSON object.")
    if "nodes" in data and "links" in data:
        raise ValidationFailed(
            "This is a ComfyUI UI workflow; export it with 'Save (API Format)' instead."
        )
    if "prompt" in data and isinstance(data["prompt"], dict) and len(data) <= 3:
        data = data["prompt"]  # a saved POST /prompt body
    for node_id, node in data.items():
        if not isinstance(node, dict) or not isinstance(node.get("inputs", {}), dict):
            raise ValidationFailed(f"Node {node_id} of the workflow is not a valid API node.")
        if not isinstance(node.get("class_type"), str):
            raise ValidationFailed(f"Node {node_id} of the workflow has no class_type.")
    return {str(k): v for k, v in data.items()}


def param_map_problems(workflow: Mapping[str, Any], param_map: ParamMap) -> list[str]:
    """Targets of a parameter map that do not exist in the workflow."""
    problems: list[str] = []
    for param, targets in param_map.items():
        if not targets:
            problems.append(f"parameter {param!r} has no target")
        for node_id, input_name in targets:
            node = workflow.get(node_id)
            if node is None:
                problems.append(f"parameter {param!r}: node {node_id} does not exist")
            elif input_name not in node.get("inputs", {}):
                problems.append(
                    f"parameter {param!r}: node {node_id} ({node.get('class_type')}) "
                    f"has no input {input_name!r}"
                )
            elif is_link(node["inputs"][input_name]):
                problems.append(
                    f"parameter {param!r}: input {input_name!r} of node {node_id} is a link"
                )
    return problems


def apply_param_map(
    workflow: Mapping[str, Any], param_map: ParamMap, values: Mapping[str, Any]
) -> Workflow:
    """A copy of ``workflow`` with each value written to every target of its parameter.

    Parameters without a value keep the workflow's own value; a value for a parameter
    the map does not know is an error (probably a typo).
    """
    unknown = sorted(set(values) - set(param_map))
    if unknown:
        raise ValidationFailed(f"This workflow has no parameter named {unknown[0]!r}.")
    problems = param_map_problems(workflow, {k: param_map[k] for k in values})
    if problems:
        raise ValidationFailed(f"The workflow's parameter map is broken: {problems[0]}.")
    result: Workflow = copy.deepcopy(dict(workflow))
    for param, value in values.items():
        for node_id, input_name in param_map[param]:
            result[node_id]["inputs"][input_name] = copy.deepcopy(value)
    return result


def output_nodes(workflow: Mapping[str, Any], object_info: Mapping[str, Any]) -> list[str]:
    return [
        node_id
        for node_id, node in workflow.items()
        if (object_info.get(node.get("class_type")) or {}).get("output_node")
    ]


def _input_spec(definition: Mapping[str, Any]) -> dict[str, list[Any]]:
    spec: dict[str, list[Any]] = {}
    inputs = definition.get("input") or {}
    for section in ("required", "optional", "hidden"):
        for name, value in (inputs.get(section) or {}).items():
            spec[name] = value if isinstance(value, list) else [value]
    return spec


def validate_against_object_info(
    workflow: Mapping[str, Any], object_info: Mapping[str, Any]
) -> list[str]:
    """Problems ComfyUI would reject (or silently ignore), found before queueing.

    Checks unknown class types, unknown input names (ComfyUI ignores them, so they are
    usually typos in a parameter map), missing required inputs, links to missing nodes
    or to an output slot of the wrong type, and combo values not in the server's list
    (e.g. a checkpoint that is not installed). An empty list means no problem found.
    """
    problems: list[str] = []
    has_output = False
    for node_id, node in workflow.items():
        class_type = node.get("class_type")
        definition = object_info.get(class_type) if isinstance(class_type, str) else None
        if not definition:
            problems.append(f"node {node_id}: unknown node type {class_type!r}")
            continue
        has_output = has_output or bool(definition.get("output_node"))
        spec = _input_spec(definition)
        inputs = node.get("inputs") or {}
        hidden = set(((definition.get("input") or {}).get("hidden") or {}).keys())
        for name in inputs:
            if name not in spec or name in hidden:
                problems.append(f"node {node_id} ({class_type}): unknown input {name!r}")
        for name in ((definition.get("input") or {}).get("required") or {}):
            if name not in inputs:
                problems.append(
                    f"node {node_id} ({class_type}): required input {name!r} is missing"
                )
        for name, value in inputs.items():
            if name not in spec:
                continue
            wanted = spec[name][0] if spec[name] else None
            if is_link(value):
                source = workflow.get(value[0])
                if source is None:
                    problems.append(
                        f"node {node_id} ({class_type}): input {name!r} links to missing node "
                        f"{value[0]}"
                    )
                    continue
                source_def = object_info.get(source.get("class_type")) or {}
                if not isinstance(source_def, dict):
                    source_def = {}
                outputs = source_def.get("output") or []
                if not isinstance(outputs, list):
                    outputs = []
                if source_def and not 0 <= value[1] < len(outputs):
                    problems.append(
                        f"node {node_id} ({class_type}): input {name!r} links to output "
                        f"{value[1]} of node {value[0]}, which has {len(outputs)}"
                    )
                elif source_def and isinstance(wanted, str) and not _types_match(
                    outputs[value[1]], wanted
                ):
                    problems.append(
                        f"node {node_id} ({class_type}): input {name!r} expects {wanted} but "
                        f"node {value[0]} gives {outputs[value[1]]}"
                    )
            elif isinstance(wanted, list) and wanted and value not in wanted:
                # LoadImage validates its own files (subfolders allowed), so skip it.
                if class_type != "LoadImage":
                    problems.append(
                        f"node {node_id} ({class_type}): {name} {value!r} is not in the list "
                        "of available values"
                    )
    if workflow and not has_output:
        problems.append("the workflow has no output node (e.g. SaveImage)")
    return problems


def _types_match(given: Any, wanted: str) -> bool:
    if given == "*" or wanted == "*":
        return True
    given_set = set(str(given).split(","))
    return any(t in given_set for t in wanted.split(","))


def required_models(workflow: Mapping[str, Any]) -> dict[str, set[str]]:
    """Model files a workflow refers to, by model folder (for pre-download checks)."""
    folders = {
        ("CheckpointLoaderSimple", "ckpt_name"): "checkpoints",
        ("LoraLoader", "lora_name"): "loras",
        ("VAELoader", "vae_name"): "vae",
        ("UpscaleModelLoader", "model_name"): "upscale_models",
        ("ControlNetLoader", "control_net_name"): "controlnet",
    }
    found: dict[str, set[str]] = {}
    for node in workflow.values():
        for (class_type, input_name), folder in folders.items():
            value = node.get("inputs", {}).get(input_name)
            if node.get("class_type") == class_type and isinstance(value, str):
                found.setdefault(folder, set()).add(value)
    return found


def make_param_map(pairs: Iterable[tuple[str, Sequence[str]]]) -> ParamMap:
    """Build a ParamMap from ``("seed", ["3", "seed"])``-style pairs (config files)."""
    out: ParamMap = {}
    for param, (node_id, input_name) in pairs:
        out.setdefault(param, []).append((str(node_id), str(input_name)))
    return out
