"""Where the bot reaches each server's ComfyUI: its URL, a public port, or an SSH tunnel."""

from __future__ import annotations

import logging
from typing import Protocol

from core.errors import ExternalServiceError
from core.providers import provider_for
from core.servers import ServerView

log = logging.getLogger(__name__)


class TunnelSource(Protocol):
    async def url_for(self, server: ServerView) -> str: ...


class EndpointResolver:
    """Turns a server row into a ComfyUI base URL.

    ``direct`` servers carry their URL. ``ssh`` and ``vast`` servers keep ComfyUI on
    127.0.0.1 and are reached through an SSH tunnel, unless the port is exposed publicly
    (then they carry a URL too); the server's provider says which.
    """

    def __init__(self, tunnels: TunnelSource | None) -> None:
        self._tunnels = tunnels

    async def resolve(self, server: ServerView) -> str:
        if not provider_for(server).tunnelled(server):
            if not server.comfy_url:
                raise ExternalServiceError(f"Server '{server.name}' has no ComfyUI URL.")
            return server.comfy_url
        if self._tunnels is None:
            raise ExternalServiceError(
                f"Server '{server.name}' is reached over SSH, which is not available."
            )
        return await self._tunnels.url_for(server)
