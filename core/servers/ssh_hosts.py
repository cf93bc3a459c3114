"""Adding a host the team owns: trust its host key on first use, check the bot can log in.

The key seen at the first contact is pinned in the row and checked at every connection
after; a host that refuses the bot's key gets the line to add to ``authorized_keys``.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.audit import Actor
from core.errors import ValidationFailed
from core.remote import Remote
from core.servers.registry import ServerRegistry, ServerView
from core.servers.validation import validate_name, validate_ssh_target
from core.ssh import SSHAuthError, SSHTarget, host_key_fingerprint


@dataclass(frozen=True, slots=True)
class AddedHost:
    server: ServerView
    #: The pinned host key's fingerprint, to show the admin.
    fingerprint: str


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
