"""SSH access to GPU servers: pinned host keys, a small connection pool, commands, SFTP, tunnels.

The pieces, from the bottom up:

* :func:`ensure_client_key` creates the bot's own ed25519 key pair on first use and loads it
  afterwards. Its public half is what operators put into ``authorized_keys`` (or what we
  register with Vast.ai).
* :class:`SSHTarget` says where to go: host, port, user and the *pinned* host key (an
  OpenSSH public key line stored with the server row).
* :class:`SSHConnector` opens one authenticated asyncssh connection. ``known_hosts`` is always
  built from the pinned key, never ``None``. A target without a pin is trusted on first use:
  the key the server presents is learned (:func:`fetch_host_key`), remembered, and handed to
  ``on_host_key_learned`` so the caller can store it; from then on a different key raises
  :class:`HostKeyMismatch`. Transient failures (refused, reset, timed out) are retried with
  jittered exponential backoff; authentication failures and host key mismatches are not,
  because repeating them cannot help and may lock the account.
* :class:`SSHPool` keeps at most one connection per target (keyed by :attr:`SSHTarget.key`),
  replaces dead ones, closes idle ones after ``idle_timeout`` seconds, and offers the
  operations: :meth:`SSHPool.run`, :meth:`SSHPool.upload_bytes`,
  :meth:`SSHPool.download_bytes` and :meth:`SSHPool.forward_local`.
* :class:`Tunnel` / :class:`TunnelManager` give ComfyUI's port on the server a stable local
  URL (``http://127.0.0.1:<port>``) that survives reconnects.

Remote commands are shell strings run by the user's login shell, which must be POSIX-like
(sh, bash, dash, zsh). **Every value that goes into one must pass through**
:func:`shlex.quote` (or build the whole line with :func:`quote_command`); nothing in this
module quotes for you. Secrets (download tokens) must not be part of the command line
because any user on the server can read it with ``ps``: pass them with ``secret_env=``,
which sends them over the channel's stdin (see :meth:`SSHPool.run`).

Shut down in this order: :meth:`TunnelManager.close_all`, then :meth:`SSHPool.close`.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import inspect
import logging
import os
import random
import re
import secrets
import shlex
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import asyncssh

from core.errors import ExternalServiceError

log = logging.getLogger(__name__)

T = TypeVar("T")

__all__ = [
    "ClientKey",
    "CommandResult",
    "HostKeyMismatch",
    "LineCallback",
    "SSHAuthError",
    "SSHCommandFailed",
    "SSHConnectError",
    "SSHConnector",
    "SSHError",
    "SSHFileNotFound",
    "SSHOptions",
    "SSHPool",
    "SSHTarget",
    "SSHTimeout",
    "Tunnel",
    "TunnelManager",
    "backoff_delay",
    "ensure_client_key",
    "fetch_host_key",
    "host_key_fingerprint",
    "quote_command",
]

# Lines of stderr kept in SSHCommandFailed: enough to see the cause, short enough for Discord.
STDERR_TAIL_LINES = 15
STDERR_TAIL_CHARS = 1500

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_NEWLINES = re.compile(r"\r\n|\r|\n")
_READ_CHUNK = 65536

# Reads ``NAME=value`` lines from stdin until an empty line and exports them. ``read`` is a
# shell builtin and POSIX makes it consume stdin byte by byte, so whatever follows the empty
# line is still there for the command itself (``input=``). ``export "$kv"`` assigns the value
# verbatim: it is the result of a quoted expansion, so the shell never parses it.
_STDIN_ENV_READER = (
    'while IFS= read -r __cv_kv && [ -n "$__cv_kv" ]; do export "$__cv_kv"; done; unset __cv_kv;'
)

# The first thing every command does is report its shell's pid on stderr (the client strips
# that line). sshd starts each session with setsid(), so the pid is also the process group
# of everything the command starts. We need it to stop a timed-out command: OpenSSH ignores
# "signal" requests for root logins ("session signalling requires privilege separation"),
# and Vast.ai instances are root, so we kill the group with a second command instead.
_PID_MARKER = b"\x1ecomfyvast-pid="
_PID_REPORT = "printf '\\036comfyvast-pid=%s\\n' \"$$\" >&2;"


# --------------------------------------------------------------------------- errors


class SSHError(ExternalServiceError):
    """Base for every SSH failure; ``str()`` is a user-safe sentence."""


class SSHConnectError(SSHError):
    """The server could not be reached, or the connection was lost."""


class SSHAuthError(SSHError):
    """The server refused the bot's key."""


