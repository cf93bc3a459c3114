"""What the cache decides from: each model file's size on the server, its last use (from
the generations that named it), the models queued or running jobs need, and the pins.

Generation rows are only read here, column by column (``core.generation.store`` is the
one writer, and whole rows are never loaded outside it); the pins are this package's own
table.
"""

from __future__ import annotations

import datetime as dt
import logging
import shlex
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, or_, select
from sqlalchemy.exc import IntegrityError

from core.db.engine import SessionFactory
from core.db.models import ComfyGeneration, ComfyWorkflow, GenerationStatus, ModelPin
from core.errors import ExternalServiceError
from core.model_files.shell import COMMAND_TIMEOUT, MARK, ServerShell
from core.model_files.types import MODEL_EXTENSIONS, MODEL_FOLDERS
from core.servers import ServerView

log = logging.getLogger(__name__)

# (folder, file name relative to the folder)
ModelKey = tuple[str, str]

# Jobs that have not ended: the models they name must stay on their server.
ACTIVE_STATUSES = tuple(s.value for s in GenerationStatus if not s.finished)

# The folder of a model a saved workflow names: its nodes say only the file name, so it is
# protected in every folder.
ANY_FOLDER = "*"

# Which job parameter names a model in which folder (core.generation.types.job_parameters).
PARAMETER_FOLDERS: tuple[tuple[str, str], ...] = (
    ("model", "checkpoints"),
    ("lora", "loras"),
    ("upscale_model", "upscale_models"),
)


@dataclass(frozen=True, slots=True)
class ModelFile:
    folder: str
    name: str
    size: int
    modified: dt.datetime

    @property
    def key(self) -> ModelKey:
        return (self.folder, self.name)


def models_named(parameters: dict[str, Any] | None) -> set[ModelKey]:
    """The model files a job's parameters name."""
    found: set[ModelKey] = set()
    for param, folder in PARAMETER_FOLDERS:
        value = (parameters or {}).get(param)
        if isinstance(value, str) and value:
            found.add((folder, value))
    return found


def models_in_workflow(workflow: Any) -> set[ModelKey]:
    """Every string input of a saved (API-format) workflow that names a model file."""
    found: set[ModelKey] = set()
    stack = [workflow]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str) and item.lower().endswith(MODEL_EXTENSIONS):
            found.add((ANY_FOLDER, item))
    return found


def needs(needed: set[ModelKey], key: ModelKey) -> bool:
    """Whether a job needs the file ``key`` (named with its folder, or by a workflow)."""
    return key in needed or (ANY_FOLDER, key[1]) in needed


async def read_files(shell: ServerShell, server: ServerView) -> list[ModelFile]:
    """Every model file under the server's models folder with its size and mtime (SSH).

    Hidden entries (our partial downloads) are left out: they are not models yet, and the
    download that owns one holds a reservation of its full size instead.
    """
    root = await shell.models_dir(server)
    folders = " ".join(shlex.quote(f) for f in MODEL_FOLDERS)
    script = (
        f"root={shlex.quote(root)}; "
        f'[ -d "$root" ] || exit 0; '
        # Sizes come from GNU find's -printf (Ubuntu/Debian images); without it the cache
        # must say so rather than see an empty folder and never evict.
        f"find \"$root\" -maxdepth 0 -printf '' 2>/dev/null || {{ echo {MARK}nofind; exit 0; }}; "
        f"for f in {folders}; do "
        f'[ -d "$root/$f" ] || continue; echo "{MARK}folder $f"; '
        f'(cd "$root/$f" && find -L . -name ".*" ! -name . -prune -o -type f '
        f"-printf '%s %T@ %P\\n' 2>/dev/null); done"
    )
    result = await shell.run(server, script, timeout=COMMAND_TIMEOUT)
    if f"{MARK}nofind" in result.stdout:
        raise ExternalServiceError(
            f"'{server.name}' has no GNU find, so the bot cannot measure its models folder "
            "for the model cache.")
    files: list[ModelFile] = []
    folder: str | None = None
    for line in result.stdout.splitlines():
        if line.startswith(f"{MARK}folder "):
            folder = line.split(" ", 1)[1]
            continue
        parts = line.split(" ", 2)
        if folder is None or len(parts) != 3 or not parts[0].isdigit():
            continue  # untrusted output: a line we cannot read is skipped, not fatal
        try:
            modified = dt.datetime.fromtimestamp(float(parts[1]), dt.UTC)
        except (ValueError, OverflowError, OSError):
            modified = dt.datetime.fromtimestamp(0, dt.UTC)
        files.append(ModelFile(folder, parts[2], int(parts[0]), modified))
    return files


class UsageReader:
    """Last use and current need of models, from the generation rows (read only)."""

    def __init__(self, sessions: SessionFactory) -> None:
        self._sessions = sessions

    async def last_used(self, server_id: int) -> dict[ModelKey, dt.datetime]:
        """When each model was last named by a job on the server."""
        g = ComfyGeneration
        stmt = select(g.parameters, g.created_at, g.started_at, g.completed_at).where(
            g.server_id == server_id
        )
        last: dict[ModelKey, dt.datetime] = {}
        async with self._sessions() as session:
            for params, created, started, completed in (await session.execute(stmt)).all():
                when = completed or started or created
                for key in models_named(params):
                    if key not in last or when > last[key]:
                        last[key] = when
        return last

    async def in_use(self, server_id: int) -> set[ModelKey]:
        """Models a queued or running job on the server needs. Jobs not placed on a server
        yet (no server id) count for every server: they may land anywhere."""
        g = ComfyGeneration
        stmt = select(g.parameters, g.workflow_id).where(
            g.status.in_(ACTIVE_STATUSES),
            or_(g.server_id == server_id, g.server_id.is_(None)),
        )
        needed: set[ModelKey] = set()
        workflow_ids: set[int] = set()
        async with self._sessions() as session:
            for params, workflow_id in (await session.execute(stmt)).all():
                needed |= models_named(params)
                if workflow_id is not None:
                    workflow_ids.add(workflow_id)
            if workflow_ids:
                # A custom workflow's own loaders name models the parameters do not.
                rows = await session.execute(
                    select(ComfyWorkflow.workflow).where(ComfyWorkflow.id.in_(workflow_ids)))
                for (workflow,) in rows.all():
                    needed |= models_in_workflow(workflow)
        return needed


class PinStore:
    """The ``model_pins`` rows: the one place that reads and writes them."""

    def __init__(self, sessions: SessionFactory) -> None:
        self._sessions = sessions

    async def pins(self, server_id: int) -> set[ModelKey]:
        stmt = select(ModelPin.folder, ModelPin.filename).where(ModelPin.server_id == server_id)
        async with self._sessions() as session:
            return {(f, n) for f, n in (await session.execute(stmt)).all()}

    async def pin(self, server_id: int, key: ModelKey, user_id: int | None) -> bool:
        """Pin; False when it was pinned already."""
        try:
            async with self._sessions.begin() as session:
                session.add(ModelPin(server_id=server_id, folder=key[0], filename=key[1],
                                     pinned_by=user_id))
        except IntegrityError:
            return False
        return True

    async def unpin(self, server_id: int, key: ModelKey) -> bool:
        """Unpin; False when it was not pinned."""
        async with self._sessions.begin() as session:
            result = await session.execute(
                delete(ModelPin).where(ModelPin.server_id == server_id,
                                       ModelPin.folder == key[0], ModelPin.filename == key[1])
            )
        return bool(result.rowcount)  # type: ignore[attr-defined]
