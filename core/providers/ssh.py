"""A GPU host the team owns, reached over SSH: a shell, ComfyUI through a tunnel, no bill."""

from __future__ import annotations

from core.db.models import Provider
from core.providers.base import ServerProvider


class SSHProvider(ServerProvider):
    kind = Provider.SSH.value
    what = "your own host"
