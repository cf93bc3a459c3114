"""Download sources: which URLs are allowed, how they are shown (redacted), which token
goes to which host, and probing the source from the server before anything is written."""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from pydantic import SecretStr

from core.config import Settings
from core.errors import ValidationFailed
from core.model_files.curl import curl_config
from core.model_files.shell import MARK, last_line, marker_int
from core.model_files.types import DownloadFailed, SourceError
from core.redact import redact_url  # noqa: F401 - the one redaction, re-exported
from core.servers import ServerView
from core.ssh import SSHPool, SSHTarget

# Hosts whose token from the config is sent (a host matches itself and its subdomains).
HF_HOSTS = ("huggingface.co", "hf.co")
CIVITAI_HOSTS = ("civitai.com",)

MAX_URL_LENGTH = 2048
PROBE_TIMEOUT = 30


def validate_url(url: str, http_allowlist: Iterable[str] = ()) -> str:
    """An https:// URL (http:// only for allow-listed hosts) without credentials."""
    url = url.strip()
    if not url:
        raise ValidationFailed("The URL is empty.")
    if len(url) > MAX_URL_LENGTH:
        raise ValidationFailed(f"The URL is longer than {MAX_URL_LENGTH} characters.")
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in url):
        raise ValidationFailed("The URL must not contain spaces or control characters.")
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        raise ValidationFailed("That is not a valid URL.") from None
    scheme = parts.scheme.lower()
    allowed = {h.lower() for h in http_allowlist}
    if scheme != "https" and not (scheme == "http" and host and host.lower() in allowed):
        raise ValidationFailed(
            "Only https:// URLs can be downloaded (http:// only from hosts listed in "
            "comfy.http_allowlist)."
        )
    if not host:
        raise ValidationFailed("The URL must name a host.")
    if parts.username is not None or parts.password is not None:
        raise ValidationFailed(
            "The URL must not carry a user name or password; put Hugging Face and Civitai "
            "tokens in the configuration instead."
        )
    return url


def curl_protocols(url: str) -> str:
    """curl's --proto for ``url``: https only, unless the URL itself was allowed http."""
    return "=https" if urlsplit(url).scheme.lower() == "https" else "=http,https"


def _host_matches(host: str, domains: Iterable[str]) -> bool:
    host = host.lower().rstrip(".")
    return any(host == d or host.endswith("." + d) for d in domains)


def token_hosts(settings: Settings) -> dict[str, SecretStr]:
    """Host suffix -> token; a token goes only to its own hosts (and their subdomains)."""
    hosts_of: dict[str, SecretStr] = {}
    for hosts, token in (
        (HF_HOSTS, settings.comfy.hf_token),
        (CIVITAI_HOSTS, settings.comfy.civitai_token),
    ):
        if token is not None and token.get_secret_value():
            for host in hosts:
                hosts_of[host] = token
    return hosts_of


def auth_headers(tokens: dict[str, SecretStr], url: str) -> list[str]:
    """Authorization headers for ``url``'s host from the configured tokens.

    curl sends a custom Authorization header only to the host it was given for, not
    to the hosts a redirect leads to (CDNs with signed URLs), unless --location-trusted.
    """
    host = urlsplit(url).hostname or ""
    for domain, token in tokens.items():
        if _host_matches(host, [domain]):
            return [f"Authorization: Bearer {token.get_secret_value()}"]
    return []


@dataclass(frozen=True, slots=True)
class Probe:
    status: int
    size: int | None
    content_disposition: str | None


async def probe(
    ssh: SSHPool, target: SSHTarget, server: ServerView, url: str, headers: list[str],
    proto: str,
) -> Probe:
    """Ask the source for the first byte (from the server): status, size, file name.

    A range GET rather than HEAD because signed CDN URLs (Hugging Face, Civitai) are
    often signed for GET only. --max-filesize stops a source that ignores the range.
    """
    config = curl_config(url, headers)
    script = (
        f"command -v curl >/dev/null 2>&1 || {{ echo {MARK}nocurl; exit 0; }}; "
        f"curl -K - -sS -L --max-redirs 10 --proto {shlex.quote(proto)} "
        f"--proto-redir {shlex.quote(proto)} --range 0-0 --max-filesize 1048576 "
        f"--connect-timeout 15 --max-time {PROBE_TIMEOUT} -o /dev/null -D - "
        f"-w '\\n{MARK}status %{{http_code}}\\n'; echo \"{MARK}exit $?\""
    )
    result = await ssh.run(target, script, timeout=PROBE_TIMEOUT + 15, input=config, check=True)
    out = result.stdout
    if f"{MARK}nocurl" in out:
        raise DownloadFailed(f"curl is not installed on '{server.name}'; install it first.")
    status = marker_int(out, "status") or 0
    code = marker_int(out, "exit") or 0
    if status == 0:
        reason = last_line(result.stderr) or f"curl exit status {code}"
        raise SourceError(f"The server '{server.name}' could not reach the URL: {reason}.")
    blocks = _header_blocks(out)
    final = blocks[-1] if blocks else {}
    raise_for_source_status(status)
    size: int | None = None
    content_range = final.get("content-range", "")
    match = re.search(r"/(\d+)\s*$", content_range)
    if status == 206 and match:
        size = int(match.group(1))
    elif status == 200 and final.get("content-length", "").isdigit():
        size = int(final["content-length"])
    return Probe(status, size, final.get("content-disposition"))


def raise_for_source_status(status: int) -> None:
    if status < 400:
        return
    if status in (404, 410):
        raise SourceError("The source answered HTTP 404: there is no file at that URL.", status)
    if status in (401, 403):
        raise SourceError(
            f"The source refused access (HTTP {status}); the model may need a Hugging Face or "
            "Civitai token in the configuration, or accepting its licence on the website.",
            status,
        )
    raise SourceError(f"The source answered HTTP {status}.", status)


def _header_blocks(text: str) -> list[dict[str, str]]:
    """Headers of each response curl -D printed (one block per redirect hop)."""
    blocks: list[dict[str, str]] = []
    for line in text.splitlines():
        line = line.rstrip("\r")
        if line.startswith("HTTP/"):
            blocks.append({})
        elif blocks and ":" in line and not line.startswith(MARK):
            name, value = line.split(":", 1)
            blocks[-1][name.strip().lower()] = value.strip()
    return blocks
