"""The team's GPU servers: ``validation`` checks names and addresses, ``registry`` owns
the rows and the read-only views. Their names are re-exported here."""

from core.servers.registry import ServerRegistry, ServerView
from core.servers.validation import (
    HOST_RE,
    NAME_RE,
    USER_RE,
    validate_comfy_url,
    validate_name,
    validate_ssh_target,
)

__all__ = [
    "HOST_RE",
    "NAME_RE",
    "USER_RE",
    "ServerRegistry",
    "ServerView",
    "validate_comfy_url",
    "validate_name",
    "validate_ssh_target",
]
