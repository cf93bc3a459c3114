"""How the model-file services reach a server: its SSH target (none for a direct server),
its ComfyUI install directory, running a script there, and reading what our scripts print.

Our remote scripts report with marker lines (``__comfyvast__name value``) at the start of a
line, which no tool prints, so their output is read without guessing.
"""

from __future__ import annotations

import inspect
import posixpath
import re
from collections.abc import Awaitable, Callable

from core.errors import ValidationFailed
from core.model_files.types import DEFAULT_INSTALL_DIR, InstallDir
from core.providers import has_shell
from core.servers import ServerView
from core.ssh import CommandResult, LineCallback, SSHPool, SSHTarget

COMMAND_TIMEOUT = 60.0

# Markers in the output of our remote scripts (start of a line, never produced by a tool).
MARK = "__comfyvast__"

_DF_LINE = re.compile(r"^(.*?)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)%\s+(.*)$")


class ServerShell:
    """Runs our scripts on a server over SSH, and knows where ComfyUI is installed there."""

    def __init__(
        self,
        ssh: SSHPool,
        target_for: Callable[[ServerView], SSHTarget],
        install_dir: InstallDir = DEFAULT_INSTALL_DIR,
    ) -> None:
        self.ssh = ssh
        self._target_for = target_for
        self._install_dir = install_dir

    async def install_dir(self, server: ServerView) -> str:
        """Where ComfyUI lives on ``server`` (a fixed path, or asked per server)."""
        value: str | Awaitable[str] = (
            self._install_dir(server) if callable(self._install_dir) else self._install_dir
        )
        if inspect.isawaitable(value):
            value = await value
        if not value.startswith("/") or ".." in value.split("/"):
            raise ValidationFailed(
                f"The ComfyUI directory for '{server.name}' must be an absolute path."
            )
        return value.rstrip("/") or "/"

    async def models_dir(self, server: ServerView) -> str:
        return posixpath.join(await self.install_dir(server), "models")

    def target(self, server: ServerView) -> SSHTarget:
        if not has_shell(server):
            raise ValidationFailed(
                f"Server '{server.name}' is a ComfyUI URL without SSH access, so the bot "
                "cannot change its model files."
            )
        return self._target_for(server)

    async def run(
        self, server: ServerView, script: str, *, timeout: float, check: bool = True,
        input: str | None = None, on_line: LineCallback | None = None,
        max_output: int | None = None,
    ) -> CommandResult:
        extra = {} if max_output is None else {"max_output": max_output}
        return await self.ssh.run(
            self.target(server), script, timeout=timeout, check=check, input=input,
            on_line=on_line, **extra,
        )


def marker_text(text: str, name: str) -> str | None:
    prefix = f"{MARK}{name} "
    for line in text.splitlines():
        if line.startswith(prefix):
            return line[len(prefix):].strip()
    return None


def marker_int(text: str, name: str) -> int | None:
    value = marker_text(text, name)
    return int(value) if value is not None and value.isdigit() else None


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in re.split(r"[\r\n]+", text) if ln.strip()]
    return lines[-1][:300] if lines else ""


def parse_df_available(output: str) -> int:
    """Bytes available from ``df -Pk <dir>`` output (POSIX format, 1024-byte blocks)."""
    for line in reversed(output.strip().splitlines()):
        match = _DF_LINE.match(line.strip())
        if match:
            return int(match.group(4)) * 1024
    raise ValueError(f"unexpected df output: {output[:200]!r}")
