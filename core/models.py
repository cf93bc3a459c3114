"""ModelService: what model files a server has, downloading new ones, deleting old ones.

Listing asks ComfyUI (``GET /models/{folder}``) when it answers and falls back to reading
``<install>/models/<folder>`` over SSH when it does not; results are cached per server and
refreshed after every change and on demand.

Downloads run **on the server** with curl over SSH; model files never pass through the bot.
Each one is checked before anything is written: https only (http only for hosts in
``comfy.http_allowlist``), a folder from :data:`MODEL_FOLDERS`, a plain file name with a known
model extension, the source answering a one-byte range probe, and enough free disk (a real
``df -Pk``). curl writes to a hidden temporary name in the target folder, which a later run
resumes, and the file is renamed only once it is complete (and its sha256 matches, when one
was given). The URL and the Hugging Face / Civitai tokens reach curl through a config file
on its stdin (``curl -K -``), so neither appears in the server's process list nor in our logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import email.message
import inspect
import logging
import posixpath
import re
import shlex
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Protocol
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from pydantic import SecretStr
from sqlalchemy import update

from core.audit import OUTCOME_ERROR, OUTCOME_OK, Actor, AuditService
from core.comfy.errors import ComfyNotFound
from core.comfy.pool import ComfyPool
from core.config import Settings
from core.db.engine import SessionFactory
from core.db.models import ModelDownload, Provider, utcnow
from core.errors import (
    ComfyVastError,
    ExternalServiceError,
    NotFound,
    ResourceBusy,
    ValidationFailed,
)
from core.servers import ServerRegistry, ServerView
from core.ssh import CommandResult, LineCallback, SSHPool, SSHTarget

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_INSTALL_DIR",
    "MODEL_EXTENSIONS",
    "MODEL_FOLDERS",
    "CurlProgress",
    "DiskFull",
    "DownloadFailed",
    "DownloadObserver",
    "DownloadRequest",
    "DownloadView",
    "ModelListing",
    "ModelService",
    "SourceError",
    "filename_from_source",
    "parse_curl_size",
    "parse_df_available",
    "redact_url",
    "temp_name",
    "validate_filename",
    "validate_folder",
    "validate_model_path",
    "validate_url",
]

# Where ComfyUI lives on a server unless told otherwise; models are in <install>/models.
DEFAULT_INSTALL_DIR = "/opt/ComfyUI"

# ComfyUI's standard model folders. "unet" and "clip" are the older names of
# "diffusion_models" and "text_encoders"; ComfyUI reads both, so both are allowed.
MODEL_FOLDERS: tuple[str, ...] = (
    "checkpoints",
    "loras",
    "vae",
    "embeddings",
    "controlnet",
    "upscale_models",
    "clip",
    "clip_vision",
    "unet",
    "diffusion_models",
    "text_encoders",
)

# What ComfyUI loads (folder_paths.supported_pt_extensions, plus GGUF for the popular loader
# nodes and ONNX for some upscalers/detectors). Plain pickles (.pkl) are left out on purpose.
MODEL_EXTENSIONS: tuple[str, ...] = (
    ".safetensors",
    ".sft",
    ".ckpt",
    ".pt",
    ".pt2",
    ".pth",
    ".bin",
    ".gguf",
    ".onnx",
)

# Hosts whose token from the config is sent (a host matches itself and its subdomains).
HF_HOSTS = ("huggingface.co", "hf.co")
CIVITAI_HOSTS = ("civitai.com",)

MAX_URL_LENGTH = 2048
MAX_FILENAME_LENGTH = 200
# Disk that must stay free besides the file itself: ComfyUI, pip and outputs need room too.
DEFAULT_RESERVE_BYTES = 512 * 1024**2
DEFAULT_DOWNLOAD_TIMEOUT = 6 * 3600.0
COMMAND_TIMEOUT = 60.0
PROBE_TIMEOUT = 30
HASH_TIMEOUT = 1800.0
LISTING_TTL = 300.0
LISTING_API_TIMEOUT = 10.0
# Autocomplete must answer within Discord's 3 s, so a cold cache gets this long at most.
NAMES_REFRESH_TIMEOUT = 2.0
PROGRESS_DB_INTERVAL = 5.0
TOUCH_INTERVAL = 60.0
# curl gives up on a transfer slower than this many bytes/s for this many seconds.
STALL_BYTES_PER_SECOND = 1024
STALL_SECONDS = 120

TEMP_PREFIX = "."
TEMP_SUFFIX = ".part"

_FILENAME_CHARS = re.compile(r"[A-Za-z0-9._+\-=@,()\[\]]+\Z")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._+\-=@,()\[\]]+")
_SHA256 = re.compile(r"[0-9a-fA-F]{64}\Z")
_SECRET_QUERY_KEY = re.compile(r"token|key|sig|auth|pass|secret|credential", re.IGNORECASE)
_DF_LINE = re.compile(r"^(.*?)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)%\s+(.*)$")
_CURL_METER = re.compile(
    r"^\s*(\d{1,3})\s+(\S+)\s+(\d{1,3})\s+(\S+)\s+(\d{1,3})\s+(\S+)\s+(\S+)\s+(\S+)\s+.*\s(\S+)\s*$"
)
_CURL_HTTP_ERROR = re.compile(r"returned error: (\d{3})")
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4, "p": 1024**5}

# Markers in the output of our remote scripts (start of a line, never produced by a tool).
_MARK = "__comfyvast__"


# --------------------------------------------------------------------------- errors


class DiskFull(ComfyVastError):
    """The server does not have room for the file."""


class SourceError(ExternalServiceError):
    """The download source refused, could not find, or could not serve the file."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class DownloadFailed(ExternalServiceError):
    """curl or a check after it failed; the message says what to do."""


# --------------------------------------------------------------------------- validation