class HostKeyMismatch(SSHError):
    """The server presented a host key other than the pinned one."""

    def __init__(self, host: str, port: int, pinned_fingerprint: str | None = None) -> None:
        super().__init__(
            f"The SSH host key of {_address(host, port)} changed since it was pinned; "
            "if the server was reinstalled on purpose, re-register it to pin the new key, "
            "otherwise someone may be intercepting the connection."
        )
        self.host = host
        self.port = port
        self.pinned_fingerprint = pinned_fingerprint


class SSHCommandFailed(SSHError):
    """A remote command exited with a non-zero status."""

    def __init__(self, exit_status: int, stderr_tail: str, *, where: str = "the server") -> None:
        sentence = f"The command on {where} failed with exit status {exit_status}."
        if stderr_tail:
            sentence += f"\nLast lines of its error output:\n{stderr_tail}"
        super().__init__(sentence)
        self.exit_status = exit_status
        self.stderr_tail = stderr_tail


class SSHTimeout(SSHError):
    """A remote command ran longer than its timeout and was stopped."""

    def __init__(self, timeout: float, *, where: str = "the server") -> None:
        super().__init__(
            f"The command on {where} did not finish within {timeout:g} seconds and was stopped."
        )
        self.timeout = timeout


class SSHFileNotFound(SSHError):
    """A remote file asked for over SFTP does not exist."""


# --------------------------------------------------------------------------- keys and targets


@dataclass(frozen=True, repr=False)
class ClientKey:
    """The bot's SSH key pair. Its repr shows the path and fingerprint, never the private key."""

    path: Path
    public_openssh: str
    _private: asyncssh.SSHKey = field(compare=False)

    @property
    def fingerprint(self) -> str:
        return self._private.get_fingerprint()

    def __repr__(self) -> str:
        return f"ClientKey(path={str(self.path)!r}, fingerprint={self.fingerprint!r})"


def ensure_client_key(path: Path, *, comment: str = "comfyvast") -> ClientKey:
    """Load the private key at ``path``, generating an ed25519 pair there on first use.

    The private key is written with mode 0600 (created that way, so it is never readable by
    others even for a moment) in a directory created 0700; the public key goes next to it as
    ``<name>.pub``. Blocking file I/O: call it at start-up, not from a busy event loop.
    """
    path = Path(path)
    pub_path = path.with_name(path.name + ".pub")
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = asyncssh.generate_private_key("ssh-ed25519", comment=comment)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process created it meanwhile; load theirs below
        else:
            with os.fdopen(fd, "wb") as fh:
                fh.write(key.export_private_key("openssh"))
            pub_path.write_bytes(key.export_public_key("openssh"))
            log.info("Generated SSH client key %s (%s)", path, key.get_fingerprint())
    key = asyncssh.read_private_key(path)
    if path.stat().st_mode & 0o077:
        # ssh(1) refuses such keys; we tighten instead so a copied file keeps working.
        log.warning("SSH client key %s was readable by others; setting mode 0600", path)
        path.chmod(0o600)
    public = key.export_public_key("openssh").decode().strip()
    if not pub_path.exists():
        pub_path.write_text(public + "\n")
    return ClientKey(path=path, public_openssh=public, _private=key)


def host_key_fingerprint(public_openssh: str) -> str:
    """The ``SHA256:...`` fingerprint of an OpenSSH public key line, for humans and logs."""
    return asyncssh.import_public_key(public_openssh).get_fingerprint()


@dataclass(frozen=True)
class SSHTarget:
    """Where to connect. ``key`` identifies it in pools: the server id when there is one."""

    host: str
    port: int = 22
    username: str = "root"
    # OpenSSH public key line ("ssh-ed25519 AAAA..."); None means trust on first use.
    pinned_host_key: str | None = field(default=None, repr=False)
    server_id: int | str | None = None

    @property
    def key(self) -> str:
        if self.server_id is not None:
            return f"server:{self.server_id}"
        return f"{self.username}@{self.address}"

    @property
    def address(self) -> str:
        return _address(self.host, self.port)


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class SSHOptions:
    """Timeouts, keepalives, retry and pool settings (the ``[ssh]`` config section)."""

    connect_timeout: float = 15.0
    # Keepalives notice a silently dead connection (e.g. a rebooted instance) within
    # interval * count_max seconds, so the pool and tunnels replace it.
    keepalive_interval: float = 15.0
    keepalive_count_max: int = 3
    connect_attempts: int = 4
    backoff_base: float = 0.5
    backoff_max: float = 10.0
    idle_timeout: float = 300.0
    # OpenSSH allows 10 sessions per connection by default (MaxSessions); stay below it.
    max_sessions_per_connection: int = 8


