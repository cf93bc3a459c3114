"""Server names and addresses: checks on what an admin types (name, ComfyUI URL, SSH
address), and the name a rented server gets when the admin gives none."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from core.errors import ValidationFailed

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")
HOST_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,252})$|^\[?[0-9A-Fa-f:.]+\]?$")
USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")


def validate_name(name: str) -> str:
    name = name.strip().lower()
    if not NAME_RE.match(name):
        raise ValidationFailed(
            "Server names are 1-32 characters: lowercase letters, digits and dashes, "
            "starting with a letter or digit."
        )
    return name


def validate_comfy_url(url: str) -> str:
    url = url.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValidationFailed(
            "The ComfyUI URL must start with http:// or https:// and name a host."
        )
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ValidationFailed("The ComfyUI URL must not carry credentials, a query or a fragment.")
    return url


def validate_ssh_target(host: str, port: int, user: str) -> tuple[str, int, str]:
    host = host.strip()
    if not HOST_RE.match(host) or host.startswith("-"):
        raise ValidationFailed("The SSH host must be a hostname or an IP address.")
    if not 1 <= port <= 65535:
        raise ValidationFailed("The SSH port must be between 1 and 65535.")
    if not USER_RE.match(user):
        raise ValidationFailed("The SSH user must be a plain Unix user name.")
    return host, port, user


def default_name(gpu: str, taken: list[str]) -> str:
    """A free name from the GPU model: "rtx-4090-1", "rtx-4090-2", ..."""
    base = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")[:24] or "gpu"
    n = 1
    while f"{base}-{n}" in taken:
        n += 1
    return f"{base}-{n}"
