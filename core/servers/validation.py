"""Server names and addresses: checks on what an admin types (name, ComfyUI URL, SSH
address), and the name a rented server gets when the admin gives none."""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

from core.errors import ValidationFailed

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")
# One DNS label (RFC 1123): letters, digits and inner dashes, at most 63 characters.
LABEL_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
MAX_HOSTNAME = 253
USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
# Server ids are 32-bit (an Integer primary key); more digits than this is never an id.
MAX_SERVER_ID = 2**31 - 1
# How much of a member's text an error message repeats.
SHOWN_REF = 40


def validate_name(name: str) -> str:
    name = name.strip().lower()
    if not NAME_RE.match(name):
        raise ValidationFailed(
            "Server names are 1-32 characters: lowercase letters, digits and dashes, "
            "starting with a letter or digit."
        )
    if name.isdigit():
        # "2" would read as server id 2 wherever a server is named (parse_server_ref).
        raise ValidationFailed(
            "A server name needs a letter or a dash: digits alone read as an id."
        )
    return name


def parse_server_ref(value: str | int) -> tuple[int | None, str | None]:
    """What a member typed for a server: (id to try first, name to try next).

    ``#12`` is server id 12 and nothing else. Plain ASCII digits are an id first and a name
    after (only rows from before all-digit names were refused can have such a name, so
    a new name is never shadowed by an id). Anything else is a name. ``str.isdigit`` is
    not enough: it accepts "²" and other digits ``int`` refuses, and thirty 9s overflow
    the database's integer, so ids are ASCII and bounded.
    """
    if isinstance(value, int):
        return (value if 1 <= value <= MAX_SERVER_ID else None), None
    text = value.strip()
    if text.startswith("#"):
        digits = text[1:]
        return (_bounded_id(digits), None)
    # Any other text is compared as a name (a bound parameter, never parsed): destroyed
    # servers keep a renamed row ("box~3") that does not match NAME_RE.
    return _bounded_id(text), (text.lower() or None)


def _bounded_id(digits: str) -> int | None:
    if not (digits.isascii() and digits.isdigit()) or len(digits) > 10:
        return None
    number = int(digits)
    return number if 1 <= number <= MAX_SERVER_ID else None


def shown_ref(value: str | int) -> str:
    """A member's server text as an error message repeats it: short and on one line."""
    text = " ".join(str(value).split())
    return text if len(text) <= SHOWN_REF else text[: SHOWN_REF - 1] + "…"


def validate_comfy_url(url: str) -> str:
    url = url.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValidationFailed(
            "The ComfyUI URL must start with http:// or https:// and name a host."
        )
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ValidationFailed("The ComfyUI URL must not carry credentials, a query or a fragment.")
    try:
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number
    except ValueError:
        raise ValidationFailed("The ComfyUI URL's port must be a number up to 65535.") from None
    validate_host(parts.hostname)
    if parts.hostname.rstrip(".").lower() in METADATA_HOSTS:
        raise ValidationFailed(REFUSED_ADDRESS)
    return url


# Cloud metadata services answer on link-local addresses (refused by address) and under
# these names (refused by name, before anything is resolved): GCP, AWS, Azure, OpenStack.
METADATA_HOSTS = frozenset({
    "metadata", "metadata.google.internal", "metadata.goog", "instance-data",
    "instance-data.ec2.internal", "metadata.azure.internal",
})
REFUSED_ADDRESS = (
    "That address is link-local, unspecified or a cloud metadata service; the bot does not "
    "connect there."
)


def validate_host(host: str) -> str:
    """A hostname (RFC 1123 labels of at most 63 characters, 253 in all, IDNA-safe) or an
    IPv4/IPv6 literal (brackets allowed); the host as it will be used, else refused.

    A name that passes also passes Python's IDNA codec, so resolving it cannot raise
    ``UnicodeError`` (a 100-letter label used to: "label too long").
    """
    text = host.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return ipaddress.ip_address(text).compressed
    except ValueError:
        pass
    name = text[:-1] if text.endswith(".") else text
    if not name.isascii():
        # An internationalised name is used in its ASCII form (xn--...), which is what
        # resolving it would send anyway; a name the codec refuses is refused here.
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            raise ValidationFailed("The host is not a valid internationalised name.") from None
    labels = name.split(".")
    if (
        not name
        or len(name) > MAX_HOSTNAME
        or not all(LABEL_RE.match(label) for label in labels)
        # "1.2.3" or "999.1.1.1" is a mistyped address, not a name (RFC 3696 2).
        or labels[-1].isdigit()
    ):
        raise ValidationFailed(
            "The host must be an IP address or a hostname (labels of letters, digits and "
            "dashes, at most 63 characters each and 253 in all)."
        )
    try:
        name.encode("idna").decode("idna")
    except UnicodeError:
        raise ValidationFailed("The host is not a valid internationalised name.") from None
    return name


def validate_ssh_target(host: str, port: int, user: str) -> tuple[str, int, str]:
    try:
        host = validate_host(host)
    except ValidationFailed:
        raise ValidationFailed(
            "The SSH host must be a hostname or an IP address (labels of at most 63 "
            "characters, 253 in all)."
        ) from None
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
