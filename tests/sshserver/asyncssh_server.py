"""An in-process asyncssh server on 127.0.0.1 that runs real shell commands.

It behaves like sshd where our client cares: commands run as ``/bin/sh -c <command>`` in
their own session (so "signal" requests reach the whole process group, as OpenSSH does
with killpg), stdin/stdout/stderr are piped through, exit status and exit signal are
reported, ``sftp`` is served over the real filesystem, and direct-tcpip forwarding is
allowed to loopback ports only.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import logging
import os
import signal
from typing import Self

import asyncssh

log = logging.getLogger(__name__)

_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class AsyncSSHTestServer:
    """``async with AsyncSSHTestServer(public_key_line) as server:`` then connect to
    ``server.host:server.port`` as ``server.username`` with the matching private key."""

    kind = "asyncssh"

    def __init__(
        self, authorized_key: str, *, host: str = "127.0.0.1", home: str | None = None
    ) -> None:
        self.host = host
        self.port = 0
        self.username = getpass.getuser()
        self._home = os.path.expanduser("~")
        self._authorized = asyncssh.import_authorized_keys(authorized_key + "\n")
        # With ``home``, like sshd: commands see HOME=home and every login reads the keys
        # from home/.ssh/authorized_keys, so a command can add or remove keys there.
        self.home = home
        if home is not None:
            self._home = home
            ssh_dir = os.path.join(home, ".ssh")
            os.makedirs(ssh_dir, mode=0o700, exist_ok=True)
            with open(os.path.join(ssh_dir, "authorized_keys"), "w") as fh:
                fh.write(authorized_key + "\n")
        self._host_key = asyncssh.generate_private_key("ssh-ed25519")
        self._acceptor: asyncssh.SSHAcceptor | None = None
        self._conns: set[asyncssh.SSHServerConnection] = set()
        # Commands still running, with the task that reaps each; like sshd we leave them
        # running when their connection drops, and close() kills what is left.
        self._procs: dict[asyncio.subprocess.Process, asyncio.Task[int]] = {}
        self.total_connections = 0

    @property
    def host_key_openssh(self) -> str:
        return self._host_key.export_public_key("openssh").decode().strip()

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    def connection_count(self) -> int:
        """Connections accepted so far (authenticated or not)."""
        return self.total_connections

    async def start(self) -> Self:
        self._acceptor = await asyncssh.listen(
            self.host,
            self.port,
            server_factory=lambda: _Server(self),
            server_host_keys=[self._host_key],
            authorized_client_keys=self._authorized,
            process_factory=self._handle_process,
            sftp_factory=True,
            allow_scp=False,
            encoding=None,
            reuse_address=True,
        )
        self.port = self._acceptor.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        self.drop_connections()
        for proc in list(self._procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        if self._procs:
            await asyncio.gather(*self._procs.values(), return_exceptions=True)
        if self._acceptor is not None:
            self._acceptor.close()
            await self._acceptor.wait_closed()
            self._acceptor = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def drop_connections(self) -> None:
        """Cut every client connection without a goodbye, like a network failure."""
        for conn in list(self._conns):
            conn.abort()
        self._conns.clear()

    async def rotate_host_key(self) -> None:
        """Listen again on the same port with a fresh host key."""
        self._host_key = asyncssh.generate_private_key("ssh-ed25519")
        if self._acceptor is not None:
            self._acceptor.close()
            await self._acceptor.wait_closed()
        await self.start()

    async def _handle_process(self, process: asyncssh.SSHServerProcess[bytes]) -> None:
        argv = ["/bin/sh", "-c", process.command] if process.command else ["/bin/sh"]
        env = {**os.environ, **{str(k): str(v) for k, v in process.env.items()}}
        if self.home is not None:
            env["HOME"] = self.home
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            cwd=self._home,
            # Like sshd: a session of its own, so a signal reaches the whole group.
            start_new_session=True,
        )
        reaper = asyncio.create_task(proc.wait())
        self._procs[proc] = reaper
        reaper.add_done_callback(lambda _: self._procs.pop(proc, None))
        feeder = asyncio.create_task(_feed_stdin(process, proc))
        try:
            await asyncio.gather(
                _copy_out(proc.stdout, process.stdout), _copy_out(proc.stderr, process.stderr)
            )
            status = await asyncio.shield(reaper)
        finally:
            feeder.cancel()
        with contextlib.suppress(Exception):
            if status < 0:
                process.exit_with_signal(signal.Signals(-status).name.removeprefix("SIG"))
            else:
                process.exit(status)


async def _feed_stdin(
    process: asyncssh.SSHServerProcess[bytes], proc: asyncio.subprocess.Process
) -> None:
    assert proc.stdin is not None
    while True:
        try:
            data = await process.stdin.read(65536)
        except asyncssh.SignalReceived as sig:
            with contextlib.suppress(ProcessLookupError, AttributeError):
                os.killpg(proc.pid, getattr(signal, f"SIG{sig.signal}"))
            continue
        except (asyncssh.Error, OSError):
            break
        if not data:
            break
        try:
            proc.stdin.write(data)
            await proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            break
    with contextlib.suppress(Exception):
        proc.stdin.close()
    # Keep listening for signals after EOF: a timed-out command is killed this way.
    while True:
        try:
            data = await process.stdin.read(65536)
        except asyncssh.SignalReceived as sig:
            with contextlib.suppress(ProcessLookupError, AttributeError):
                os.killpg(proc.pid, getattr(signal, f"SIG{sig.signal}"))
            continue
        except (asyncssh.Error, OSError):
            return
        if not data:
            await asyncio.sleep(0.05)


async def _copy_out(source: asyncio.StreamReader | None, sink: asyncssh.SSHWriter[bytes]) -> None:
    assert source is not None
    broken = False
    while True:
        data = await source.read(65536)
        if not data:
            break
        if broken:
            continue  # keep draining so the child is not blocked on a full pipe
        try:
            sink.write(data)
            await sink.drain()
        except (asyncssh.Error, OSError):
            broken = True


class _Server(asyncssh.SSHServer):
    def __init__(self, owner: AsyncSSHTestServer) -> None:
        self._owner = owner
        self._conn: asyncssh.SSHServerConnection | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        self._owner._conns.add(conn)
        self._owner.total_connections += 1

    def connection_lost(self, exc: Exception | None) -> None:
        if self._conn is not None:
            self._owner._conns.discard(self._conn)

    def begin_auth(self, username: str) -> bool:
        if self._owner.home is not None and self._conn is not None:
            # sshd reads authorized_keys at each login (a missing file: no keys at all).
            path = os.path.join(self._owner.home, ".ssh", "authorized_keys")
            try:
                self._conn.set_authorized_keys(path)
            except (OSError, ValueError):
                self._conn.set_authorized_keys(asyncssh.SSHAuthorizedKeys())
        return True

    def connection_requested(
        self, dest_host: str, dest_port: int, orig_host: str, orig_port: int
    ) -> bool:
        # True lets asyncssh open the TCP connection itself; loopback only.
        return dest_host in _LOOPBACK
