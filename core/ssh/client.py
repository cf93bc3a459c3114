""":class:`SSHPool`: the connection pool with the operations the product uses.

Commands (:meth:`SSHPool.run`), SFTP (:meth:`SSHPool.upload_bytes`,
:meth:`SSHPool.download_bytes`) and tunnels (:meth:`SSHPool.forward_local`), each
delegating to the module that holds it, on top of :class:`~core.ssh.pool.ConnectionPool`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from core.ssh import run as _run
from core.ssh import sftp as _sftp
from core.ssh.capture import DEFAULT_MAX_OUTPUT, LineCallback
from core.ssh.pool import ConnectionPool
from core.ssh.run import CommandResult
from core.ssh.target import SSHTarget
from core.ssh.tunnels import Tunnel, start_tunnel

log = logging.getLogger(__name__)


class SSHPool(ConnectionPool):
    """At most one connection per target, shared by commands, SFTP and tunnels."""

    async def run(
        self,
        target: SSHTarget,
        command: str,
        *,
        timeout: float,
        check: bool = True,
        on_line: LineCallback | None = None,
        env: Mapping[str, str] | None = None,
        input: bytes | str | None = None,  # same name as subprocess.run and asyncssh
        secret_env: Mapping[str, str] | None = None,
        max_output: int = DEFAULT_MAX_OUTPUT,
    ) -> CommandResult:
        """Run ``command`` (a shell string: quote every value!) and wait for it.

        * ``on_line(stream, line)`` gets each line of ``"stdout"``/``"stderr"`` as it arrives,
          without its line ending; a carriage return also ends a line, so progress bars
          (curl, wget, tqdm) are reported as they redraw. It may be sync or async.
        * ``env`` is exported by a prefix on the command line (``export K='v';``) because
          servers accept SSH "env" requests only for AcceptEnv names; do not put secrets in it.
        * ``secret_env`` is written to the channel's stdin as ``NAME=value`` lines that a
          shell builtin reads and exports before the command runs, so the values never
          appear in any process's argv (``ps``, ``/proc/*/cmdline``). They do end up in the
          environment of the command's processes, readable by the same user only. Values
          cannot contain newlines. ``input`` still reaches the command's stdin afterwards.
        * Past ``timeout`` seconds the remote process group gets SIGTERM, then SIGKILL, and
          :class:`~core.ssh.errors.SSHTimeout` is raised. A non-zero exit with ``check``
          raises :class:`~core.ssh.errors.SSHCommandFailed` with the tail of stderr.
        * The result keeps the last ``max_output`` bytes of each stream and counts the rest
          (``stdout_dropped``/``stderr_dropped``): the server's output is untrusted and a
          runaway command must not grow the bot. ``on_line`` still sees every line (cut
          at :data:`~core.ssh.capture.MAX_LINE_CHARS`); bound what it keeps yourself.
        """
        line, stdin_prefix = _run.compose(command, env, secret_env)
        payload = input.encode() if isinstance(input, str) else (input or b"")
        where = target.address
        log.debug("Running on %s: %s", where, line)
        async with self.session(target) as conn:
            return await _run.execute(
                conn,
                line,
                stdin_prefix + payload,
                on_line=on_line,
                timeout=timeout,
                open_timeout=self.options.connect_timeout,
                check=check,
                where=where,
                max_output=max_output,
            )

    async def upload_bytes(
        self,
        target: SSHTarget,
        data: bytes,
        remote_path: str,
        mode: int = 0o644,
        *,
        timeout: float = 120.0,
    ) -> None:
        """Write ``data`` to ``remote_path`` over SFTP, atomically (temp file + rename)."""
        await _sftp.upload_bytes(self, target, data, remote_path, mode, timeout=timeout)

    async def download_bytes(
        self, target: SSHTarget, remote_path: str, max_bytes: int, *, timeout: float = 120.0
    ) -> bytes:
        """Read ``remote_path`` over SFTP; refuse files larger than ``max_bytes``."""
        return await _sftp.download_bytes(self, target, remote_path, max_bytes, timeout=timeout)

    async def forward_local(
        self, target: SSHTarget, remote_host: str = "127.0.0.1", remote_port: int = 8188
    ) -> Tunnel:
        """Start a :class:`Tunnel` from a private Unix socket to ``remote_host:remote_port``."""
        return await start_tunnel(self, target, remote_host, remote_port)
