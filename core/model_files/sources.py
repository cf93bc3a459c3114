"""Download sources: which URLs are allowed, how they are shown (redacted), which token
goes to which host, and probing the source from the server before anything is written.

Redirects: Hugging Face and Civitai answer every file URL with a redirect to a CDN or a
signed storage URL, so a source's redirects are followed, but the probe follows them hop
by hop and checks each target first (:func:`redirect_problem`): a redirect may stay on the
origin the member gave, or go to a public https host; never to http elsewhere, to an IP
literal that is not global (loopback, private, link-local such as a cloud metadata
service), or to localhost/.internal/.local names. At most :data:`MAX_REDIRECTS` hops.
Names are not resolved by the bot (curl resolves them on the server), so a public name
that resolves to a private address is not caught; the probe only reports a status, a size
and a file name, and the body is only ever written into the model folder.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

from pydantic import SecretStr

from core.config import Settings
from core.errors import ValidationFailed
from core.model_files.curl import curl_config
from core.model_files.shell import MARK, last_line, marker_int
from core.model_files.types import DownloadFailed, SourceError
from core.redact import redact_url  # noqa: F401 - the one redaction, re-exported
from core.servers import ServerView
from core.ssh import SSHPool, SSHTarget

log = logging.getLogger(__name__)

# Hosts whose token from the config is sent (a host matches itself and its subdomains).
HF_HOSTS = ("huggingface.co", "hf.co")
CIVITAI_HOSTS = ("civitai.com",)

MAX_URL_LENGTH = 2048
PROBE_TIMEOUT = 30
MAX_REDIRECTS = 10
_REDIRECT_STATUSES = (301, 302, 303, 307, 308)
_INTERNAL_SUFFIXES = (".localhost", ".internal", ".local", ".localdomain", ".home.arpa")
# A host written as numbers (2130706433, 0x7f.1, 127.1): curl takes these as IPv4.
_NUMERIC_HOST = re.compile(r"^(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+))*$")


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


def _internal_host(host: str) -> bool:
    host = host.lower().rstrip(".")
    if host == "localhost" or host.endswith(_INTERNAL_SUFFIXES):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return bool(_NUMERIC_HOST.match(host))  # numeric forms: refused, no CDN uses them
    return not address.is_global


def _origin(parts: SplitResult) -> tuple[str, str, int | None]:
    scheme = parts.scheme.lower()
    port = parts.port or {"http": 80, "https": 443}.get(scheme)
    return scheme, (parts.hostname or "").lower(), port


def redirect_problem(start_url: str, target: str) -> str | None:
    """Why a redirect from the member's URL chain to ``target`` is not followed, or None.

    Allowed: the origin of ``start_url`` (already validated, including the http
    allow-list), or https to a public host.
    """
    if len(target) > MAX_URL_LENGTH or any(ch.isspace() or ord(ch) < 32 for ch in target):
        return "the target is not a valid URL"
    try:
        parts = urlsplit(target)
        origin = _origin(parts)
    except ValueError:
        return "the target is not a valid URL"
    if parts.username is not None or parts.password is not None:
        return "the target carries a user name or password"
    if origin == _origin(urlsplit(start_url)):
        return None
    if origin[0] != "https":
        return "the target is not https"
    if not origin[1] or _internal_host(origin[1]):
        return "the target is an internal address"
    return None


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
    Redirects are followed here, one curl run per hop, each target checked first (see
    the module docstring); the token headers go only to the host they were given for.
    """
    host = (urlsplit(url).hostname or "").lower()
    hop = url
    for _ in range(MAX_REDIRECTS + 1):
        hop_headers = headers if (urlsplit(hop).hostname or "").lower() == host else []
        status, out, location = await _probe_once(ssh, target, server, hop, hop_headers, proto)
        if status not in _REDIRECT_STATUSES or not location:
            return _probe_result(status, out)
        problem = redirect_problem(url, location)
        if problem is not None:
            # The target may carry a signed query: it is named only redacted, in the log.
            log.warning("Not following a redirect of %s to %s: %s", redact_url(url),
                        redact_url(location), problem)
            raise SourceError(
                f"The source redirected to an address the bot does not follow ({problem}).",
                status,
            )
        hop = location
    raise SourceError(f"The source redirected more than {MAX_REDIRECTS} times.")


async def _probe_once(
    ssh: SSHPool, target: SSHTarget, server: ServerView, url: str, headers: list[str],
    proto: str,
) -> tuple[int, str, str]:
    """One request without following redirects: (status, output, redirect target)."""
    config = curl_config(url, headers)
    script = (
        f"command -v curl >/dev/null 2>&1 || {{ echo {MARK}nocurl; exit 0; }}; "
        f"curl -K - -sS --proto {shlex.quote(proto)} "
        f"--range 0-0 --max-filesize 1048576 "
        f"--connect-timeout 15 --max-time {PROBE_TIMEOUT} -o /dev/null -D - "
        f"-w '\\n{MARK}status %{{http_code}}\\n{MARK}location %{{redirect_url}}\\n'; "
        f"echo \"{MARK}exit $?\""
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
    location = ""
    for line in out.splitlines():
        if line.startswith(f"{MARK}location "):
            location = line[len(f"{MARK}location "):].strip()
    return status, out, location


def _probe_result(status: int, out: str) -> Probe:
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
