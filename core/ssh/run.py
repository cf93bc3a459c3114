"""Running one command on an open connection: compose its line, drive it, stop it by pid.

:func:`compose` builds the shell line (pid report, ``env`` exports, the reader for
``secret_env`` on stdin); :func:`execute` opens the session, feeds stdin, captures both
streams and maps failures to :mod:`core.ssh.errors`; :func:`stop` ends a command and
everything it started. :meth:`core.ssh.client.SSHPool.run` puts them together.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import asyncssh

from core.ssh.capture import (
    DEFAULT_MAX_OUTPUT,
    PID_REPORT,
    LineCallback,
    OutputCapture,
    stderr_tail,
)
from core.ssh.errors import SSHCommandFailed, SSHConnectError, SSHTimeout

log = logging.getLogger(__name__)

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

# Reads ``NAME=value`` lines from stdin until an empty line and exports them. ``read`` is a
# shell builtin and POSIX makes it consume stdin byte by byte, so whatever follows the empty
# line is still there for the command itself (``input=``). ``export "$kv"`` assigns the value
# verbatim: it is the result of a quoted expansion, so the shell never parses it.
_STDIN_ENV_READER = (
    'while IFS= read -r __cv_kv && [ -n "$__cv_kv" ]; do export "$__cv_kv"; done; unset __cv_kv;'
)


@dataclass(frozen=True)
class CommandResult:
    """A finished command. ``stdout``/``stderr`` are the *tails* of the streams, at most
    ``max_output`` bytes each (see :meth:`core.ssh.client.SSHPool.run`); the ``*_dropped``
    counts say how many bytes before them were received and not kept."""

    exit_status: int
    stdout: str
    stderr: str
    stdout_dropped: int = 0
    stderr_dropped: int = 0

    @property
    def truncated(self) -> bool:
        return bool(self.stdout_dropped or self.stderr_dropped)


def compose(
    command: str, env: Mapping[str, str] | None, secret_env: Mapping[str, str] | None
) -> tuple[str, bytes]:
    """Build the command line and the stdin prefix that carries the secrets."""
    parts: list[str] = [PID_REPORT]
    if env:
        for name in env:
            _check_env_name(name)
        parts.append(
            "export " + " ".join(f"{k}={shlex.quote(str(v))}" for k, v in env.items()) + ";"
        )
    prefix = b""
    if secret_env:
        lines = []
        for name, value in secret_env.items():
            _check_env_name(name)
            if "\n" in value or "\0" in value:
                raise ValueError(f"secret_env value for {name} contains a newline or NUL")
            lines.append(f"{name}={value}\n")
        prefix = ("".join(lines) + "\n").encode()
        parts.append(_STDIN_ENV_READER)
    parts.append(command)
    return " ".join(parts), prefix


def _check_env_name(name: str) -> None:
    if not _ENV_NAME.match(name):
        raise ValueError(f"not a valid environment variable name: {name!r}")


async def execute(
    conn: asyncssh.SSHClientConnection,
    line: str,
    stdin: bytes,
    *,
    on_line: LineCallback | None,
    timeout: float,
    open_timeout: float,
    check: bool,
    where: str,
    max_output: int = DEFAULT_MAX_OUTPUT,
) -> CommandResult:
    """Run the composed ``line`` on ``conn`` with ``stdin``; see SSHPool.run for the rules."""
    creating = asyncio.ensure_future(
        asyncio.wait_for(conn.create_process(line, encoding=None), open_timeout)
    )
    try:
        process = await asyncio.shield(creating)
    except asyncio.CancelledError:
        # The server may run the command although we stopped waiting for it to
        # open: finish opening it, then stop it like any cancelled command.
        await _abandon(creating, conn)
        raise
    except (TimeoutError, asyncssh.Error, OSError) as exc:
        raise SSHConnectError(
            f"Could not start a command on {where}: the SSH session failed to open."
        ) from exc
    return await _drive(conn, process, stdin, on_line, timeout, check, where, max_output)


async def _drive(
    conn: asyncssh.SSHClientConnection,
    process: asyncssh.SSHClientProcess,
    stdin: bytes,
    on_line: LineCallback | None,
    timeout: float,
    check: bool,
    where: str,
    max_output: int,
) -> CommandResult:
    out = OutputCapture("stdout", on_line, max_bytes=max_output)
    err = OutputCapture("stderr", on_line, pid_marker=True, max_bytes=max_output)
    readers = asyncio.gather(
        out.pump(process.stdout), err.pump(process.stderr), _feed(process, stdin)
    )
    try:
        async with asyncio.timeout(timeout):
            await asyncio.shield(readers)
            await process.wait_closed()
    except TimeoutError:
        log.warning("Command on %s timed out after %g s; stopping it", where, timeout)
        await stop(process, conn, lambda: err.pid)
        await _cancel_and_wait(readers)
        raise SSHTimeout(timeout, where=where) from None
    except (asyncssh.Error, OSError) as exc:
        await _cancel_and_wait(readers)
        raise SSHConnectError(
            f"The SSH connection to {where} was lost while a command was running."
        ) from exc
    except BaseException:
        # on_line failed or we were cancelled: do not leave the remote command running.
        await stop(process, conn, lambda: err.pid)
        await _cancel_and_wait(readers)
        raise
    status = process.returncode
    if status is None:
        raise SSHConnectError(
            f"The SSH connection to {where} was lost while a command was running."
        )
    result = CommandResult(status, out.text(), err.text(), out.dropped, err.dropped)
    if result.truncated:
        log.info(
            "Command on %s printed more than kept: dropped %d bytes of stdout, %d of stderr",
            where,
            out.dropped,
            err.dropped,
        )
    if check and status != 0:
        raise SSHCommandFailed(status, stderr_tail(result.stderr), where=where)
    return result


async def _feed(process: asyncssh.SSHClientProcess, data: bytes) -> None:
    # Always send EOF, so a command that reads stdin does not wait for us forever.
    try:
        if data:
            process.stdin.write(data)
            await process.stdin.drain()
        process.stdin.write_eof()
    except (BrokenPipeError, ConnectionError, asyncssh.Error):
        pass  # the command exited without reading all of its input; its status tells


async def _cancel_and_wait(fut: asyncio.Future[object]) -> None:
    """Cancel ``fut`` and wait for it, consuming its outcome (our own cancellation still
    propagates, unlike ``suppress(BaseException)``)."""
    fut.cancel()
    await asyncio.wait([fut])
    if not fut.cancelled():
        fut.exception()  # mark it retrieved so asyncio does not log it later


async def stop(
    process: asyncssh.SSHClientProcess,
    conn: asyncssh.SSHClientConnection,
    pid_of: Callable[[], int | None],
) -> None:
    """Terminate a remote command and everything it started: SIGTERM, then SIGKILL.

    Closing the channel is not enough, sshd leaves the processes running. We send the SSH
    "signal" request (servers that honour it killpg() the session) and, since OpenSSH
    ignores it for root, also ``kill`` the command's process group over a second channel.
    A command stopped right after it started may not have reported its pid yet: wait for
    it briefly (the stderr reader keeps running meanwhile) rather than leave it running.
    """
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(1.0):
            while pid_of() is None and process.returncode is None:
                await asyncio.sleep(0.02)
    pid = pid_of()
    for sig, grace in (("TERM", 2.0), ("KILL", 2.0)):
        with contextlib.suppress(OSError, asyncssh.Error, ValueError):
            process.send_signal(sig)
        if pid is not None:
            kill = f"kill -s {sig} -- -{pid} 2>/dev/null || kill -s {sig} {pid} 2>/dev/null; true"
            with contextlib.suppress(OSError, asyncssh.Error, TimeoutError):
                await asyncio.wait_for(conn.run(kill, check=False), grace)
        try:
            async with asyncio.timeout(grace):
                await process.wait_closed()
            return
        except TimeoutError:
            continue
    process.close()


async def _abandon(
    creating: asyncio.Future[asyncssh.SSHClientProcess], conn: asyncssh.SSHClientConnection
) -> None:
    """Stop a command whose start was cancelled (see :func:`execute`)."""
    try:
        process = await creating
    except (TimeoutError, asyncssh.Error, OSError):
        return
    # Only the pid matters here; keep almost nothing of the output.
    err = OutputCapture("stderr", None, pid_marker=True, max_bytes=4096)
    # A local helper awaited (and cancelled) below, not a background task.
    reader = asyncio.ensure_future(err.pump(process.stderr))
    try:
        await stop(process, conn, lambda: err.pid)
    finally:
        await _cancel_and_wait(reader)
