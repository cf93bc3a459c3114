"""Deleting one model file from a server (never one that is being downloaded)."""

from __future__ import annotations

import logging
import posixpath
import shlex
from collections.abc import Callable

from core.audit import OUTCOME_OK, Actor, AuditService
from core.errors import NotFound, ResourceBusy
from core.model_files.names import validate_folder, validate_model_path
from core.model_files.shell import COMMAND_TIMEOUT, MARK, ServerShell
from core.servers import ServerRegistry

log = logging.getLogger(__name__)


class Deletion:
    """Removes model files; ``is_busy(server id, folder, name)`` guards running downloads and
    ``on_change(server id)`` is told after a file went."""

    def __init__(
        self, registry: ServerRegistry, shell: ServerShell, audit: AuditService, *,
        is_busy: Callable[[int, str, str], bool], on_change: Callable[[int], None],
    ) -> None:
        self._registry = registry
        self._shell = shell
        self._audit = audit
        self._is_busy = is_busy
        self._on_change = on_change

    async def delete(self, actor: Actor, server: str, folder: str, filename: str) -> str:
        """Delete one model file; returns the path removed (relative to the models dir)."""
        folder = validate_folder(folder)
        name = validate_model_path(filename)
        view = await self._registry.get(server)
        self._shell.target(view)  # a direct server has no files we can reach
        if self._is_busy(view.id, folder, name):
            raise ResourceBusy(f"{name} is being downloaded right now; wait for it to finish.")
        path = posixpath.join(await self._shell.models_dir(view), folder, name)
        script = (
            f"p={shlex.quote(path)}; "
            f'if [ -f "$p" ] || [ -L "$p" ]; then rm -f -- "$p" && echo {MARK}deleted; '
            f"else echo {MARK}missing; fi"
        )
        result = await self._shell.run(view, script, timeout=COMMAND_TIMEOUT)
        if f"{MARK}deleted" not in result.stdout:
            raise NotFound(f"There is no {folder}/{name} on '{view.name}'.")
        self._on_change(view.id)
        await self._audit.record(actor, "models delete", outcome=OUTCOME_OK,
                                 resource=f"{view.name}/{folder}/{name}")
        log.info("deleted %s/%s on %s", folder, name, view.name)
        return f"{folder}/{name}"