def validate_folder(folder: str) -> str:
    folder = folder.strip()
    if folder not in MODEL_FOLDERS:
        raise ValidationFailed(
            f"'{folder[:40]}' is not a model folder; use one of: {', '.join(MODEL_FOLDERS)}."
        )
    return folder


def validate_filename(name: str) -> str:
    """A plain file name for a model: no path, no leading dot, a known model extension."""
    name = name.strip()
    if not name:
        raise ValidationFailed("The file name is empty.")
    if "/" in name or "\\" in name:
        raise ValidationFailed("The file name must not contain path separators (/ or \\).")
    if name.startswith("."):
        raise ValidationFailed("The file name must not start with a dot.")
    if len(name) > MAX_FILENAME_LENGTH:
        raise ValidationFailed(f"The file name is longer than {MAX_FILENAME_LENGTH} characters.")
    if not _FILENAME_CHARS.match(name) or not name[0].isalnum():
        raise ValidationFailed(
            "The file name may only contain letters, digits and . _ - + = @ , ( ) [ ], "
            "and must start with a letter or digit."
        )
    if not name.lower().endswith(MODEL_EXTENSIONS):
        raise ValidationFailed(
            f"The file name must end in one of {', '.join(MODEL_EXTENSIONS)}."
        )
    return name


def validate_model_path(path: str) -> str:
    """A model as ComfyUI lists it: a file name, maybe in sub-folders ("sdxl/x.safetensors")."""
    parts = path.strip().split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise ValidationFailed("The model name must not contain empty, '.' or '..' path parts.")
    for part in parts[:-1]:
        if part.startswith(".") or not _FILENAME_CHARS.match(part):
            raise ValidationFailed(f"'{part[:40]}' is not a valid sub-folder name.")
    validate_filename(parts[-1])
    return "/".join(parts)


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


def redact_url(url: str) -> str:
    """The URL for logs, Discord and the database: token-like query values replaced."""
    parts = urlsplit(url)
    if not parts.query:
        return url
    query = [
        (k, "REDACTED" if _SECRET_QUERY_KEY.search(k) else v)
        for k, v in parse_qsl(parts.query, keep_blank_values=True)
    ]
    return urlunsplit(parts._replace(query=urlencode(query, safe="/:")))


def _clean_name(raw: str) -> str:
    """Turn a name chosen by someone else (a header, a URL) into a safe plain file name."""
    name = raw.replace("\\", "/").rsplit("/", 1)[-1]
    name = _UNSAFE_CHARS.sub("_", name).lstrip("._-+=@,()[]")
    if len(name) > MAX_FILENAME_LENGTH:
        stem, dot, ext = name.rpartition(".")
        name = stem[: MAX_FILENAME_LENGTH - len(ext) - 1] + dot + ext if dot else name[:200]
    return name


def _content_disposition_name(value: str | None) -> str | None:
    if not value:
        return None
    msg = email.message.Message()
    msg["content-disposition"] = value
    try:
        name = msg.get_filename()
    except (ValueError, LookupError):  # malformed RFC 2231 parameters
        return None
    return name or None


def filename_from_source(content_disposition: str | None, url: str) -> str:
    """The file name a download gets when none was given: Content-Disposition, else the URL.

    The result is cleaned (no directories, no leading dots, odd characters replaced) and
    must still end in a model extension, otherwise the user is asked to give one.
    """
    candidates = [_content_disposition_name(content_disposition)]
    candidates.append(unquote(urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1]))
    seen = ""
    for raw in candidates:
        if not raw:
            continue
        name = _clean_name(raw)
        seen = seen or name
        if name and name.lower().endswith(MODEL_EXTENSIONS):
            return validate_filename(name)
    shown = f" (the source calls it '{seen[:60]}')" if seen else ""
    raise ValidationFailed(
        f"Could not tell a model file name from the URL{shown}; give one with the filename "
        f"option, ending in one of {', '.join(MODEL_EXTENSIONS)}."
    )


def temp_name(filename: str) -> str:
    """The partial file's name: hidden (ComfyUI skips it) and stable, so a retry resumes."""
    return f"{TEMP_PREFIX}{filename}{TEMP_SUFFIX}"


def _host_matches(host: str, domains: Iterable[str]) -> bool:
    host = host.lower().rstrip(".")
    return any(host == d or host.endswith("." + d) for d in domains)


def _curl_quote(value: str) -> str:
    """A double-quoted string for a curl config file (backslash and quote escaped)."""
    if any(ch in value for ch in "\r\n\0"):
        raise ValueError("curl config values cannot contain line breaks")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def curl_config(url: str, headers: Iterable[str]) -> str:
    """The secret part of curl's arguments, fed to ``curl -K -`` on stdin: the URL (it may
    carry a signed query) and the token headers never become part of any argv."""
    lines = [f"url = {_curl_quote(url)}"]
    lines += [f"header = {_curl_quote(h)}" for h in headers]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- parsing


def parse_df_available(output: str) -> int:
    """Bytes available from ``df -Pk <dir>`` output (POSIX format, 1024-byte blocks)."""
    for line in reversed(output.strip().splitlines()):
        match = _DF_LINE.match(line.strip())
        if match:
            return int(match.group(4)) * 1024
    raise ValueError(f"unexpected df output: {output[:200]!r}")


def parse_curl_size(text: str) -> int:
    """curl's progress-meter sizes: ``39339``, ``800k``, ``45.2M``, ``1.5G`` (powers of 1024)."""
    text = text.strip()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmMgGtTpP]?)", text)
    if not match:
        raise ValueError(f"not a curl size: {text!r}")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


@dataclass(frozen=True, slots=True)
class CurlProgress:
    bytes_done: int
    bytes_total: int | None
    speed: float  # bytes per second
    eta_seconds: float | None

    @property
    def fraction(self) -> float | None:
        if not self.bytes_total:
            return None
        return min(1.0, self.bytes_done / self.bytes_total)


