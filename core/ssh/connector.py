"""Opening connections: :class:`SSHConnector`, :func:`fetch_host_key`, retries and pinning.

``known_hosts`` is always built from the pinned key, never ``None``. A target without a pin
is trusted on first use: the key the server presents is learned, remembered, and handed to
``on_host_key_learned`` so the caller can store it; from then on a different key raises
:class:`HostKeyMismatch`. Transient failures (refused, reset, timed out) are retried with
equal-jitter exponential backoff (:meth:`SSHOptions.backoff`); authentication failures and
host key mismatches are not, because repeating them cannot help and may lock the account.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncssh

from core.ssh.errors import HostKeyMismatch, SSHAuthError, SSHConnectError
from core.ssh.keys import ClientKey, host_key_fingerprint
from core.ssh.target import SSHOptions, SSHTarget, address

log = logging.getLogger(__name__)

T = TypeVar("T")

HostKeyLearned = Callable[[SSHTarget, str], Awaitable[None] | None]


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
        raise SSHConnectError(f"The SSH server {address(host, port)} presented no host key.")
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
    """Run one connection attempt ``op`` with retries; map failures to our errors.

    The loop stays hand-written (not tenacity's) because each failure is sorted first:
    only transient ones are retried, auth and host key failures end it at once.
    """
    attempts = max(1, options.connect_attempts)
    delays = options.backoff()
    where = address(host, port)
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
            delay = delays.delay(attempt)
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
        # Further keys offered after client_key: during a key rotation the bot holds the
        # old and the new key, and a server may accept only one of them (core.servers.keys).
        self.extra_keys: tuple[ClientKey, ...] = ()
        self.options = options or SSHOptions()
        self._on_host_key_learned = on_host_key_learned
        # Keys learned on first use in this process, so a later change is still caught
        # even if the caller did not persist the pin yet.
        self._learned: dict[tuple[str, int], str] = {}

    def use_keys(self, primary: ClientKey, *extra: ClientKey) -> None:
        """Authenticate new connections with ``primary``, then each of ``extra``."""
        self.client_key = primary
        self.extra_keys = tuple(k for k in extra if k.fingerprint != primary.fingerprint)

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
                client_keys=[k.private_key for k in (self.client_key, *self.extra_keys)],
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
