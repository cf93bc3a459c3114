"""Custom ComfyUI workflows (API format) with named parameters, stored in the database."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from core.audit import OUTCOME_OK, Actor, AuditService
from core.comfy.errors import ComfyError
from core.comfy.pool import ComfyPool
from core.comfy.workflows import (
    ParamMap,
    is_link,
    load_api_workflow,
    param_map_problems,
    validate_against_object_info,
)
from core.db.engine import SessionFactory
from core.db.models import ComfyWorkflow
from core.errors import NotFound, ValidationFailed
from core.servers import ServerRegistry

log = logging.getLogger(__name__)

PARAM_NAMES = (
    "prompt",
    "negative",
    "seed",
    "steps",
    "cfg",
    "width",
    "height",
    "model",
    "sampler",
    "scheduler",
    "batch",
    "image",
)
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
SPEC_RE = re.compile(r"^\s*([a-z_]+)\s*=\s*([0-9A-Za-z_:-]+)\.([A-Za-z0-9_]+)\s*$")
MAX_WORKFLOW_BYTES = 512 * 1024


@dataclass(frozen=True, slots=True)
class WorkflowInfo:
    id: int
    name: str
    nodes: int
    params: dict[str, list[list[str]]]
    warnings: tuple[str, ...] = ()


def parse_param_spec(spec: str) -> ParamMap:
    """``"prompt=6.text, seed=3.seed"`` -> {"prompt": [("6", "text")], "seed": [("3", "seed")]}."""
    out: ParamMap = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        match = SPEC_RE.match(part)
        if not match:
            raise ValidationFailed(
                f"'{part}' is not a parameter mapping; write name=node.input, e.g. seed=3.seed."
            )
        name, node, field = match.groups()
        if name not in PARAM_NAMES:
            raise ValidationFailed(f"Unknown parameter '{name}'; known: {', '.join(PARAM_NAMES)}.")
        out.setdefault(name, []).append((node, field))
    return out


def infer_param_map(workflow: dict[str, Any]) -> ParamMap:
    """Guess the usual parameters from well-known nodes (KSampler, CLIPTextEncode, ...)."""
    out: ParamMap = {}

    def add(name: str, node_id: str, field: str) -> None:
        value = workflow[node_id].get("inputs", {}).get(field)
        if value is not None and not is_link(value):
            out.setdefault(name, []).append((node_id, field))

    for node_id, node in workflow.items():
        kind = node.get("class_type")
        inputs = node.get("inputs", {})
        if kind in ("KSampler", "KSamplerAdvanced"):
            for field, name in (
                ("seed", "seed"),
                ("noise_seed", "seed"),
                ("steps", "steps"),
                ("cfg", "cfg"),
                ("sampler_name", "sampler"),
                ("scheduler", "scheduler"),
            ):
                if field in inputs:
                    add(name, node_id, field)
            for field, name in (("positive", "prompt"), ("negative", "negative")):
                link = inputs.get(field)
                if (
                    is_link(link)
                    and workflow.get(link[0], {}).get("class_type") == "CLIPTextEncode"
                ):
                    add(name, link[0], "text")
        elif kind in ("EmptyLatentImage", "EmptySD3LatentImage"):
            add("width", node_id, "width")
            add("height", node_id, "height")
            add("batch", node_id, "batch_size")
        elif kind == "CheckpointLoaderSimple":
            add("model", node_id, "ckpt_name")
        elif kind == "LoadImage":
            add("image", node_id, "image")
    return {k: sorted(set(v)) for k, v in out.items()}


class WorkflowStore:
    def __init__(
        self,
        sessions: SessionFactory,
        audit: AuditService,
        registry: ServerRegistry,
        pool: ComfyPool,
    ) -> None:
        self._sessions = sessions
        self._audit = audit
        self._registry = registry
        self._pool = pool

    async def add(
        self,
        actor: Actor,
        name: str,
        text: bytes,
        *,
        params: str | None = None,
        server: str | None = None,
    ) -> WorkflowInfo:
        name = name.strip().lower()
        if not NAME_RE.match(name):
            raise ValidationFailed(
                "Workflow names are 1-32 characters: lowercase letters, digits, - and _."
            )
        if len(text) > MAX_WORKFLOW_BYTES:
            raise ValidationFailed("The workflow file is larger than 512 KB.")
        workflow = load_api_workflow(text)
        param_map = parse_param_spec(params) if params else infer_param_map(workflow)
        problems = param_map_problems(workflow, param_map)
        if problems:
            raise ValidationFailed(f"The parameter mapping does not fit: {problems[0]}.")
        if "prompt" not in param_map:
            raise ValidationFailed(
                "The workflow needs a 'prompt' parameter: map it with params, e.g. prompt=6.text."
            )
        warnings = await self._validate_on_server(workflow, server)
        async with self._sessions.begin() as session:
            exists = (
                await session.scalars(select(ComfyWorkflow.id).where(ComfyWorkflow.name == name))
            ).first()
            if exists is not None:
                raise ValidationFailed(f"A workflow named '{name}' exists; remove it first.")
            row = ComfyWorkflow(
                name=name,
                workflow=workflow,
                param_map={k: [list(t) for t in v] for k, v in param_map.items()},
                created_by=actor.user_id,
            )
            session.add(row)
            await session.flush()
            info = WorkflowInfo(row.id, name, len(workflow), dict(row.param_map), tuple(warnings))
        await self._audit.record(
            actor,
            "workflow add",
            outcome=OUTCOME_OK,
            resource=name,
            details={"params": sorted(param_map)},
        )
        return info

    async def _validate_on_server(self, workflow: dict[str, Any], server: str | None) -> list[str]:
        """Check node types and inputs against a running server's /object_info.

        Values that are simply not installed there (a checkpoint name) are warnings: the
        workflow may run on another server. Everything else refuses the workflow.
        """
        candidates = (
            [await self._registry.get(server)]
            if server
            else [s for s in await self._registry.list() if s.is_ready]
        )
        for candidate in candidates:
            try:
                conn = await self._pool.get(candidate)
                info = await conn.client.object_info()
            except (ComfyError, Exception) as exc:  # noqa: BLE001 - try the next server
                log.warning("object_info from %s failed: %s", candidate.name, exc)
                continue
            problems = validate_against_object_info(workflow, info)
            errors = [p for p in problems if "not in the list of available values" not in p]
            if errors:
                raise ValidationFailed(
                    f"ComfyUI on '{candidate.name}' would reject this workflow: {errors[0]}."
                )
            return [p for p in problems if p not in errors]
        raise ValidationFailed("No running server answered; a workflow is checked against one.")

    async def list(self) -> list[WorkflowInfo]:
        async with self._sessions() as session:
            rows = (await session.scalars(select(ComfyWorkflow).order_by(ComfyWorkflow.name))).all()
        return [WorkflowInfo(r.id, r.name, len(r.workflow), dict(r.param_map)) for r in rows]

    async def names(self) -> list[str]:
        return [w.name for w in await self.list()]

    async def remove(self, actor: Actor, name: str) -> None:
        async with self._sessions.begin() as session:
            row = (
                await session.scalars(select(ComfyWorkflow).where(ComfyWorkflow.name == name))
            ).first()
            if row is None:
                raise NotFound(f"There is no workflow named '{name}'.")
            await session.delete(row)
        await self._audit.record(actor, "workflow remove", outcome=OUTCOME_OK, resource=name)