class CurlMeter:
    """Parses curl's default progress meter (one line per redraw, ended by ``\\r``).

    Columns: % Total % Received % Xferd AvgDload AvgUpload TimeTotal TimeSpent TimeLeft
    Current. When resuming, curl counts from the resume offset; ``offset`` adds it back.
    ``expected_total`` is the probe's exact size, preferred over the meter's rounded total.
    """

    def __init__(self, offset: int = 0, expected_total: int | None = None) -> None:
        self.offset = offset
        self.expected_total = expected_total

    def feed(self, line: str) -> CurlProgress | None:
        match = _CURL_METER.match(line)
        if not match:
            return None
        try:
            total = parse_curl_size(match.group(2))
            received = parse_curl_size(match.group(4))
            average = parse_curl_size(match.group(7))
            current = parse_curl_size(match.group(9))
        except ValueError:
            return None
        done = self.offset + received
        # The probe's exact size beats the meter's rounded one ("1562k").
        full = self.expected_total or (self.offset + total if total else None)
        speed = float(current or average)
        eta = (full - done) / speed if full and speed > 0 and full >= done else None
        return CurlProgress(done, full, speed, eta)


# --------------------------------------------------------------------------- views


@dataclass(frozen=True, slots=True)
class ModelListing:
    """What one server has, per folder; ``source`` is "comfyui" or "ssh"."""

    server_id: int
    server_name: str
    source: str
    folders: dict[str, tuple[str, ...]]
    fetched_at: dt.datetime

    def names(self, folder: str) -> tuple[str, ...]:
        return self.folders.get(folder, ())

    @property
    def total(self) -> int:
        return sum(len(v) for v in self.folders.values())


@dataclass(frozen=True, slots=True)
class DownloadRequest:
    actor: Actor
    server: str
    url: str = field(repr=False)  # may carry a signed query; repr'd only redacted
    folder: str
    filename: str | None = None
    sha256: str | None = None


@dataclass(frozen=True, slots=True)
class DownloadView:
    """A snapshot of one download, for rendering."""

    id: int
    server_id: int
    server_name: str
    url: str  # redacted
    folder: str
    filename: str
    status: str  # pending | downloading | verifying | completed | failed
    bytes_total: int | None = None
    bytes_done: int = 0
    speed: float | None = None
    eta_seconds: float | None = None
    resumed_from: int = 0
    sha256: str | None = None
    error: str | None = None
    requested_by: int | None = None
    channel_id: int | None = None
    message_id: int | None = None
    started_at: dt.datetime | None = None
    completed_at: dt.datetime | None = None

    @property
    def finished(self) -> bool:
        return self.status in ("completed", "failed")

    @property
    def fraction(self) -> float | None:
        if not self.bytes_total:
            return None
        return min(1.0, self.bytes_done / self.bytes_total)


class DownloadObserver(Protocol):
    """Implemented by the Discord side to keep a status message up to date."""

    async def on_started(self, download: DownloadView) -> tuple[int, int] | None:
        """Post the status message; return its (channel id, message id) to keep editing it."""
        ...

    async def on_progress(self, download: DownloadView) -> None: ...

    async def on_finished(self, download: DownloadView) -> None: ...


class _NullObserver:
    async def on_started(self, download: DownloadView) -> tuple[int, int] | None:
        return None

    async def on_progress(self, download: DownloadView) -> None:
        return None

    async def on_finished(self, download: DownloadView) -> None:
        return None


@dataclass
class _Plan:
    """Everything a started download needs; built and checked before the row exists."""

    server: ServerView
    target: SSHTarget
    url: str = field(repr=False)
    folder: str
    filename: str
    directory: str
    sha256: str | None
    bytes_total: int | None
    partial_bytes: int
    headers: list[str] = field(repr=False, default_factory=list)
    proto: str = "=https"

    @property
    def final_path(self) -> str:
        return posixpath.join(self.directory, self.filename)

    @property
    def temp_path(self) -> str:
        return posixpath.join(self.directory, temp_name(self.filename))

    def curl_config(self) -> str:
        return curl_config(self.url, self.headers)


@dataclass(frozen=True, slots=True)
class _Preflight:
    final_exists: bool
    partial_bytes: int
    free_bytes: int | None


@dataclass(frozen=True, slots=True)
class _Probe:
    status: int
    size: int | None
    content_disposition: str | None


# --------------------------------------------------------------------------- the service


# A fixed path, or a function of the server (sync or async), e.g. from SetupService.
InstallDir = str | Callable[[ServerView], str | Awaitable[str]]


