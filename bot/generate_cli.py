"""`python -m bot generate`: one generation against a ComfyUI URL, without Discord."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any, TextIO

import aiohttp

from core.comfy.client import ComfyClient
from core.comfy.events import Executing, Progress, PromptDone
from core.comfy.stream import ComfyEventStream
from core.comfy.workflows import (
    GenerationParams,
    apply_param_map,
    build_workflow,
    load_api_workflow,
    workflow_seed,
)
from core.config import Settings
from core.errors import ComfyVastError, ValidationFailed
from core.workflow_store import infer_param_map

INT_PARAMS = {"width", "height", "steps", "seed", "batch"}
FLOAT_PARAMS = {"cfg", "denoise"}


def add_generate_parser(sub: Any) -> None:
    p = sub.add_parser("generate", help="run one generation against a ComfyUI URL")
    p.add_argument("prompt", help="what to draw")
    p.add_argument("--comfy-url", required=True, help="ComfyUI's address, e.g. http://host:8188")
    p.add_argument(
        "--workflow", type=Path, help="an API-format workflow file (default: the built-in txt2img)"
    )
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="K=V",
        help="model, negative, width, height, steps, cfg, seed, sampler, scheduler, "
        "batch; or NODE.INPUT=VALUE for a custom workflow (repeatable)",
    )
    p.add_argument("--out", type=Path, default=Path("."), help="directory for the images")
    p.add_argument("--timeout", type=float, default=1800.0, help="give up after N seconds")


def parse_params(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValidationFailed(f"'{pair}' is not K=V.")
        value: Any = raw
        try:
            if key in INT_PARAMS:
                value = int(raw)
            elif key in FLOAT_PARAMS:
                value = float(raw)
            elif "." in key:
                value = json.loads(raw)
        except ValueError:
            if key in INT_PARAMS | FLOAT_PARAMS:
                raise ValidationFailed(f"'{key}' needs a number, not '{raw}'.") from None
        out[key] = value
    return out


async def build(
    client: ComfyClient, prompt: str, workflow_file: Path | None, params: dict[str, Any]
) -> dict[str, Any]:
    if workflow_file is not None:
        workflow = load_api_workflow(await asyncio.to_thread(workflow_file.read_bytes))
        direct = {k: v for k, v in params.items() if "." in k}
        named = {k: v for k, v in params.items() if "." not in k}
        named["prompt"] = prompt
        mapping = infer_param_map(workflow)
        unknown = sorted(set(named) - set(mapping))
        if unknown:
            raise ValidationFailed(
                f"The workflow has no '{unknown[0]}' parameter; use NODE.INPUT=VALUE."
            )
        workflow = apply_param_map(workflow, mapping, named)
        for key, value in direct.items():
            node, _, field = key.partition(".")
            if node not in workflow:
                raise ValidationFailed(f"The workflow has no node {node}.")
            workflow[node].setdefault("inputs", {})[field] = value
        return workflow
    model = params.pop("model", None)
    if model is None:
        models = await client.list_models("checkpoints")
        if not models:
            raise ValidationFailed("The server has no checkpoint models.")
        model = sorted(models)[0]
    allowed = {
        "negative",
        "width",
        "height",
        "steps",
        "cfg",
        "seed",
        "sampler",
        "scheduler",
        "batch",
    }
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ValidationFailed(f"Unknown parameter '{unknown[0]}'.")
    return build_workflow(GenerationParams(prompt=prompt, model=model, **params))


def _bar(done: int, total: int, started: float, out: TextIO) -> None:
    width = 30
    filled = int(width * done / max(total, 1))
    rate = done / max(time.monotonic() - started, 1e-6)
    eta = (total - done) / rate if rate > 0 else 0.0
    out.write(
        f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} "
        f"{100 * done // max(total, 1):3d}% ETA {eta:4.0f}s"
    )
    out.flush()


async def generate_once(
    url: str,
    prompt: str,
    *,
    workflow_file: Path | None,
    params: dict[str, Any],
    out_dir: Path,
    timeout: float,
    progress: TextIO = sys.stderr,
) -> list[Path]:
    """Queue one prompt, follow it with a progress bar, write the images."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, connect=10)) as http:
        client = ComfyClient(url, http)
        workflow = await build(client, prompt, workflow_file, dict(params))
        stream = ComfyEventStream(url, http, client.client_id, client=client)
        await stream.start(wait=True, timeout=15)
        try:
            prompt_id = str(uuid.uuid4())
            sub = stream.subscribe(prompt_id)
            await client.queue_prompt(workflow, prompt_id=prompt_id)
            started = time.monotonic()
            deadline = started + timeout
            while True:
                event = await sub.get(timeout=max(deadline - time.monotonic(), 0.01))
                if isinstance(event, Progress):
                    _bar(event.value, event.max, started, progress)
                elif isinstance(event, Executing) and event.node:
                    node = workflow.get(event.node, {}).get("class_type", event.node)
                    progress.write(f"\r{'':60}\r{node}…")
                    progress.flush()
                elif isinstance(event, PromptDone):
                    progress.write("\n")
                    event.raise_for_status()
                    outputs = list(event.outputs) or await client.get_prompt_outputs(prompt_id)
                    break
        finally:
            await stream.close()
        await asyncio.to_thread(out_dir.mkdir, parents=True, exist_ok=True)
        written = []
        for image in outputs:
            if image.type != "output":
                continue
            path = out_dir / Path(image.filename).name
            await asyncio.to_thread(path.write_bytes, await client.view_image(image))
            written.append(path)
        seed = workflow_seed(workflow)
        if seed is not None:
            progress.write(f"seed {seed}\n")
        return written


async def run_generate(settings: Settings, args: argparse.Namespace) -> int:
    try:
        paths = await generate_once(
            args.comfy_url.rstrip("/"),
            args.prompt,
            workflow_file=args.workflow,
            params=parse_params(args.param),
            out_dir=args.out,
            timeout=args.timeout,
        )
    except ComfyVastError as exc:
        print(f"\ncomfyvast: {exc}", file=sys.stderr)
        return 1
    except TimeoutError:
        print(
            f"\ncomfyvast: the generation did not finish within {args.timeout:.0f} s.",
            file=sys.stderr,
        )
        return 1
    except OSError as exc:
        print(f"\ncomfyvast: {exc}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0
