"""Adding servers the team already has (nothing rented): a ComfyUI URL, or an SSH host.

A URL is registered once ComfyUI answers there. An SSH host's key is trusted on first
use: the key seen at the first contact is pinned in the row and checked at every
connection after; a host that refuses the bot's key gets the line to add to
``authorized_keys``.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from core.audit import Actor
from core.comfy.client import ComfyClient, SystemStats
from core.comfy.errors import ComfyError
from core.errors import ValidationFailed
from core.netguard import refused_address
from core.remote import Remote
from core.servers.registry import ServerRegistry, ServerView
from core.servers.validation import (
    REFUSED_ADDRESS,
    validate_comfy_url,
    validate_name,
    validate_ssh_target,
)
from core.ssh import SSHAuthError, SSHTarget, host_key_fingerprint


@dataclass(frozen=True, slots=True)
class AddedURL:
    server: ServerView
    #: What ComfyUI reported when it was checked.
    stats: SystemStats
    #: From asking ComfyUI to the server being registered.
    answered_ms: float


@dataclass(frozen=True, slots=True)
class AddedHost:
    server: ServerView
    #: The pinned host key's fingerprint, to show the admin.
    fingerprint: str


async def add_direct_host(
    registry: ServerRegistry,
    client_for: Callable[[str], ComfyClient],
    actor: Actor,
    name: str,
    url: str,
) -> AddedURL:
    """Check that ComfyUI answers at ``url``, then register it."""
    url = validate_comfy_url(url)
    name = validate_name(name)
    await check_addresses(url)
    client = client_for(url)
    started = time.monotonic()
    try:
        stats = await client.system_stats()
    except ComfyError as exc:
        raise ValidationFailed(f"ComfyUI did not answer at {url}: {exc}") from None
    server = await registry.add_direct(actor, name, url)
    return AddedURL(server, stats, (time.monotonic() - started) * 1000)


# A name that takes longer than this to resolve is refused (getaddrinfo has no timeout).
RESOLVE_TIMEOUT = 15.0


async def check_addresses(url: str) -> None:
    """Refuse ``url`` when its host resolves to any link-local or metadata address.

    Every address counts, not just the first: the connection may use any of them. A name
    that is later made to resolve elsewhere (DNS rebinding) is caught on each connection
    by :class:`core.netguard.GuardedResolver`.
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = await asyncio.wait_for(
            asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM),
            RESOLVE_TIMEOUT,
        )
    except (OSError, UnicodeError, TimeoutError):
        raise ValidationFailed(f"The host {host} could not be resolved.") from None
    if not infos or any(refused_address(str(info[4][0])) for info in infos):
        raise ValidationFailed(REFUSED_ADDRESS)


async def add_ssh_host(
    registry: ServerRegistry,
    remote: Remote,
    actor: Actor,
    name: str,
    host: str,
    port: int,
    user: str,
    *,
    comfy_port: int,
) -> AddedHost:
    """Pin the host's key, log in once to prove the bot's key works, then register it."""
    host, port, user = validate_ssh_target(host, port, user)
    await registry.ensure_name_free(validate_name(name))
    try:
        # Trust on first use: the key seen now is pinned and checked ever after.
        host_key = await remote.connector.fetch_host_key(host, port)
        target = SSHTarget(host, port, user, pinned_host_key=host_key)
        await remote.pool.run(target, "true", timeout=30)
    except SSHAuthError:
        raise ValidationFailed(
            f"{user}@{host}:{port} refused the bot's key. Add this line to "
            f"~{user}/.ssh/authorized_keys there, then try again:\n"
            f"`{remote.key.public_openssh}`"
        ) from None
    server = await registry.add_ssh(actor, name, host, port, user, host_key, comfy_port=comfy_port)
    return AddedHost(server, host_key_fingerprint(host_key))