def backoff_delay(attempt: int, base: float, cap: float) -> float:
    """Delay before retry number ``attempt`` (1-based): exponential, capped, "equal jitter".

    Half the delay is fixed so retries really do back off, the other half is random so many
    clients that failed together do not come back together.
    """
    ceiling = min(cap, base * 2 ** (attempt - 1))
    return random.uniform(ceiling / 2, ceiling)


def quote_command(argv: list[str]) -> str:
    """Join ``argv`` into a shell command line with every element quoted (``shlex.join``)."""
    return shlex.join(argv)


# --------------------------------------------------------------------------- connecting

HostKeyLearned = Callable[["SSHTarget", str], Awaitable[None] | None]
LineCallback = Callable[[str, str], Awaitable[None] | None]


async def fetch_host_key(
    host: str, port: int = 22, *, pinned: str | None = None, timeout: float = 15.0
) -> str:
    """Return the host key ``host:port`` presents, as an OpenSSH public key line.

    First contact (``pinned`` is None): the caller stores the result as the server's pin.
    Afterwards pass the pin: the server is asked for a key of the same type, and a different
    one raises :class:`HostKeyMismatch`. Network failures raise :class:`SSHConnectError`
    (one attempt; :meth:`SSHConnector.fetch_host_key` retries).
    """
    options = SSHOptions(connect_timeout=timeout, connect_attempts=1)
    return await _fetch_with_retries(host, port, pinned, options)


async def _fetch_with_retries(host: str, port: int, pinned: str | None, options: SSHOptions) -> str:
    pinned_key = asyncssh.import_public_key(pinned) if pinned is not None else None
    # Ask for the pinned type only; otherwise a server with several host keys may offer
    # another one and look like a mismatch.
    algs = [alg.decode() for alg in pinned_key.sig_algorithms] if pinned_key else ()

    async def attempt() -> asyncssh.SSHKey | None:
        async with asyncio.timeout(options.connect_timeout):
            return await asyncssh.get_server_host_key(
                host, port, server_host_key_algs=algs, config=None
            )

    key = await _retrying(
        "Reading the host key of", host, port, attempt, options, pinned=pinned_key
    )
    if key is None:
        raise SSHConnectError(f"The SSH server {_address(host, port)} presented no host key.")
    if pinned_key is not None and key.public_data != pinned_key.public_data:
        raise HostKeyMismatch(host, port, _fp(pinned_key))
    return key.export_public_key("openssh").decode().strip()


async def _retrying(
    what: str,
    host: str,
    port: int,
    op: Callable[[], Awaitable[T]],
    options: SSHOptions,
    *,
    username: str | None = None,
    pinned: asyncssh.SSHKey | None = None,
) -> T:
    """Run one connection attempt ``op`` with retries; map failures to our errors."""
    attempts = max(1, options.connect_attempts)
    where = _address(host, port)
    for attempt in range(1, attempts + 1):
        try:
            return await op()
        except Exception as exc:
            kind, reason = _classify(exc, pinned is not None)
            if kind == "other":
                raise
            if kind == "auth":
                raise SSHAuthError(
                    f"The SSH server {where} did not accept the bot's key for user "
                    f"{username!r}; add the bot's public key to that user's authorized_keys."
                ) from exc
            if kind == "hostkey":
                raise HostKeyMismatch(host, port, _fp(pinned)) from exc
            if kind == "fatal" or attempt == attempts:
                tries = f" after {attempt} attempts" if attempt > 1 else ""
                raise SSHConnectError(
                    f"Could not connect to {where} over SSH{tries}: {reason}."
                ) from exc
            delay = backoff_delay(attempt, options.backoff_base, options.backoff_max)
            log.warning(
                "%s %s failed (%s); retry %d of %d in %.2f s",
                what,
                where,
                reason,
                attempt,
                attempts - 1,
                delay,
            )
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def _fp(key: asyncssh.SSHKey | None) -> str | None:
    return key.get_fingerprint() if key is not None else None


def _classify(exc: BaseException, pinned: bool) -> tuple[str, str]:
    """Sort a connection failure into (kind, reason phrase).

    kind is "auth", "hostkey", "transient" (worth retrying), "fatal" (a known SSH/network
    failure not worth retrying) or "other" (not a connection failure: re-raise).
    """
    if isinstance(exc, asyncssh.PermissionDenied):
        return "auth", "the key was refused"
    if isinstance(exc, asyncssh.HostKeyNotVerifiable):
        return "hostkey", "the host key changed"
    if isinstance(exc, asyncssh.KeyExchangeFailed) and pinned and "host key" in exc.reason.lower():
        # The server no longer offers a key of the pinned type at all.
        return "hostkey", "the host key changed"
    if isinstance(exc, TimeoutError):
        return "transient", "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "transient", "connection refused"
    if isinstance(exc, ConnectionResetError | ConnectionAbortedError | BrokenPipeError):
        return "transient", "connection reset"
    if isinstance(exc, asyncssh.ConnectionLost):
        return "transient", "connection lost during the handshake"
    if isinstance(exc, socket.gaierror):
        return "fatal", "the host name could not be resolved"
    if isinstance(exc, OSError):
        return "transient", exc.strerror or "network error"
    if isinstance(exc, asyncssh.DisconnectError):
        return "fatal", "the SSH handshake failed"
    return "other", ""


