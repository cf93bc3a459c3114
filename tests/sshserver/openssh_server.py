"""The real OpenSSH ``sshd`` on 127.0.0.1:<random port>, as the current user, for tests.

Everything it needs lives in a temporary directory: host key, authorized_keys, config,
pid file and its log (``-e`` sends the log to stderr, which we write to a file and read to
count connections). Needs the Debian package ``openssh-server``.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import os
import shutil
import signal
import socket
import tempfile
from pathlib import Path
from typing import BinaryIO, Self

import asyncssh

SSHD = Path("/usr/sbin/sshd")
_PRIVSEP_DIR = Path("/run/sshd")


class OpenSSHTestServer:
    kind = "openssh"

    def __init__(
        self, authorized_key: str, *, host: str = "127.0.0.1", home: str | None = None
    ) -> None:
        # With ``home``: commands see HOME=home (sshd's SetEnv) and logins read
        # home/.ssh/authorized_keys, so a command can add or remove keys there.
        self.home = home
        self.host = host
        self.port = 0
        self.username = getpass.getuser()
        self._authorized_key = authorized_key
        self._dir: Path | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._log_fh: BinaryIO | None = None
        self._host_key = asyncssh.generate_private_key("ssh-ed25519")

    @staticmethod
    def available() -> bool:
        return SSHD.exists()

    @staticmethod
    def unavailable_reason() -> str:
        return f"{SSHD} is missing; install the Debian package openssh-server"

    @property
    def host_key_openssh(self) -> str:
        return self._host_key.export_public_key("openssh").decode().strip()

    @property
    def log_path(self) -> Path:
        assert self._dir is not None
        return self._dir / "sshd.log"

    def connection_count(self) -> int:
        """Connections accepted so far, from sshd's own log ("Connection from ...")."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return 0
        return text.count("Connection from ")

    async def start(self) -> Self:
        self._prepare()
        for _ in range(5):
            self.port = _free_port()
            self._write_config()
            if await self._spawn():
                return self
        raise RuntimeError(f"sshd did not start; log:\n{self.log_path.read_text()}")

    def _prepare(self) -> None:
        if not self.available():
            raise RuntimeError(self.unavailable_reason())
        if os.geteuid() == 0 and not _PRIVSEP_DIR.exists():
            # sshd chroots its unprivileged child there; Debian creates it only via systemd.
            _PRIVSEP_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        self._dir = Path(tempfile.mkdtemp(prefix="sshd-test-"))
        self._write_host_key()
        keys = self._authorized_keys_path()
        keys.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        keys.write_text(self._authorized_key + "\n")

    def _authorized_keys_path(self) -> Path:
        if self.home is not None:
            return Path(self.home) / ".ssh" / "authorized_keys"
        assert self._dir is not None
        return self._dir / "authorized_keys"

    def _open_log(self) -> BinaryIO:
        if self._log_fh is not None:
            self._log_fh.close()
        self.log_path.unlink(missing_ok=True)
        # Stays open as long as sshd runs: sshd and its children all write to it.
        self._log_fh = open(self.log_path, "ab")
        return self._log_fh

    def _write_host_key(self) -> None:
        assert self._dir is not None
        path = self._dir / "host_key"
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(self._host_key.export_private_key("openssh"))

    def _write_config(self) -> None:
        assert self._dir is not None
        d = self._dir
        (d / "sshd_config").write_text(
            "\n".join(
                [
                    f"Port {self.port}",
                    f"ListenAddress {self.host}",
                    f"HostKey {d / 'host_key'}",
                    f"AuthorizedKeysFile {self._authorized_keys_path()}",
                    *([f"SetEnv HOME={self.home}"] if self.home is not None else []),
                    f"PidFile {d / 'sshd.pid'}",
                    "StrictModes no",
                    "UsePAM no",
                    "PubkeyAuthentication yes",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "PermitRootLogin prohibit-password",
                    "AllowTcpForwarding yes",
                    "X11Forwarding no",
                    "PrintMotd no",
                    "LogLevel VERBOSE",
                    "MaxStartups 100",
                    "Subsystem sftp internal-sftp",
                    "",
                ]
            )
        )

    async def _spawn(self) -> bool:
        assert self._dir is not None
        log_fh = self._open_log()
        self._proc = await asyncio.create_subprocess_exec(
            str(SSHD),
            "-D",
            "-e",
            "-f",
            str(self._dir / "sshd_config"),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log_fh,
            stderr=log_fh,
        )
        return await self._wait_listening()

    async def _wait_listening(self, timeout: float = 10.0) -> bool:
        assert self._proc is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if self._proc.returncode is not None:
                return False
            with contextlib.suppress(OSError):
                _reader, writer = await asyncio.open_connection(self.host, self.port)
                writer.close()
                # That probe was a connection too: wait until sshd has logged it, so
                # connection_count() read by a test afterwards is settled.
                while self.connection_count() < 1 and loop.time() < deadline:
                    await asyncio.sleep(0.01)
                return True
            await asyncio.sleep(0.02)
        return False

    def _children(self) -> list[int]:
        """Every descendant pid of the listening sshd (per-connection sshd and commands)."""
        if self._proc is None:
            return []
        parents: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            parents.setdefault(ppid, []).append(int(entry.name))
        found: list[int] = []
        todo = [self._proc.pid]
        while todo:
            pid = todo.pop()
            for child in parents.get(pid, []):
                found.append(child)
                todo.append(child)
        return found

    def drop_connections(self) -> None:
        """Kill the per-connection sshd processes: clients see their connection die."""
        if self._proc is None:
            return
        parents = set()
        for pid in Path("/proc").iterdir():
            if not pid.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                stat = (pid / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == self._proc.pid:
                    parents.add(int(pid.name))
        for pid in parents:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    async def rotate_host_key(self) -> None:
        """Give sshd a new host key: rewrite the file, SIGHUP (sshd re-executes itself)."""
        assert self._proc is not None
        self._host_key = asyncssh.generate_private_key("ssh-ed25519")
        self._write_host_key()
        self._proc.send_signal(signal.SIGHUP)
        expected = self.host_key_openssh
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        # Twice in a row: on a loaded machine the old listener could still answer once, and
        # the re-executed one be a moment from listening (a test's next connect refused).
        seen = 0
        while loop.time() < deadline:
            key = None
            with contextlib.suppress(OSError, asyncssh.Error):
                key = await asyncssh.get_server_host_key(self.host, self.port, config=None)
            if key is not None and key.export_public_key("openssh").decode().strip() == (
                expected
            ):
                seen += 1
                if seen == 2:
                    return
            else:
                seen = 0
            await asyncio.sleep(0.1)
        raise RuntimeError("sshd did not pick up the new host key")

    async def close(self) -> None:
        children = self._children()
        if self._proc is not None and self._proc.returncode is None:
            self._proc.terminate()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._proc.wait(), 5)
            if self._proc.returncode is None:
                self._proc.kill()
                await self._proc.wait()
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self._log_fh is not None:
            self._log_fh.close()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
