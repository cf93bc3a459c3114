"""Doctor checks for the Vast.ai account and each registered server."""

from __future__ import annotations

import aiohttp

from core.config import Settings


async def server_checks(settings: Settings, http: aiohttp.ClientSession) -> list:  # type: ignore[type-arg]
    return []