class ModelService:
    """Lists, downloads and deletes model files on the team's servers."""

    def __init__(
        self,
        settings: Settings,
        sessions: SessionFactory,
        registry: ServerRegistry,
        comfy: ComfyPool,
        ssh: SSHPool,
        target_for: Callable[[ServerView], SSHTarget],
        audit: AuditService,
        *,
        install_dir: InstallDir = DEFAULT_INSTALL_DIR,
        on_change: Callable[[int], None] | None = None,
        reserve_bytes: int = DEFAULT_RESERVE_BYTES,
        download_timeout: float = DEFAULT_DOWNLOAD_TIMEOUT,
        listing_ttl: float = LISTING_TTL,
    ) -> None:
        self._settings = settings
        self._sessions = sessions
        self._registry = registry
        self._comfy = comfy
        self._ssh = ssh
        self._target_for = target_for
        self._audit = audit
        self._install_dir = install_dir
        # Called with the server id after a download or deletion, so other caches (the
        # generation service's model catalog) drop their stale lists too.
        self._on_change = on_change
        self.reserve_bytes = reserve_bytes
        self.download_timeout = download_timeout
        self.listing_ttl = listing_ttl
        # host suffix -> token; a token goes only to its own hosts (and their subdomains).
        self.token_hosts: dict[str, SecretStr] = {}
        for hosts, token in (
            (HF_HOSTS, settings.comfy.hf_token),
            (CIVITAI_HOSTS, settings.comfy.civitai_token),
        ):
            if token is not None and token.get_secret_value():
                for host in hosts:
                    self.token_hosts[host] = token
        self._cache: dict[int, tuple[float, ModelListing]] = {}
        self._list_locks: dict[int, asyncio.Lock] = {}
        self._busy: set[tuple[int, str, str]] = set()
        self._tasks: dict[int, asyncio.Task[DownloadView]] = {}
        self._live: dict[int, DownloadView] = {}

    # ------------------------------------------------------------------ helpers

    async def install_dir(self, server: ServerView) -> str:
        """Where ComfyUI lives on ``server`` (a fixed path, or asked per server)."""
        value: str | Awaitable[str] = (
            self._install_dir(server) if callable(self._install_dir) else self._install_dir
        )
        if inspect.isawaitable(value):
            value = await value
        if not value.startswith("/") or ".." in value.split("/"):
            raise ValidationFailed(
                f"The ComfyUI directory for '{server.name}' must be an absolute path."
            )
        return value.rstrip("/") or "/"

    async def models_dir(self, server: ServerView) -> str:
        return posixpath.join(await self.install_dir(server), "models")

    def _target(self, server: ServerView) -> SSHTarget:
        if server.provider == Provider.DIRECT.value or not server.ssh_host:
            raise ValidationFailed(
                f"Server '{server.name}' is a ComfyUI URL without SSH access, so the bot "
                "cannot change its model files."
            )
        return self._target_for(server)

    def _changed(self, server_id: int) -> None:
        self._cache.pop(server_id, None)
        if self._on_change is not None:
            self._on_change(server_id)

    def auth_headers(self, url: str) -> list[str]:
        """Authorization headers for ``url``'s host from the configured tokens.

        curl sends a custom Authorization header only to the host it was given for, not
        to the hosts a redirect leads to (CDNs with signed URLs), unless --location-trusted.
        """
        host = urlsplit(url).hostname or ""
        for domain, token in self.token_hosts.items():
            if _host_matches(host, [domain]):
                return [f"Authorization: Bearer {token.get_secret_value()}"]
        return []

    # ------------------------------------------------------------------ listing

    async def list(
        self, server: str | int | ServerView, *, refresh: bool = False
    ) -> ModelListing:
        """The server's models per folder, from the cache unless stale or ``refresh``."""
        view = server if isinstance(server, ServerView) else await self._registry.get(server)
        lock = self._list_locks.setdefault(view.id, asyncio.Lock())
        async with lock:
            hit = self._cache.get(view.id)
            if hit and not refresh and time.monotonic() - hit[0] < self.listing_ttl:
                return hit[1]
            listing = await self._fetch(view)
            self._cache[view.id] = (time.monotonic(), listing)
            return listing

    def cached(self, server_id: int) -> ModelListing | None:
        hit = self._cache.get(server_id)
        return hit[1] if hit else None

    async def names(
        self, folder: str, prefix: str = "", *, server: str | None = None, limit: int = 25
    ) -> list[str]:
        """Model names in ``folder`` containing ``prefix`` (names starting with it first),
        across running servers or on one; from the cache, filling a cold cache within
        about two seconds so autocomplete still answers in time."""
        if folder not in MODEL_FOLDERS:
            return []
        views = await self._registry.list()
        if server:
            views = [v for v in views if v.name == server.lower()]
        views = [v for v in views if v.is_ready]
        cold = [v for v in views if v.id not in self._cache]
        if cold:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(NAMES_REFRESH_TIMEOUT):
                    await asyncio.gather(
                        *(self._quiet_list(v) for v in cold), return_exceptions=True
                    )
        seen: set[str] = set()
        for view in views:
            listing = self.cached(view.id)
            if listing is not None:
                seen.update(listing.names(folder))
        needle = prefix.lower()
        hits = [n for n in seen if needle in n.lower()]
        hits.sort(key=lambda n: (not n.lower().startswith(needle), n.lower()))
        return hits[:limit]

    async def _quiet_list(self, view: ServerView) -> None:
        try:
            await self.list(view)
        except ComfyVastError as exc:
            log.debug("listing models on %s for autocomplete failed: %s", view.name, exc)

    async def _fetch(self, server: ServerView) -> ModelListing:
        try:
            folders = await self._fetch_api(server)
            source = "comfyui"
        except (ComfyVastError, TimeoutError) as exc:
            if server.provider == Provider.DIRECT.value or not server.ssh_host:
                if isinstance(exc, ComfyVastError):
                    raise
                raise ExternalServiceError(
                    f"ComfyUI on '{server.name}' did not list its models in time."
                ) from None
            log.info("ComfyUI on %s did not list models (%s); reading the disk over SSH",
                     server.name, exc)
            folders = await self._fetch_ssh(server)
            source = "ssh"
        return ModelListing(server.id, server.name, source, folders, utcnow())

    async def _fetch_api(self, server: ServerView) -> dict[str, tuple[str, ...]]:
        async with asyncio.timeout(LISTING_API_TIMEOUT):
            conn = await self._comfy.get(server)
            client = conn.client

            async def one(folder: str) -> tuple[str, tuple[str, ...]]:
                try:
                    names = await client.list_models(folder)
                except ComfyNotFound:
                    # Older ComfyUI versions lack some folders (text_encoders, ...).
                    return folder, ()
                return folder, tuple(sorted(names, key=str.lower))

            pairs = await asyncio.gather(*(one(f) for f in MODEL_FOLDERS))
        return dict(pairs)

    async def _fetch_ssh(self, server: ServerView) -> dict[str, tuple[str, ...]]:
        root = await self.models_dir(server)
        folders = " ".join(shlex.quote(f) for f in MODEL_FOLDERS)
        # find -L follows symlinked model folders (a common way to share them); hidden
        # entries (our partial downloads, .cache) are pruned.
        script = (
            f"root={shlex.quote(root)}; "
            f'[ -d "$root" ] || {{ echo {_MARK}nomodels; exit 0; }}; '
            f"for f in {folders}; do "
            f'[ -d "$root/$f" ] || continue; echo "{_MARK}folder $f"; '
            f'(cd "$root/$f" && find -L . -name ".*" ! -name . -prune -o -type f -print '
            f"2>/dev/null); done"
        )
        result = await self._run(server, script, timeout=COMMAND_TIMEOUT)
        if f"{_MARK}nomodels" in result.stdout:
            raise NotFound(
                f"ComfyUI is not running on '{server.name}' and there is no models directory "
                f"at {root}; install it with /setup run."
            )
        out: dict[str, list[str]] = {f: [] for f in MODEL_FOLDERS}
        current: str | None = None
        for line in result.stdout.splitlines():
            if line.startswith(f"{_MARK}folder "):
                current = line.split(" ", 1)[1]
                continue
            if current in out and line.startswith("./"):
                name = line[2:]
                if name.lower().endswith(MODEL_EXTENSIONS):
                    out[current].append(name)
        return {f: tuple(sorted(v, key=str.lower)) for f, v in out.items()}

    async def _run(
        self, server: ServerView, script: str, *, timeout: float, check: bool = True,
        input: str | None = None, on_line: LineCallback | None = None,
    ) -> CommandResult:
        return await self._ssh.run(
            self._target(server), script, timeout=timeout, check=check, input=input,
            on_line=on_line,
        )

    # ------------------------------------------------------------------ downloads

    async def start(
        self, request: DownloadRequest, observer: DownloadObserver | None = None
    ) -> DownloadView:
        """Check everything, record the download and start it in the background.

        Raises (before anything is written on the server) for a bad URL, folder or name, a
        file that exists, a download of the same file in progress, a source that refuses
        or lacks the file, or too little disk. ``observer.on_started`` posts the status
        message; progress and the end are reported to the observer too.
        """
        observer = observer or _NullObserver()
        folder = validate_folder(request.folder)
        url = validate_url(request.url, self._settings.comfy.http_allowlist)
        given = validate_filename(request.filename) if request.filename else None
        sha256 = None
        if request.sha256:
            sha256 = request.sha256.strip().lower()
            if not _SHA256.match(sha256):
                raise ValidationFailed("The sha256 must be 64 hexadecimal characters.")
        server = await self._registry.get(request.server)
        target = self._target(server)
        if not server.is_ready:
            raise ValidationFailed(
                f"Server '{server.name}' is {server.status}; start it before downloading."
            )
        directory = posixpath.join(await self.models_dir(server), folder)
        headers = self.auth_headers(url)
        proto = "=https" if urlsplit(url).scheme.lower() == "https" else "=http,https"

        probe = await self._probe(server, target, url, headers, proto)
        filename = given or filename_from_source(probe.content_disposition, url)
        key = (server.id, folder, filename)
        if key in self._busy:
            raise ResourceBusy(
                f"{filename} is already being downloaded to {folder} on '{server.name}'."
            )
        self._busy.add(key)
        try:
            pre = await self._preflight(server, directory, filename)
            if pre.final_exists:
                raise ValidationFailed(
                    f"{folder}/{filename} already exists on '{server.name}'; delete it first "
                    "or pick another file name."
                )
            self._check_space(server, directory, probe.size, pre)
            plan = _Plan(
                server=server, target=target, url=url, folder=folder, filename=filename,
                directory=directory, sha256=sha256, bytes_total=probe.size,
                partial_bytes=pre.partial_bytes, headers=headers, proto=proto,
            )
            view = await self._insert(request.actor, plan)
            try:
                ids = await observer.on_started(view)
                if ids is not None:
                    view = await self._set_message(view, *ids)
            except BaseException:
                # No status message, no download: the row must not stay "pending".
                await self._save(replace(view, status="failed", completed_at=utcnow(),
                                         error="The status message could not be posted."))
                self._live.pop(view.id, None)
                raise
        except BaseException:
            self._busy.discard(key)
            raise
        # Activity keeps the idle autostop away while the server downloads.
        await self._registry.touch(server.id, channel_id=request.actor.channel_id)
        log.info("download %d: %s -> %s:%s (%s bytes)", view.id, redact_url(url),
                 server.name, plan.final_path, probe.size)
        task = asyncio.create_task(
            self._download(view, plan, request.actor, observer), name=f"model-download-{view.id}"
        )
        self._tasks[view.id] = task
        task.add_done_callback(lambda t, key=key, vid=view.id: self._task_done(t, key, vid))
        return view

    def _task_done(self, task: asyncio.Task[DownloadView], key: tuple[int, str, str],
                   download_id: int) -> None:
        self._busy.discard(key)
        self._tasks.pop(download_id, None)
        self._live.pop(download_id, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("download %d crashed", download_id, exc_info=task.exception())

    async def download(
        self, request: DownloadRequest, observer: DownloadObserver | None = None
    ) -> DownloadView:
        """:meth:`start` and wait for the end (CLI and tests)."""
        view = await self.start(request, observer)
        return await self.wait(view.id)

    async def wait(self, download_id: int) -> DownloadView:
        task = self._tasks.get(download_id)
        if task is not None:
            return await asyncio.shield(task)
        return await self.get(download_id)

    async def get(self, download_id: int) -> DownloadView:
        live = self._live.get(download_id)
        if live is not None:
            return live
        async with self._sessions() as session:
            row = await session.get(ModelDownload, download_id)
            if row is None:
                raise NotFound(f"There is no download #{download_id}.")
            server = await self._registry.get(row.server_id)
            return _view_of(row, server.name)

    async def recover(self) -> int:
        """Mark downloads a previous process left running as failed (call at start-up).

        Their partial files stay on the server, so downloading again resumes them.
        """
        async with self._sessions.begin() as session:
            result = await session.execute(
                update(ModelDownload)
                .where(ModelDownload.status.in_(("pending", "downloading", "verifying")))
                .values(
                    status="failed",
                    error_message="The bot restarted during the download; start it again "
                    "to resume.",
                    completed_at=utcnow(),
                )
            )
        return int(result.rowcount or 0)  # type: ignore[attr-defined]

    async def close(self) -> None:
        """Stop running downloads (their remote curl is killed; partial files stay)."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # -- checks before the download

    async def _probe(
        self, server: ServerView, target: SSHTarget, url: str, headers: list[str], proto: str
    ) -> _Probe:
        """Ask the source for the first byte (from the server): status, size, file name.

        A range GET rather than HEAD because signed CDN URLs (Hugging Face, Civitai) are
        often signed for GET only. --max-filesize stops a source that ignores the range.
        """
        config = curl_config(url, headers)
        script = (
            f"command -v curl >/dev/null 2>&1 || {{ echo {_MARK}nocurl; exit 0; }}; "
            f"curl -K - -sS -L --max-redirs 10 --proto {shlex.quote(proto)} "
            f"--proto-redir {shlex.quote(proto)} --range 0-0 --max-filesize 1048576 "
            f"--connect-timeout 15 --max-time {PROBE_TIMEOUT} -o /dev/null -D - "
            f"-w '\\n{_MARK}status %{{http_code}}\\n'; echo \"{_MARK}exit $?\""
        )
        result = await self._ssh.run(
            target, script, timeout=PROBE_TIMEOUT + 15, input=config, check=True
        )
        out = result.stdout
        if f"{_MARK}nocurl" in out:
            raise DownloadFailed(f"curl is not installed on '{server.name}'; install it first.")
        status = _marker_int(out, "status") or 0
        code = _marker_int(out, "exit") or 0
        if status == 0:
            reason = _last_line(result.stderr) or f"curl exit status {code}"
            raise SourceError(f"The server '{server.name}' could not reach the URL: {reason}.")
        blocks = _header_blocks(out)
        final = blocks[-1] if blocks else {}
        _raise_for_source_status(status)
        size: int | None = None
        content_range = final.get("content-range", "")
        match = re.search(r"/(\d+)\s*$", content_range)
        if status == 206 and match:
            size = int(match.group(1))
        elif status == 200 and final.get("content-length", "").isdigit():
            size = int(final["content-length"])
        return _Probe(status, size, final.get("content-disposition"))

    async def _preflight(self, server: ServerView, directory: str, filename: str) -> _Preflight:
        models = posixpath.dirname(directory)
        final = posixpath.join(directory, filename)
        tmp = posixpath.join(directory, temp_name(filename))
        script = (
            f"models={shlex.quote(models)}; dir={shlex.quote(directory)}; "
            f"final={shlex.quote(final)}; tmp={shlex.quote(tmp)}; "
            f'[ -d "$models" ] || {{ echo {_MARK}nomodels; exit 0; }}; '
            f'mkdir -p -- "$dir" || exit 3; '
            f'if [ -e "$final" ]; then echo {_MARK}final 1; else echo {_MARK}final 0; fi; '
            f'if [ -f "$tmp" ]; then echo "{_MARK}part $(wc -c < "$tmp")"; '
            f"else echo {_MARK}part 0; fi; "
            f'echo {_MARK}df; df -Pk -- "$dir"'
        )
        result = await self._run(server, script, timeout=COMMAND_TIMEOUT)
        out = result.stdout
        if f"{_MARK}nomodels" in out:
            raise NotFound(
                f"ComfyUI is not installed at {posixpath.dirname(models)} on '{server.name}' "
                "(no models directory); install it with /setup run."
            )
        free: int | None
        try:
            free = parse_df_available(out.split(f"{_MARK}df", 1)[1])
        except (IndexError, ValueError):
            log.warning("could not read free disk space on %s: %r", server.name, out[-300:])
            free = None
        return _Preflight(
            final_exists=_marker_int(out, "final") == 1,
            partial_bytes=_marker_int(out, "part") or 0, free_bytes=free,
        )

    def _check_space(
        self, server: ServerView, directory: str, size: int | None, pre: _Preflight
    ) -> None:
        if pre.free_bytes is None:
            return
        needed = max((size or 0) - pre.partial_bytes, 0) + self.reserve_bytes
        if pre.free_bytes < needed:
            raise DiskFull(
                f"Not enough disk on '{server.name}': {_mb(pre.free_bytes)} free in {directory}, "
                f"but the file needs {_mb(size or 0)} plus {_mb(self.reserve_bytes)} to spare."
            )

    # -- rows

    async def _insert(self, actor: Actor, plan: _Plan) -> DownloadView:
        async with self._sessions.begin() as session:
            row = ModelDownload(
                server_id=plan.server.id, url=redact_url(plan.url), folder=plan.folder,
                filename=plan.filename, status="pending", bytes_total=plan.bytes_total,
                bytes_done=plan.partial_bytes, sha256=plan.sha256, requested_by=actor.user_id,
                channel_id=actor.channel_id,
            )
            session.add(row)
            await session.flush()
            view = _view_of(row, plan.server.name)
        view = replace(view, resumed_from=plan.partial_bytes)
        self._live[view.id] = view
        return view

    async def _set_message(
        self, view: DownloadView, channel_id: int, message_id: int
    ) -> DownloadView:
        async with self._sessions.begin() as session:
            await session.execute(
                update(ModelDownload).where(ModelDownload.id == view.id)
                .values(channel_id=channel_id, message_id=message_id)
            )
        view = replace(view, channel_id=channel_id, message_id=message_id)
        self._live[view.id] = view
        return view

    async def _save(self, view: DownloadView) -> None:
        values: dict[str, object] = {
            "status": view.status, "bytes_done": view.bytes_done, "bytes_total": view.bytes_total,
            "error_message": view.error, "completed_at": view.completed_at,
        }
        if view.status == "completed":
            values["sha256"] = view.sha256
        async with self._sessions.begin() as session:
            await session.execute(
                update(ModelDownload).where(ModelDownload.id == view.id).values(**values)
            )

    # -- the download itself

    async def _download(
        self, view: DownloadView, plan: _Plan, actor: Actor, observer: DownloadObserver
    ) -> DownloadView:
        view = replace(view, status="downloading", started_at=utcnow())
        self._live[view.id] = view
        await self._save(view)
        try:
            await self._safe(observer.on_progress, view)
            view = await self._transfer(view, plan, observer)
            view = replace(view, status="verifying")
            self._live[view.id] = view
            await self._save(view)
            await self._safe(observer.on_progress, view)
            view = await self._verify_and_rename(view, plan)
            view = replace(view, status="completed", completed_at=utcnow(), eta_seconds=0.0)
        except asyncio.CancelledError:
            view = replace(view, status="failed", completed_at=utcnow(),
                           error="The download was stopped because the bot shut down; start "
                                 "it again to resume.")
            await self._finish(view, plan, actor, observer, shielded=True)
            raise
        except ComfyVastError as exc:
            view = replace(view, status="failed", completed_at=utcnow(), error=str(exc))
        except Exception:
            log.exception("download %d failed unexpectedly", view.id)
            view = replace(view, status="failed", completed_at=utcnow(),
                           error="Something went wrong; it has been logged.")
        await self._finish(view, plan, actor, observer)
        return view

    async def _finish(self, view: DownloadView, plan: _Plan, actor: Actor,
                      observer: DownloadObserver, *, shielded: bool = False) -> None:
        self._live[view.id] = view
        if view.status == "completed":
            self._changed(plan.server.id)
        log.info("download %d %s: %s/%s on %s%s", view.id, view.status, plan.folder,
                 plan.filename, plan.server.name, f" ({view.error})" if view.error else "")

        if shielded:
            # We are being cancelled: record the end anyway, but do not wait for Discord.
            with contextlib.suppress(Exception):
                await asyncio.shield(self._save(view))
            return
        await self._save(view)
        await self._registry.touch(plan.server.id)
        outcome = OUTCOME_OK if view.status == "completed" else OUTCOME_ERROR
        details: dict[str, object] = {"url": view.url, "bytes": view.bytes_done}
        if view.error:
            details["error"] = view.error
        await self._audit.record(
            actor, "models download", outcome=outcome,
            resource=f"{plan.server.name}/{plan.folder}/{plan.filename}", details=details,
        )
        await self._safe(observer.on_finished, view)

    async def _safe(self, callback: Callable[[DownloadView], Awaitable[None]],
                    view: DownloadView) -> None:
        # A failing status message must not fail the download itself.
        try:
            result = callback(view)
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("download observer failed for download %d", view.id)

    async def _transfer(
        self, view: DownloadView, plan: _Plan, observer: DownloadObserver
    ) -> DownloadView:
        resume = plan.partial_bytes > 0
        result = await self._curl(view, plan, observer, resume=resume)
        if resume and result.exit_status in (33, 36):
            # The source cannot resume (no range support): start over from the beginning.
            log.info("download %d: source cannot resume; starting over", view.id)
            await self._run(plan.server, f"rm -f -- {shlex.quote(plan.temp_path)}",
                            timeout=COMMAND_TIMEOUT)
            plan = dataclasses.replace(plan, partial_bytes=0)
            result = await self._curl(view, plan, observer, resume=False)
        if result.exit_status != 0:
            await self._on_curl_error(plan, result)
        view = self._live.get(view.id, view)
        return view

    async def _curl(
        self, view: DownloadView, plan: _Plan, observer: DownloadObserver, *, resume: bool
    ) -> CommandResult:
        meter = CurlMeter(offset=plan.partial_bytes if resume else 0,
                          expected_total=plan.bytes_total)
        last_db = last_touch = time.monotonic()

        async def on_line(stream: str, line: str) -> None:
            nonlocal last_db, last_touch
            if stream != "stderr":
                return
            progress = meter.feed(line)
            if progress is None:
                return
            current = self._live.get(view.id, view)
            updated = replace(
                current, bytes_done=progress.bytes_done,
                bytes_total=progress.bytes_total or current.bytes_total,
                speed=progress.speed, eta_seconds=progress.eta_seconds,
            )
            self._live[view.id] = updated
            await self._safe(observer.on_progress, updated)
            if time.monotonic() - last_db >= PROGRESS_DB_INTERVAL:
                last_db = time.monotonic()
                await self._save(updated)
            if time.monotonic() - last_touch >= TOUCH_INTERVAL:
                # A long download is activity: idle autostop must not stop the server.
                last_touch = time.monotonic()
                await self._registry.touch(plan.server.id)

        args = [
            "curl", "-K", "-", "--fail", "--location", "--max-redirs", "10",
            "--proto", plan.proto, "--proto-redir", plan.proto,
            "--retry", "3", "--retry-delay", "2", "--connect-timeout", "30",
            "--speed-limit", str(STALL_BYTES_PER_SECOND), "--speed-time", str(STALL_SECONDS),
            "-o", plan.temp_path,
        ]
        if resume:
            args += ["-C", "-"]
        script = " ".join(shlex.quote(a) for a in args)
        return await self._run(
            plan.server, script, timeout=self.download_timeout, check=False,
            input=plan.curl_config(), on_line=on_line,
        )

    async def _on_curl_error(self, plan: _Plan, result: CommandResult) -> None:
        code = result.exit_status
        reason = _last_line(result.stderr)
        where = f"'{plan.server.name}'"
        if code == 22:
            match = _CURL_HTTP_ERROR.search(result.stderr)
            _raise_for_source_status(int(match.group(1)) if match else 400)
        if code == 23:
            # Out of space (or a write error): the partial file only takes space now.
            await self._run(plan.server, f"rm -f -- {shlex.quote(plan.temp_path)}",
                            timeout=COMMAND_TIMEOUT, check=False)
            raise DiskFull(f"Writing the file on {where} failed (is the disk full?); the "
                           "partial file was removed.")
        if code == 28:
            raise DownloadFailed("The download stalled or timed out; run the command again to "
                                 "resume it.")
        if code in (18, 56, 92):
            raise DownloadFailed("The source closed the connection early; run the command "
                                 "again to resume the download.")
        if code in (6, 7, 35, 60):
            raise SourceError(f"The server {where} could not reach the source: {reason}.")
        raise DownloadFailed(f"curl on {where} failed with exit status {code}"
                             + (f": {reason}." if reason else "."))

    async def _verify_and_rename(self, view: DownloadView, plan: _Plan) -> DownloadView:
        """Size and (optionally) sha256 checks, then the rename, in one remote script."""
        size_check = ""
        if plan.bytes_total is not None:
            size_check = (f'[ "$size" = {plan.bytes_total} ] || '
                          f"{{ echo {_MARK}short; exit 0; }}; ")
        hash_check = ""
        if plan.sha256:
            hash_check = (
                'sha=$( (sha256sum -- "$tmp" 2>/dev/null || shasum -a 256 "$tmp") '
                '| cut -c1-64); '
                f'echo "{_MARK}sha $sha"; '
                f'[ "$sha" = {shlex.quote(plan.sha256)} ] || '
                f'{{ rm -f -- "$tmp"; echo {_MARK}badsha; exit 0; }}; '
            )
        script = (
            f"tmp={shlex.quote(plan.temp_path)}; final={shlex.quote(plan.final_path)}; "
            f'size=$(wc -c < "$tmp") || exit 3; size=$((size + 0)); '
            f'echo "{_MARK}size $size"; {size_check}{hash_check}'
            # Never replace a file that appeared meanwhile (someone copied it by hand).
            f'if [ -e "$final" ]; then echo {_MARK}exists; exit 0; fi; '
            f'mv -- "$tmp" "$final" && echo {_MARK}moved'
        )
        result = await self._run(plan.server, script, timeout=HASH_TIMEOUT)
        out = result.stdout
        size = _marker_int(out, "size") or 0
        digest = _marker_text(out, "sha")
        if f"{_MARK}short" in out:
            raise DownloadFailed(
                f"The download is incomplete ({_mb(size)} of {_mb(plan.bytes_total or 0)}); "
                "run the command again to resume it."
            )
        if f"{_MARK}badsha" in out:
            raise DownloadFailed(
                f"The file's sha256 is {digest or 'unknown'}, not the expected {plan.sha256}; "
                "it was deleted."
            )
        if f"{_MARK}exists" in out:
            raise DownloadFailed(
                f"{plan.folder}/{plan.filename} appeared on the server during the download; "
                "the new copy was kept under a temporary name."
            )
        if f"{_MARK}moved" not in out:
            raise DownloadFailed("The downloaded file could not be moved into place.")
        return replace(view, bytes_done=size, bytes_total=size, sha256=digest)

    # ------------------------------------------------------------------ deleting

    async def delete(self, actor: Actor, server: str, folder: str, filename: str) -> str:
        """Delete one model file; returns the path removed (relative to the models dir)."""
        folder = validate_folder(folder)
        name = validate_model_path(filename)
        view = await self._registry.get(server)
        self._target(view)  # a direct server has no files we can reach
        if (view.id, folder, name) in self._busy:
            raise ResourceBusy(f"{name} is being downloaded right now; wait for it to finish.")
        path = posixpath.join(await self.models_dir(view), folder, name)
        script = (
            f"p={shlex.quote(path)}; "
            f'if [ -f "$p" ] || [ -L "$p" ]; then rm -f -- "$p" && echo {_MARK}deleted; '
            f"else echo {_MARK}missing; fi"
        )
        result = await self._run(view, script, timeout=COMMAND_TIMEOUT)
        if f"{_MARK}deleted" not in result.stdout:
            raise NotFound(f"There is no {folder}/{name} on '{view.name}'.")
        self._changed(view.id)
        await self._audit.record(actor, "models delete", outcome=OUTCOME_OK,
                                 resource=f"{view.name}/{folder}/{name}")
        log.info("deleted %s/%s on %s", folder, name, view.name)
        return f"{folder}/{name}"


# --------------------------------------------------------------------------- small helpers


def _view_of(row: ModelDownload, server_name: str) -> DownloadView:
    return DownloadView(
        id=row.id, server_id=row.server_id, server_name=server_name, url=row.url,
        folder=row.folder, filename=row.filename, status=row.status,
        bytes_total=row.bytes_total, bytes_done=row.bytes_done or 0, sha256=row.sha256,
        error=row.error_message, requested_by=row.requested_by, channel_id=row.channel_id,
        message_id=row.message_id, completed_at=row.completed_at,
    )


def _raise_for_source_status(status: int) -> None:
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
        elif blocks and ":" in line and not line.startswith(_MARK):
            name, value = line.split(":", 1)
            blocks[-1][name.strip().lower()] = value.strip()
    return blocks


def _marker_text(text: str, name: str) -> str | None:
    prefix = f"{_MARK}{name} "
    for line in text.splitlines():
        if line.startswith(prefix):
            return line[len(prefix):].strip()
    return None


def _marker_int(text: str, name: str) -> int | None:
    value = _marker_text(text, name)
    return int(value) if value is not None and value.isdigit() else None


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in re.split(r"[\r\n]+", text) if ln.strip()]
    return lines[-1][:300] if lines else ""


def _mb(size: int) -> str:
    if size >= 1024**3:
        return f"{size / 1024**3:.1f} GB"
    return f"{size / 1024**2:.1f} MB"


def format_size(size: int | None) -> str:
    """Human size for messages: "12.3 MB", "1.2 GB"."""
    return "?" if size is None else _mb(size)