class _PoolClient(asyncssh.SSHClient):
    """Tells whoever owns the connection that it went away, so it is not handed out again."""

    def __init__(self, on_lost: Callable[[], None] | None) -> None:
        self._on_lost = on_lost

    def connection_lost(self, exc: Exception | None) -> None:
        if self._on_lost is not None:
            self._on_lost()


class SSHConnector:
    """Opens authenticated asyncssh connections with pinned host keys and retries.

    ``on_host_key_learned(target, key_line)`` is called once per host:port when a target
    without ``pinned_host_key`` is first contacted, so the caller can persist the pin.
    """

    def __init__(
        self,
        client_key: ClientKey,
        options: SSHOptions | None = None,
        *,
        on_host_key_learned: HostKeyLearned | None = None,
    ) -> None:
        self.client_key = client_key
        self.options = options or SSHOptions()
        self._on_host_key_learned = on_host_key_learned
        # Keys learned on first use in this process, so a later change is still caught
        # even if the caller did not persist the pin yet.
        self._learned: dict[tuple[str, int], str] = {}

    async def fetch_host_key(self, host: str, port: int = 22, *, pinned: str | None = None) -> str:
        """:func:`fetch_host_key` with this connector's timeout and retries."""
        return await _fetch_with_retries(host, port, pinned, self.options)

    def forget_host_key(self, host: str, port: int = 22) -> None:
        """Drop a key learned on first use (after an operator accepted a new one)."""
        self._learned.pop((host, port), None)

    async def host_key_for(self, target: SSHTarget) -> str:
        """The pin to check ``target`` against, learning it on first contact."""
        if target.pinned_host_key:
            return target.pinned_host_key
        learned = self._learned.get((target.host, target.port))
        if learned is not None:
            return learned
        learned = await self.fetch_host_key(target.host, target.port)
        self._learned[(target.host, target.port)] = learned
        log.info(
            "Pinned SSH host key %s for %s on first contact",
            host_key_fingerprint(learned),
            target.address,
        )
        if self._on_host_key_learned is not None:
            result = self._on_host_key_learned(target, learned)
            if inspect.isawaitable(result):
                await result
        return learned

    async def connect(
        self, target: SSHTarget, *, on_lost: Callable[[], None] | None = None
    ) -> asyncssh.SSHClientConnection:
        """Open a new connection to ``target``; the caller owns (and closes) it."""
        pinned = asyncssh.import_public_key(await self.host_key_for(target))
        opts = self.options

        async def attempt() -> asyncssh.SSHClientConnection:
            return await asyncssh.connect(
                target.host,
                target.port,
                username=target.username,
                client_keys=[self.client_key._private],
                # Only the pinned key is trusted; asyncssh also limits the host key
                # algorithms to its type.
                known_hosts=([pinned], [], []),
                connect_timeout=opts.connect_timeout,
                keepalive_interval=opts.keepalive_interval,
                keepalive_count_max=opts.keepalive_count_max,
                # Be independent of whatever ~/.ssh/config or agent the bot's host has.
                config=None,
                agent_path=None,
                preferred_auth="publickey",
                client_factory=lambda: _PoolClient(on_lost),
            )

        conn = await _retrying(
            "Connecting to",
            target.host,
            target.port,
            attempt,
            opts,
            username=target.username,
            pinned=pinned,
        )
        log.debug("SSH connection to %s established", target.address)
        return conn


# --------------------------------------------------------------------------- pool


@dataclass(frozen=True)
class CommandResult:
    exit_status: int
    stdout: str
    stderr: str


@dataclass(eq=False)
class _Entry:
    target: SSHTarget
    conn: asyncssh.SSHClientConnection
    sessions: asyncio.Semaphore
    leases: int = 0
    dead: bool = False
    idle_handle: asyncio.TimerHandle | None = None

    @property
    def alive(self) -> bool:
        return not self.dead and not self.conn.is_closed()


