"""A ComfyUI that already runs at a URL: no shell, no tunnel, nothing to power or bill."""

from __future__ import annotations

from core.db.models import Provider
from core.providers.base import ServerFields, ServerProvider


class DirectProvider(ServerProvider):
    kind = Provider.DIRECT.value
    what = "a ComfyUI URL"

    def has_shell(self, server: ServerFields) -> bool:
        return False

    def tunnelled(self, server: ServerFields) -> bool:
        return False
