"""Planning a download: every check that can refuse it runs before anything is written.

A bad URL, folder, name or sha256, a server that is not ready or has no SSH, a source that
refuses or lacks the file, a file that already exists and too little disk (a real
``df -Pk``) all raise here. The result is a :class:`Plan`, everything the transfer needs.
"""

from __future__ import annotations

import logging
import posixpath
import shlex
from dataclasses import dataclass, field, replace

from core.config import Settings
from core.errors import NotFound, ValidationFailed
from core.model_files.curl import curl_config
from core.model_files.names import (
    filename_from_source,
    temp_name,
    validate_filename,
    validate_folder,
    validate_sha256,
)
from core.model_files.shell import (
    COMMAND_TIMEOUT,
    MARK,
    ServerShell,
    marker_int,
    parse_df_available,
)
from core.model_files.sources import (
    auth_headers,
    curl_protocols,
    probe,
    token_hosts,
    validate_url,
)
from core.model_files.types import DiskFull, DownloadRequest, format_size
from core.servers import ServerRegistry, ServerView
from core.ssh import SSHTarget

log = logging.getLogger(__name__)

# Disk that must stay free besides the file itself: ComfyUI, pip and outputs need room too.
DEFAULT_RESERVE_BYTES = 512 * 1024**2


@dataclass
class Plan:
    """Everything a started download needs; built and checked before the row exists."""

    server: ServerView
    target: SSHTarget
    url: str = field(repr=False)
    folder: str
    filename: str
    directory: str
    sha256: str | None
    bytes_total: int | None
    partial_bytes: int
    headers: list[str] = field(repr=False, default_factory=list)
    proto: str = "=https"

    @property
    def key(self) -> tuple[int, str, str]:
        """What two downloads must not share: the server, the folder and the file name."""
        return (self.server.id, self.folder, self.filename)

    @property
    def final_path(self) -> str:
        return posixpath.join(self.directory, self.filename)

    @property
    def temp_path(self) -> str:
        return posixpath.join(self.directory, temp_name(self.filename))

    def curl_config(self) -> str:
        return curl_config(self.url, self.headers)


@dataclass(frozen=True, slots=True)
class _Preflight:
    final_exists: bool
    partial_bytes: int
    free_bytes: int | None


class Planner:
    """Checks a download request in two steps: :meth:`propose` (the request, the server and
    the source) and :meth:`confirm` (the target folder and the disk), so the caller can
    claim the file name in between."""

    def __init__(
        self, settings: Settings, registry: ServerRegistry, shell: ServerShell, *,
        reserve_bytes: int = DEFAULT_RESERVE_BYTES,
    ) -> None:
        self._settings = settings
        self._registry = registry
        self._shell = shell
        self.reserve_bytes = reserve_bytes
        self.token_hosts = token_hosts(settings)

    def auth_headers(self, url: str) -> list[str]:
        return auth_headers(self.token_hosts, url)

    async def propose(self, request: DownloadRequest) -> Plan:
        """Validate the request, find the server and probe the source; the plan's
        ``partial_bytes`` is 0 until :meth:`confirm` looked at the disk."""
        folder = validate_folder(request.folder)
        url = validate_url(request.url, self._settings.comfy.http_allowlist)
        given = validate_filename(request.filename) if request.filename else None
        sha256 = validate_sha256(request.sha256) if request.sha256 else None
        server = await self._registry.get(request.server)
        target = self._shell.target(server)
        if not server.is_ready:
            raise ValidationFailed(
                f"Server '{server.name}' is {server.status}; start it before downloading."
            )
        directory = posixpath.join(await self._shell.models_dir(server), folder)
        headers = self.auth_headers(url)
        proto = curl_protocols(url)

        found = await probe(self._shell.ssh, target, server, url, headers, proto)
        filename = given or filename_from_source(found.content_disposition, url)
        return Plan(
            server=server, target=target, url=url, folder=folder, filename=filename,
            directory=directory, sha256=sha256, bytes_total=found.size, partial_bytes=0,
            headers=headers, proto=proto,
        )

    async def confirm(self, plan: Plan) -> Plan:
        """Refuse a file that exists or does not fit; the plan with the partial file's size."""
        pre = await self._preflight(plan.server, plan.directory, plan.filename)
        if pre.final_exists:
            raise ValidationFailed(
                f"{plan.folder}/{plan.filename} already exists on '{plan.server.name}'; delete "
                "it first or pick another file name."
            )
        self._check_space(plan.server, plan.directory, plan.bytes_total, pre)
        return replace(plan, partial_bytes=pre.partial_bytes)

    async def _preflight(self, server: ServerView, directory: str, filename: str) -> _Preflight:
        models = posixpath.dirname(directory)
        final = posixpath.join(directory, filename)
        tmp = posixpath.join(directory, temp_name(filename))
        script = (
            f"models={shlex.quote(models)}; dir={shlex.quote(directory)}; "
            f"final={shlex.quote(final)}; tmp={shlex.quote(tmp)}; "
            f'[ -d "$models" ] || {{ echo {MARK}nomodels; exit 0; }}; '
            f'mkdir -p -- "$dir" || exit 3; '
            f'if [ -e "$final" ]; then echo {MARK}final 1; else echo {MARK}final 0; fi; '
            f'if [ -f "$tmp" ]; then echo "{MARK}part $(wc -c < "$tmp")"; '
            f"else echo {MARK}part 0; fi; "
            f'echo {MARK}df; df -Pk -- "$dir"'
        )
        result = await self._shell.run(server, script, timeout=COMMAND_TIMEOUT)
        out = result.stdout
        if f"{MARK}nomodels" in out:
            raise NotFound(
                f"ComfyUI is not installed at {posixpath.dirname(models)} on '{server.name}' "
                "(no models directory); install it with /setup run."
            )
        free: int | None
        try:
            free = parse_df_available(out.split(f"{MARK}df", 1)[1])
        except (IndexError, ValueError):
            log.warning("could not read free disk space on %s: %r", server.name, out[-300:])
            free = None
        return _Preflight(
            final_exists=marker_int(out, "final") == 1,
            partial_bytes=marker_int(out, "part") or 0, free_bytes=free,
        )

    def _check_space(
        self, server: ServerView, directory: str, size: int | None, pre: _Preflight
    ) -> None:
        if pre.free_bytes is None:
            return
        needed = max((size or 0) - pre.partial_bytes, 0) + self.reserve_bytes
        if pre.free_bytes < needed:
            raise DiskFull(
                f"Not enough disk on '{server.name}': {format_size(pre.free_bytes)} free in "
                f"{directory}, but the file needs {format_size(size or 0)} plus "
                f"{format_size(self.reserve_bytes)} to spare."
            )