class SSHPool:
    """At most one connection per target, shared by commands, SFTP and tunnels.

    A connection is leased while in use; when the last lease ends it is closed after
    ``options.idle_timeout`` seconds unless someone leases it again. A connection that
    dropped is replaced on the next lease. A target whose host, port, user or pin changed
    (same :attr:`SSHTarget.key`) gets a new connection.
    """

    def __init__(self, connector: SSHConnector) -> None:
        self.connector = connector
        self.options = connector.options
        self._entries: dict[str, _Entry] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._closed = False

    # -- leasing

    @property
    def open_connections(self) -> int:
        return sum(1 for e in self._entries.values() if e.alive)

    async def _acquire(self, target: SSHTarget) -> _Entry:
        if self._closed:
            raise SSHError("The SSH connection pool is shut down.")
        lock = self._locks.setdefault(target.key, asyncio.Lock())
        async with lock:
            entry = self._entries.get(target.key)
            if entry is not None and (not entry.alive or entry.target != target):
                self._discard(entry)
                entry = None
            if entry is None:
                holder: list[_Entry] = []

                def on_lost() -> None:
                    if holder:
                        holder[0].dead = True

                conn = await self.connector.connect(target, on_lost=on_lost)
                entry = _Entry(
                    target=target,
                    conn=conn,
                    sessions=asyncio.Semaphore(self.options.max_sessions_per_connection),
                )
                holder.append(entry)
                self._entries[target.key] = entry
            if entry.idle_handle is not None:
                entry.idle_handle.cancel()
                entry.idle_handle = None
            entry.leases += 1
            return entry

    def _release(self, entry: _Entry) -> None:
        entry.leases -= 1
        if entry.leases > 0:
            return
        if not entry.alive or self._entries.get(entry.target.key) is not entry:
            self._discard(entry)
            return
        loop = asyncio.get_running_loop()
        entry.idle_handle = loop.call_later(self.options.idle_timeout, self._expire, entry)

    def _expire(self, entry: _Entry) -> None:
        entry.idle_handle = None
        if entry.leases == 0:
            log.debug("Closing idle SSH connection to %s", entry.target.address)
            self._discard(entry)

    def _discard(self, entry: _Entry) -> None:
        if self._entries.get(entry.target.key) is entry:
            del self._entries[entry.target.key]
        if entry.idle_handle is not None:
            entry.idle_handle.cancel()
            entry.idle_handle = None
        if entry.leases == 0:
            entry.conn.close()
        # A leased connection is closed by its last user; a dead one is closed already.

    @contextlib.asynccontextmanager
    async def connection(self, target: SSHTarget) -> AsyncIterator[asyncssh.SSHClientConnection]:
        """Lease the pooled connection to ``target`` for raw asyncssh use."""
        entry = await self._acquire(target)
        try:
            yield entry.conn
        finally:
            self._release(entry)

    @contextlib.asynccontextmanager
    async def _session(self, target: SSHTarget) -> AsyncIterator[asyncssh.SSHClientConnection]:
        entry = await self._acquire(target)
        try:
            async with entry.sessions:
                yield entry.conn
        finally:
            self._release(entry)

    async def close(self) -> None:
        """Close every pooled connection; the pool refuses new work afterwards."""
        self._closed = True
        entries = list(self._entries.values())
        self._entries.clear()
        for entry in entries:
            if entry.idle_handle is not None:
                entry.idle_handle.cancel()
            entry.conn.close()
        for entry in entries:
            with contextlib.suppress(Exception):
                await entry.conn.wait_closed()

    # -- commands

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
          :class:`SSHTimeout` is raised. A non-zero exit with ``check`` raises
          :class:`SSHCommandFailed` with the tail of stderr.
        """
        line, stdin_prefix = _compose(command, env, secret_env)
        payload = input.encode() if isinstance(input, str) else (input or b"")
        where = target.address
        log.debug("Running on %s: %s", where, line)
        async with self._session(target) as conn:
            creating = asyncio.ensure_future(
                asyncio.wait_for(
                    conn.create_process(line, encoding=None), self.options.connect_timeout
                )
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
            return await self._drive(
                conn, process, stdin_prefix + payload, on_line, timeout, check, where
            )

    async def _drive(
        self,
        conn: asyncssh.SSHClientConnection,
        process: asyncssh.SSHClientProcess,
        stdin: bytes,
        on_line: LineCallback | None,
        timeout: float,
        check: bool,
        where: str,
    ) -> CommandResult:
        out = _Capture("stdout", on_line)
        err = _Capture("stderr", on_line, pid_marker=True)
        readers = asyncio.gather(
            out.pump(process.stdout), err.pump(process.stderr), _feed(process, stdin)
        )
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(readers)
                await process.wait_closed()
        except TimeoutError:
            log.warning("Command on %s timed out after %g s; stopping it", where, timeout)
            await _stop(process, conn, lambda: err.pid)
            await _cancel_and_wait(readers)
            raise SSHTimeout(timeout, where=where) from None
        except (asyncssh.Error, OSError) as exc:
            await _cancel_and_wait(readers)
            raise SSHConnectError(
                f"The SSH connection to {where} was lost while a command was running."
            ) from exc
        except BaseException:
            # on_line failed or we were cancelled: do not leave the remote command running.
            await _stop(process, conn, lambda: err.pid)
            await _cancel_and_wait(readers)
            raise
        status = process.returncode
        if status is None:
            raise SSHConnectError(
                f"The SSH connection to {where} was lost while a command was running."
            )
        result = CommandResult(status, out.text(), err.text())
        if check and status != 0:
            raise SSHCommandFailed(status, _tail(result.stderr), where=where)
        return result

    # -- files

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
        where = target.address
        tmp = f"{remote_path}.part-{secrets.token_hex(4)}"
        try:
            async with asyncio.timeout(timeout), self._session(target) as conn:
                async with conn.start_sftp_client() as sftp:
                    try:
                        async with sftp.open(tmp, "wb", asyncssh.SFTPAttrs(permissions=mode)) as fh:
                            await fh.write(data)
                        # The server's umask applied at creation; set the mode asked for.
                        await sftp.chmod(tmp, mode)
                        await sftp.posix_rename(tmp, remote_path)
                    except BaseException:
                        with contextlib.suppress(Exception):
                            await sftp.remove(tmp)
                        raise
        except TimeoutError:
            raise SSHTimeout(timeout, where=where) from None
        except asyncssh.SFTPError as exc:
            raise SSHError(f"Could not write {remote_path} on {where}: {exc.reason}.") from exc
        except (asyncssh.Error, OSError) as exc:
            raise SSHConnectError(f"The SSH connection to {where} failed during upload.") from exc
        log.debug("Uploaded %d bytes to %s:%s", len(data), where, remote_path)

    async def download_bytes(
        self, target: SSHTarget, remote_path: str, max_bytes: int, *, timeout: float = 120.0
    ) -> bytes:
        """Read ``remote_path`` over SFTP; refuse files larger than ``max_bytes``."""
        where = target.address
        try:
            async with asyncio.timeout(timeout), self._session(target) as conn:
                async with conn.start_sftp_client() as sftp:
                    async with sftp.open(remote_path, "rb") as fh:
                        data = await fh.read(max_bytes + 1)
        except TimeoutError:
            raise SSHTimeout(timeout, where=where) from None
        except asyncssh.SFTPNoSuchFile as exc:
            raise SSHFileNotFound(f"There is no file {remote_path} on {where}.") from exc
        except asyncssh.SFTPError as exc:
            raise SSHError(f"Could not read {remote_path} on {where}: {exc.reason}.") from exc
        except (asyncssh.Error, OSError) as exc:
            raise SSHConnectError(f"The SSH connection to {where} failed during download.") from exc
        if len(data) > max_bytes:
            raise SSHError(f"{remote_path} on {where} is larger than {max_bytes} bytes.")
        return data

    # -- tunnels

    async def forward_local(
        self, target: SSHTarget, remote_host: str = "127.0.0.1", remote_port: int = 8188
    ) -> Tunnel:
        """Start a :class:`Tunnel` from 127.0.0.1:<random> to ``remote_host:remote_port``."""
        tunnel = Tunnel(self, target, remote_host, remote_port)
        await tunnel.start()
        return tunnel


def _compose(
    command: str, env: Mapping[str, str] | None, secret_env: Mapping[str, str] | None
) -> tuple[str, bytes]:
    """Build the command line and the stdin prefix that carries the secrets."""
    parts: list[str] = [_PID_REPORT]
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


async def _stop(
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
    """Stop a command whose start was cancelled (see SSHPool.run)."""
    try:
        process = await creating
    except (TimeoutError, asyncssh.Error, OSError):
        return
    err = _Capture("stderr", None, pid_marker=True)
    reader = asyncio.ensure_future(err.pump(process.stderr))
    try:
        await _stop(process, conn, lambda: err.pid)
    finally:
        await _cancel_and_wait(reader)


def _tail(text: str) -> str:
    lines = [ln for ln in text.rstrip().splitlines() if ln.strip()]
    tail = "\n".join(lines[-STDERR_TAIL_LINES:])
    return tail[-STDERR_TAIL_CHARS:]


class _Capture:
    """Collects one output stream and reports it line by line."""

    def __init__(
        self, name: str, on_line: LineCallback | None, *, pid_marker: bool = False
    ) -> None:
        self.name = name
        self._on_line = on_line
        self._chunks: list[bytes] = []
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._partial = ""
        # stderr starts with our pid report; hold bytes back until that line is complete.
        self._head: bytes | None = b"" if pid_marker else None
        self.pid: int | None = None

    def text(self) -> str:
        return b"".join(self._chunks).decode("utf-8", "replace")

    async def pump(self, reader: asyncssh.SSHReader[bytes]) -> None:
        while True:
            data = await reader.read(_READ_CHUNK)
            if not data:
                break
            if self._head is not None:
                data = self._strip_pid(data)
                if not data:
                    continue
            self._chunks.append(data)
            if self._on_line is not None:
                await self._emit(self._decoder.decode(data), final=False)
        if self._head:
            # Not our report after all (the shell failed before it): keep the bytes.
            self._chunks.append(self._head)
            if self._on_line is not None:
                await self._emit(self._decoder.decode(self._head), final=False)
            self._head = None
        if self._on_line is not None:
            await self._emit(self._decoder.decode(b"", final=True), final=True)

    def _strip_pid(self, data: bytes) -> bytes:
        assert self._head is not None
        head = self._head + data
        if len(head) < len(_PID_MARKER) and _PID_MARKER.startswith(head):
            self._head = head
            return b""
        if not head.startswith(_PID_MARKER):
            self._head = None
            return head
        end = head.find(b"\n")
        if end < 0:
            self._head = head
            return b""
        self._head = None
        digits = head[len(_PID_MARKER) : end]
        if digits.isdigit():
            self.pid = int(digits)
        return head[end + 1 :]

    async def _emit(self, text: str, *, final: bool) -> None:
        assert self._on_line is not None
        text = self._partial + text
        hold = ""
        if not final and text.endswith("\r"):
            # Might be the first half of "\r\n" split across reads.
            text, hold = text[:-1], "\r"
        lines = _NEWLINES.split(text)
        self._partial = lines.pop() + hold
        if final and self._partial:
            lines.append(self._partial)
            self._partial = ""
        for line in lines:
            result = self._on_line(self.name, line)
            if inspect.isawaitable(result):
                await result


# --------------------------------------------------------------------------- tunnels


class Tunnel:
    """127.0.0.1:<local_port> forwarded over SSH to ``remote_host:remote_port``.

    We own the local listener (rather than asyncssh's ``forward_local_port``) so the local
    port, and therefore :attr:`url`, stays the same across reconnects. A supervisor task
    keeps a pooled connection leased, waits for it to drop and re-establishes it with
    backoff; each accepted local connection opens a direct-tcpip channel on whatever
    connection is current.
    """

    def __init__(
        self, pool: SSHPool, target: SSHTarget, remote_host: str, remote_port: int
    ) -> None:
        self.pool = pool
        self.target = target
        self.remote_host = remote_host
        self.remote_port = remote_port
        self.local_port = 0
        self._server: asyncio.Server | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._conn: asyncssh.SSHClientConnection | None = None
        self._ready = asyncio.Event()
        self._retarget = asyncio.Event()
        self._clients: set[asyncio.Task[None]] = set()
        self._closed = False
        self.last_error: SSHError | None = None
        # How many SSH connections the tunnel has used so far (1 + reconnects).
        self.connections_made = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.local_port}"

    @property
    def connected(self) -> bool:
        return self._ready.is_set()

    @property
    def closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        return (
            f"Tunnel({self.url} -> {self.target.address} "
            f"{self.remote_host}:{self.remote_port}, connected={self.connected})"
        )

    async def start(self) -> None:
        """Listen locally and connect; raises the first connection error (e.g. auth)."""
        self._server = await asyncio.start_server(self._handle_client, "127.0.0.1", 0)
        self.local_port = self._server.sockets[0].getsockname()[1]
        # Connect once up front so configuration errors surface to the caller.
        try:
            entry = await self.pool._acquire(self.target)
        except BaseException:
            self._server.close()
            self._closed = True
            raise
        self._supervisor = asyncio.create_task(
            self._supervise(entry), name=f"ssh-tunnel-{self.target.key}-{self.remote_port}"
        )
        self._supervisor.add_done_callback(self._supervisor_done)
        log.info(
            "Tunnel %s -> %s %s:%d started",
            self.url,
            self.target.address,
            self.remote_host,
            self.remote_port,
        )

    async def wait_connected(self, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            await self._ready.wait()

    def retarget(self, target: SSHTarget) -> None:
        """Point the tunnel at a changed host/port/pin, keeping the local URL."""
        if target != self.target:
            self.target = target
            self._retarget.set()

    async def _supervise(self, entry: _Entry | None) -> None:
        failures = 0
        while not self._closed and not self.pool._closed:
            if entry is None:
                try:
                    entry = await self.pool._acquire(self.target)
                except SSHError as exc:
                    failures += 1
                    self.last_error = exc
                    delay = backoff_delay(
                        failures, self.pool.options.backoff_base, self.pool.options.backoff_max
                    )
                    log.warning(
                        "Tunnel to %s could not reconnect (%s); next try in %.2f s",
                        self.target.address,
                        exc,
                        delay,
                    )
                    await asyncio.sleep(delay)
                    continue
            failures = 0
            self.last_error = None
            self.connections_made += 1
            self._conn = entry.conn
            self._ready.set()
            closed = asyncio.ensure_future(entry.conn.wait_closed())
            retarget = asyncio.ensure_future(self._retarget.wait())
            try:
                await asyncio.wait({closed, retarget}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                closed.cancel()
                retarget.cancel()
                self._ready.clear()
                self._conn = None
                self._retarget.clear()
                self.pool._release(entry)
                entry = None
            if not self._closed:
                log.warning(
                    "Tunnel to %s lost its SSH connection; reconnecting", self.target.address
                )

    def _supervisor_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "Tunnel supervisor for %s failed", self.target.address, exc_info=task.exception()
            )

    async def _handle_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._clients.add(task)
        try:
            await self._forward(reader, writer)
        except asyncio.CancelledError:
            # close() cancels open forwards; start_server would report a cancelled handler
            # task as an error, so it ends quietly here (this task is the handler's own).
            pass
        except Exception:
            log.exception("Tunnel %s: forwarding a connection failed", self.url)
        finally:
            if task is not None:
                self._clients.discard(task)

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                await self.wait_connected(self.pool.options.connect_timeout)
            except TimeoutError:
                log.warning("Tunnel %s: no SSH connection; dropping a local client", self.url)
                return
            conn = self._conn
            if conn is None:
                return
            try:
                remote_reader, remote_writer = await conn.open_connection(
                    self.remote_host, self.remote_port
                )
            except (asyncssh.Error, OSError) as exc:
                log.warning(
                    "Tunnel %s: could not open %s:%d on %s: %s",
                    self.url,
                    self.remote_host,
                    self.remote_port,
                    self.target.address,
                    exc,
                )
                return
            try:
                await asyncio.gather(_pipe(reader, remote_writer), _pipe(remote_reader, writer))
            finally:
                remote_writer.close()
        finally:
            writer.close()

    async def close(self) -> None:
        """Stop listening, drop forwarded connections and release the SSH connection."""
        if self._closed and self._supervisor is None:
            return
        self._closed = True
        if self._server is not None:
            self._server.close()
        for task in list(self._clients):
            task.cancel()
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None
        if self._clients:
            await asyncio.gather(*self._clients, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
        log.info("Tunnel %s closed", self.url)


async def _pipe(
    reader: asyncio.StreamReader | asyncssh.SSHReader[bytes],
    writer: asyncio.StreamWriter | asyncssh.SSHWriter[bytes],
) -> None:
    """Copy until EOF, then pass the EOF on (HTTP clients half-close)."""
    try:
        while True:
            data = await reader.read(_READ_CHUNK)
            if not data:
                break
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError, asyncssh.Error):
        # Either side went away; closing both ends (in the caller) is all there is to do.
        writer.close()


class TunnelManager:
    """One :class:`Tunnel` per (server, remote port), so each server keeps one local URL."""

    def __init__(self, pool: SSHPool) -> None:
        self.pool = pool
        self._tunnels: dict[tuple[str, str, int], Tunnel] = {}
        self._lock = asyncio.Lock()

    async def get(
        self, target: SSHTarget, remote_port: int = 8188, remote_host: str = "127.0.0.1"
    ) -> Tunnel:
        """The live tunnel for ``target``, started on first use."""
        key = (target.key, remote_host, remote_port)
        async with self._lock:
            tunnel = self._tunnels.get(key)
            if tunnel is not None and not tunnel.closed:
                tunnel.retarget(target)
                return tunnel
            tunnel = await self.pool.forward_local(target, remote_host, remote_port)
            self._tunnels[key] = tunnel
            return tunnel

    async def url(self, target: SSHTarget, remote_port: int = 8188) -> str:
        return (await self.get(target, remote_port)).url

    async def close(self, target: SSHTarget) -> None:
        """Close every tunnel to ``target`` (e.g. when the server is stopped)."""
        async with self._lock:
            keys = [k for k in self._tunnels if k[0] == target.key]
            tunnels = [self._tunnels.pop(k) for k in keys]
        for tunnel in tunnels:
            await tunnel.close()

    async def close_all(self) -> None:
        async with self._lock:
            tunnels = list(self._tunnels.values())
            self._tunnels.clear()
        for tunnel in tunnels:
            await tunnel.close()
