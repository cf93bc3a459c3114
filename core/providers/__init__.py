"""The kinds of server, one module each; :func:`provider_for` picks a server's.

``base`` holds :class:`ServerProvider` (what differs per kind), ``vast``, ``ssh`` and
``direct`` one kind each.
"""

from __future__ import annotations

from core.errors import ValidationFailed
from core.providers.base import ServerFields, ServerProvider
from core.providers.direct import DirectProvider
from core.providers.ssh import SSHProvider
from core.providers.vast import VastProvider

__all__ = [
    "PROVIDERS",
    "DirectProvider",
    "SSHProvider",
    "ServerFields",
    "ServerProvider",
    "VastProvider",
    "has_shell",
    "kinds",
    "provider_for",
]

PROVIDERS: dict[str, ServerProvider] = {
    p.kind: p for p in (VastProvider(), SSHProvider(), DirectProvider())
}


def provider_for(server: ServerFields | str) -> ServerProvider:
    """The provider of a server (a view or a row), or of a kind's name."""
    kind = server if isinstance(server, str) else server.provider
    try:
        return PROVIDERS[kind]
    except KeyError:
        raise ValidationFailed(f"Unknown server kind '{kind}'.") from None


def has_shell(server: ServerFields) -> bool:
    """Whether the bot has a shell (SSH) on this server."""
    return provider_for(server).has_shell(server)


def kinds(*, synced: bool | None = None) -> list[str]:
    """The kinds' names, optionally only those the periodic sync reconciles."""
    return [k for k, p in PROVIDERS.items() if synced is None or p.synced == synced]
