"""Facts recorded from a real ComfyUI 0.3.64, loaded from tests/data/comfyui-traces/.

The fake takes its response shapes from here (system_stats, object_info entries, model
folders, feature flags, tracebacks), so it cannot drift from what a real server sends.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

TRACE_DIR = Path(__file__).resolve().parent.parent / "data" / "comfyui-traces"


@functools.cache
def _load(name: str) -> dict[str, Any]:
    path = TRACE_DIR / (name if name.endswith(".json") else f"{name}.json")
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def load_trace(name: str) -> dict[str, Any]:
    """A fresh copy of one trace file (``"06_prompt_success_simple"``)."""
    return copy.deepcopy(_load(name))


def http_events(trace: dict[str, Any], *, path: str | None = None, label: str | None = None,
                method: str | None = None) -> list[dict[str, Any]]:
    out = []
    for event in trace["events"]:
        if event["kind"] != "http":
            continue
        request = event["request"]
        if path is not None and request["path"] != path:
            continue
        if method is not None and request["method"] != method:
            continue
        if label is not None and event.get("label") != label:
            continue
        out.append(event)
    return out


def ws_in(trace: dict[str, Any], ws: str | None = None) -> list[dict[str, Any]]:
    return [
        e for e in trace["events"]
        if e["kind"] == "ws_in" and (ws is None or e.get("ws") == ws)
    ]


def system_stats() -> dict[str, Any]:
    event = http_events(load_trace("02_system_stats"), path="/system_stats")[0]
    return dict(event["response"]["json"])


def model_folders() -> list[str]:
    return list(http_events(load_trace("04_models"), path="/models")[0]["response"]["json"])


def recorded_models() -> dict[str, list[str]]:
    """Folder -> files exactly as the recorded server had them."""
    trace = load_trace("04_models")
    models = {folder: [] for folder in model_folders()}
    for event in http_events(trace):
        path = event["request"]["path"]
        if path.startswith("/models/") and event["response"]["status"] == 200:
            models[path.split("/", 2)[2]] = list(event["response"]["json"])
    return models


def server_features() -> dict[str, Any]:
    return dict(http_events(load_trace("05_misc_gets"), path="/features")[0]["response"]["json"])


# Not among the 15 entries recorded in trace 03, but needed for img2img. Shape written in
# the recorded entries' style from ComfyUI's nodes.py (VAEEncode: pixels IMAGE, vae VAE).
_SUPPLEMENTARY_NODES: dict[str, Any] = {
    "VAEEncode": {
        "input": {"required": {"pixels": ["IMAGE"], "vae": ["VAE"]}},
        "input_order": {"required": ["pixels", "vae"]},
        "output": ["LATENT"],
        "output_is_list": [False],
        "output_name": ["LATENT"],
        "name": "VAEEncode",
        "display_name": "VAE Encode",
        "description": "",
        "python_module": "nodes",
        "category": "latent",
        "output_node": False,
    },
    # The two upscale nodes, as comfy_extras/nodes_upscale_model.py defines them; the
    # model_name combo is filled from the upscale_models folder like ckpt_name.
    "UpscaleModelLoader": {
        "input": {"required": {"model_name": [[], {}]}},
        "input_order": {"required": ["model_name"]},
        "output": ["UPSCALE_MODEL"],
        "output_is_list": [False],
        "output_name": ["UPSCALE_MODEL"],
        "name": "UpscaleModelLoader",
        "display_name": "Load Upscale Model",
        "description": "",
        "python_module": "comfy_extras.nodes_upscale_model",
        "category": "loaders",
        "output_node": False,
    },
    "ImageUpscaleWithModel": {
        "input": {"required": {"upscale_model": ["UPSCALE_MODEL"], "image": ["IMAGE"]}},
        "input_order": {"required": ["upscale_model", "image"]},
        "output": ["IMAGE"],
        "output_is_list": [False],
        "output_name": ["IMAGE"],
        "name": "ImageUpscaleWithModel",
        "display_name": "Upscale Image (using Model)",
        "description": "",
        "python_module": "comfy_extras.nodes_upscale_model",
        "category": "image/upscaling",
        "output_node": False,
    },
}


def object_info_entries() -> dict[str, Any]:
    """The complete node definitions recorded in trace 03, plus the supplement above."""
    trace = load_trace("03_object_info")
    full = http_events(trace, path="/object_info")[0]["response"]["json"]
    entries = dict(full["entries"])
    for name, definition in _SUPPLEMENTARY_NODES.items():
        entries.setdefault(name, copy.deepcopy(definition))
    return entries


def recorded_node_count() -> int:
    full = http_events(load_trace("03_object_info"), path="/object_info")[0]["response"]["json"]
    return int(full["node_count"])


def _execution_error(name: str) -> dict[str, Any]:
    for event in ws_in(load_trace(name)):
        message = event.get("message") or {}
        if message.get("type") == "execution_error":
            return dict(message["data"])
    raise LookupError(name)


def save_image_error() -> dict[str, Any]:
    """The execution_error of SaveImage with a prefix outside the output folder (09)."""
    return _execution_error("09_execution_error")


def corrupt_checkpoint_error() -> dict[str, Any]:
    """The execution_error of CheckpointLoaderSimple on a corrupt file (09b)."""
    return _execution_error("09b_execution_error_corrupt_checkpoint")


def inner_validation_traceback() -> list[str]:
    """Traceback of the KeyError for a link to a missing node (trace 08)."""
    event = http_events(load_trace("08_prompt_validation_errors"), label="link_to_missing_node")[0]
    node_errors = event["response"]["json"]["node_errors"]
    return list(node_errors["2"]["errors"][0]["extra_info"]["traceback"])
