"""Async client for the Vast.ai REST API.

One :class:`VastClient` wraps one injected :class:`aiohttp.ClientSession`. It speaks the
real protocol (see ``/work/shared/reference/vast.md``):

* ``Authorization: Bearer <key>``; the key never goes into a URL, a log line, a repr or an
  exception message.
* Most routes live under ``/api/v0``; listing instances uses the paginated
  ``/api/v1/instances/`` because the v0 collection answers 410 on migrated accounts.
* Errors are mapped from status and body in :func:`error_from_response`, the only place
  that knows Vast's error vocabulary.
* Only idempotent calls are retried (GETs, start/stop/destroy, attaching a key). Renting
  (``PUT /asks/{id}/``) is never retried: a lost response may still have rented a GPU, so
  the caller must look the instance up by label before trying again.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp
from pydantic import SecretStr

from core.errors import ExternalServiceError, RateLimited

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://console.vast.ai/api/v0"
USER_AGENT = "comfyvast/0.1 (+aiohttp)"
# The v1 instance list never returns more than this per page.
LIST_PAGE_LIMIT = 25
# Retry-After (or a throttle threshold) above this is not worth sleeping through inside
# one call: we raise VastRateLimited and let the caller decide.
MAX_HONOURED_RETRY_AFTER = 60.0

JsonDict = dict[str, Any]
Sleep = Callable[[float], Awaitable[Any]]


# --------------------------------------------------------------------------- errors


class VastError(ExternalServiceError):
    """A Vast.ai call failed. ``str()`` is user-safe; details live in the attributes.

    ``status`` is the HTTP status (None for transport failures), ``code`` Vast's ``error``
    field, ``detail`` Vast's ``msg`` (redacted), ``new_contract`` an instance id that the
    failed create still produced (destroy it), and ``may_have_succeeded`` is True when a
    non-idempotent call's outcome is unknown (timeout or 5xx after sending).
    """

    default_message = "Vast.ai refused the request."

    def __init__(
        self,
        message: str | None = None,
        *,
        status: int | None = None,
        code: str | None = None,
        detail: str | None = None,
        op: str = "",
        new_contract: int | None = None,
        may_have_succeeded: bool = False,
    ) -> None:
        super().__init__(message or self.default_message)
        self.status = status
        self.code = code
        self.detail = detail
        self.op = op
        self.new_contract = new_contract
        self.may_have_succeeded = may_have_succeeded

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(status={self.status!r}, code={self.code!r}, "
            f"op={self.op!r}, message={self.message!r})"
        )


class VastAuthError(VastError):
    default_message = "Vast.ai rejected the API key; check the vast.api_key setting."


class InsufficientCredit(VastError):
    default_message = "The Vast.ai account does not have enough credit for this."


class OfferUnavailable(VastError):
    default_message = "That Vast.ai offer is no longer available; search again."


class VastNotFound(VastError):
    default_message = "Vast.ai has no such instance; it may have been destroyed."


class VastRateLimited(VastError, RateLimited):
    default_message = "Vast.ai is rate-limiting us; try again shortly."

    def __init__(self, message: str | None = None, *, retry_after: float | None = None,
                 **kwargs: Any) -> None:
        if message is None and retry_after is not None:
            message = f"Vast.ai is rate-limiting us; try again in {max(1, round(retry_after))} s."
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class SearchQuotaExceeded(VastRateLimited):
    """The daily search quota is used up; it resets at UTC midnight. Never retried."""

    default_message = "The daily Vast.ai search quota is used up; it resets at midnight UTC."


class VastServerError(VastError):
    default_message = "Vast.ai had a server error; try again shortly."


class VastTimeout(VastError):
    default_message = "Vast.ai did not answer in time."


class VastConnectionError(VastError):
    default_message = "Could not reach Vast.ai."


class SshKeysNotSupported(VastError):
    """Team-scoped API keys cannot register account SSH keys; attach per instance instead."""

    default_message = "This Vast.ai key cannot register SSH keys (team keys are not supported)."


_AUTH_CODES = {"auth_error", "unauthorized", "forbidden", "not_authorized"}
_CREDIT_CODES = {"insufficient_credit", "insufficient_balance", "insufficient_funds",
                 "spend_rate_limit", "missing_billing"}
_NOT_FOUND_CODES = {"no_such_instance", "not_found", "invalid_id", "no_such_ssh_key"}
_OFFER_CODES = {"no_such_ask"}
_RATE_CODES = {"rate_limit_exceeded"}
_CREDIT_WORDS = re.compile(r"\b(credit|balance|funds)\b", re.IGNORECASE)
_AUTH_WORDS = re.compile(r"invalid user key|session expired|please log in", re.IGNORECASE)
_THRESHOLD = re.compile(r"threshold\s*=\s*([0-9]+(?:\.[0-9]+)?)")
# Vast prefixes messages with an internal code, e.g. "error 404/3603: no_such_ask ...".
_INTERNAL_PREFIX = re.compile(r"^\s*error\s+\d{3}/\d+:\s*", re.IGNORECASE)


def _parse_retry_after(headers: Mapping[str, str], now: float) -> float | None:
    raw = headers.get("Retry-After")
    if not raw:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


def _throttle_hint(text: str) -> float | None:
    # "API requests too frequent: endpoint threshold=2.0": the number is the minimum
    # interval in seconds between calls to that endpoint (vast-ai/docs#61).
    match = _THRESHOLD.search(text)
    return float(match.group(1)) if match else None


def error_from_response(
    status: int | None,
    body: Any,
    *,
    text: str = "",
    headers: Mapping[str, str] | None = None,
    op: str = "",
    now: float | None = None,
) -> VastError:
    """Map one failed response (status, parsed body, raw text, headers) to a VastError.

    ``op`` names the operation ("create", "show", ...): a bare 404 means "offer gone" for
    create and "no such instance" elsewhere. Callers must pass already-redacted text.
    """
    headers = headers or {}
    now = time.time() if now is None else now
    data = body if isinstance(body, Mapping) else {}
    code = data.get("error") if isinstance(data.get("error"), str) else None
    raw_msg = data.get("msg") or data.get("message") or data.get("detail")
    if not isinstance(raw_msg, str):
        raw_msg = text if not data else ""
    detail = _INTERNAL_PREFIX.sub("", raw_msg.strip())[:300] or None
    new_contract = data.get("new_contract")
    kwargs: dict[str, Any] = {
        "status": status, "code": code, "detail": detail, "op": op,
        "new_contract": new_contract if isinstance(new_contract, int) else None,
    }
    words = f"{code or ''} {detail or ''}"

    if status == 429 or code in _RATE_CODES or code == "search_quota_exceeded":
        if code == "search_quota_exceeded":
            reset = headers.get("X-RateLimit-Reset")
            retry_after = None
            if reset:
                try:
                    retry_after = max(0.0, float(reset) - now)
                except ValueError:
                    retry_after = None
            return SearchQuotaExceeded(retry_after=retry_after, **kwargs)
        retry_after = _parse_retry_after(headers, now)
        if retry_after is None:
            retry_after = _throttle_hint(f"{text} {detail or ''}")
        return VastRateLimited(retry_after=retry_after, **kwargs)
    if code == "team_ssh_keys_not_supported":
        return SshKeysNotSupported(**kwargs)
    # Checked before offers and 404s: a credit failure on create must not look like
    # "offer gone", or the caller would burn through every offer.
    if status in (402, 411) or code in _CREDIT_CODES or (
        code not in _AUTH_CODES and status not in (401, 403)
        and _CREDIT_WORDS.search(detail or "")
    ):
        return InsufficientCredit(**kwargs)
    # A bad key is 401 on most routes but 404 on some (bundles, older routes); a scoped
    # key lacking a permission gets 403.
    if status in (401, 403) or code in _AUTH_CODES or _AUTH_WORDS.search(words):
        return VastAuthError(**kwargs)
    if code in _OFFER_CODES or (op == "create" and status in (404, 410)):
        return OfferUnavailable(**kwargs)
    if code in _NOT_FOUND_CODES or status == 404:
        if code == "no_such_ssh_key":
            return VastNotFound("Vast.ai has no such SSH key.", **kwargs)
        return VastNotFound(**kwargs)
    if status is not None and status >= 500:
        return VastServerError(f"Vast.ai had a server error (HTTP {status}); try again shortly.",
                               **kwargs)
    if code == "deprecated_endpoint":
        return VastError("Vast.ai retired the API route this client used.", **kwargs)
    message = f"Vast.ai refused the request: {detail}" if detail else None
    return VastError(message, **kwargs)


# --------------------------------------------------------------------------- data


def _country(geolocation: str | None) -> str | None:
    # Free text ending in a 2-letter code ("Texas, US"); parse defensively (skypilot
    # crashed on unseen codes).
    if not geolocation:
        return None
    tail = geolocation.strip().rsplit(",", 1)[-1].strip()
    return tail.upper() if len(tail) == 2 and tail.isalpha() else None


def _f(value: Any, default: float = 0.0) -> float:
    try:
        return float(value) if value is not None else default
    except (TypeError, ValueError):
        return default


def _i(value: Any, default: int = 0) -> int:
    try:
        return int(value) if value is not None else default
    except (TypeError, ValueError):
        return default


def _s(value: Any) -> str | None:
    # Vast strings can carry stray whitespace ("203.0.113.45\n").
    return value.strip() if isinstance(value, str) else None


@dataclass(frozen=True, slots=True)
class OfferQuery:
    """What to rent. ``None`` means "no constraint" for every filter."""

    gpu_name: str | Sequence[str] | None = None
    num_gpus: int | None = 1
    max_price_per_hour: float | None = None
    min_reliability: float | None = None
    min_disk_gb: float | None = None
    # Country codes ("US", ["US", "CA"]) or a region group ("europe", "north-america").
    region: str | Sequence[str] | None = None
    verified: bool | None = True
    # "price", "reliability", "score", "performance", "value", "bandwidth", or a raw
    # field name with an optional leading "-" for descending.
    sort: str = "price"
    limit: int = 20
    min_gpu_ram_gb: float | None = None
    min_inet_down: float | None = None
    min_cuda: float | None = None
    # Direct ports let us reach 22 and 8188 without the proxy.
    min_direct_ports: int | None = None
    # GiB of disk priced into dph_total; defaults to min_disk_gb.
    allocated_storage_gb: float | None = None


@dataclass(frozen=True, slots=True)
class Offer:
    id: int
    gpu_name: str
    num_gpus: int
    gpu_ram_mb: int
    price_per_hour: float  # dph_total: GPU + storage at the searched allocated_storage
    dph_base: float
    reliability: float
    inet_down: float  # Mb/s
    inet_up: float
    disk_space: float  # GB free on the machine
    geolocation: str | None
    country: str | None
    cpu_name: str | None
    cpu_cores: int
    cpu_cores_effective: float
    cpu_ram_mb: int
    verified: bool
    direct_port_count: int
    cuda_max_good: float
    machine_id: int | None
    host_id: int | None
    min_bid: float | None
    storage_cost: float | None  # $/GB/month
    dlperf: float | None
    score: float | None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def location(self) -> str | None:
        return self.geolocation

    @property
    def gpu_ram_gb(self) -> float:
        return self.gpu_ram_mb / 1024

    @classmethod
    def from_api(cls, d: Mapping[str, Any]) -> Offer:
        verified = d.get("verified")
        if not isinstance(verified, bool):
            verified = d.get("verification") == "verified"
        geo = _s(d.get("geolocation"))
        return cls(
            id=_i(d.get("id") or d.get("ask_contract_id")),
            gpu_name=str(d.get("gpu_name") or ""),
            num_gpus=_i(d.get("num_gpus"), 1),
            gpu_ram_mb=_i(d.get("gpu_ram")),
            price_per_hour=_f(d.get("dph_total")),
            dph_base=_f(d.get("dph_base")),
            reliability=_f(d.get("reliability2", d.get("reliability"))),
            inet_down=_f(d.get("inet_down")),
            inet_up=_f(d.get("inet_up")),
            disk_space=_f(d.get("disk_space")),
            geolocation=geo,
            country=_country(geo),
            cpu_name=_s(d.get("cpu_name")),
            cpu_cores=_i(d.get("cpu_cores")),
            cpu_cores_effective=_f(d.get("cpu_cores_effective")),
            cpu_ram_mb=_i(d.get("cpu_ram")),
            verified=verified,
            direct_port_count=_i(d.get("direct_port_count")),
            cuda_max_good=_f(d.get("cuda_max_good")),
            machine_id=d.get("machine_id"),
            host_id=d.get("host_id"),
            min_bid=d.get("min_bid"),
            storage_cost=d.get("storage_cost"),
            dlperf=d.get("dlperf"),
            score=d.get("score"),
            raw=dict(d),
        )


RunType = Literal["ssh", "ssh_direct", "ssh_proxy", "jupyter", "jupyter_direct", "args"]

# The SDK spells the direct flag "ssh_direc" and sends space-separated tokens; the
# instance's image_runtype echoes that form, so we send what the SDK sends.
_RUNTYPE_WIRE: dict[str, str] = {
    "ssh": "ssh_direc ssh_proxy",
    "ssh_direct": "ssh_direc ssh_proxy",
    "ssh_proxy": "ssh_proxy",
    "jupyter": "jupyter_direc ssh_direc ssh_proxy",
    "jupyter_direct": "jupyter_direc ssh_direc ssh_proxy",
    "args": "args",
}


@dataclass(frozen=True, slots=True)
class CreateRequest:
    image: str
    disk_gb: float = 40.0
    # Hidden from repr: scripts and env may carry tokens (Hugging Face, Civitai).
    onstart: str | None = field(default=None, repr=False)
    label: str | None = None
    env: Mapping[str, str] = field(default_factory=dict, repr=False)
    ssh: bool = True
    expose_ports: Sequence[int] = ()
    # "ssh" means SSH with direct ports (plus the proxy as a fallback).
    runtype: RunType = "ssh"
    # Fail instead of handing back a stopped instance when the GPU cannot start now.
    cancel_unavail: bool = True
    args: Sequence[str] | None = None
    template_hash_id: str | None = None
    image_login: str | None = field(default=None, repr=False)

    def to_body(self) -> JsonDict:
        env: dict[str, str] = {f"-p {p}:{p}": "1" for p in self.expose_ports}
        env.update(self.env)
        runtype = self.runtype
        if not self.ssh and runtype in ("ssh", "ssh_direct", "ssh_proxy"):
            runtype = "args"
        body: JsonDict = {
            "client_id": "me",
            "image": self.image,
            "disk": float(self.disk_gb),
            "runtype": _RUNTYPE_WIRE.get(runtype, runtype),
            "env": env,
            "cancel_unavail": self.cancel_unavail,
        }
        if self.label is not None:
            body["label"] = self.label
        if self.onstart is not None:
            body["onstart"] = self.onstart
        if self.args is not None:
            body["args"] = list(self.args)
        if self.template_hash_id is not None:
            body["template_hash_id"] = self.template_hash_id
        if self.image_login is not None:
            body["image_login"] = self.image_login
        return body


@dataclass(frozen=True, slots=True)
class Instance:
    """One rented instance as Vast reports it.

    ``actual_status`` is the container state (None while provisioning, then "created",
    "loading", "running", "stopped", "exited", "rebooting", "unknown", "offline");
    ``intended_status`` is what we asked for; ``cur_state``/``next_state`` describe the
    contract. ``ports`` maps "8188/tcp" to the public host port on ``public_ipaddr``
    (empty until running). ``ssh_host``/``ssh_port`` is Vast's SSH proxy.
    """

    id: int
    label: str | None
    actual_status: str | None
    intended_status: str | None
    cur_state: str | None
    next_state: str | None
    status_msg: str | None
    gpu_name: str | None
    num_gpus: int
    gpu_ram: int  # MB
    dph_total: float
    ssh_host: str | None
    ssh_port: int | None
    public_ipaddr: str | None
    ports: Mapping[str, int]
    start_date: float | None
    end_date: float | None
    disk_space: float
    geolocation: str | None
    image_uuid: str | None
    image_runtype: str | None
    machine_id: int | None
    uptime_mins: float | None
    direct_port_start: int | None
    direct_port_end: int | None
    extra_env: Mapping[str, str] = field(default_factory=dict, repr=False)
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_api(cls, d: Mapping[str, Any]) -> Instance:
        ports: dict[str, int] = {}
        raw_ports = d.get("ports")
        if isinstance(raw_ports, Mapping):
            for key, bindings in raw_ports.items():
                if isinstance(bindings, list):
                    for b in bindings:
                        if isinstance(b, Mapping) and _i(b.get("HostPort"), 0) > 0:
                            # HostPort is a string; take the first IPv4-ish binding.
                            ports[str(key)] = int(b["HostPort"])
                            break
        env: dict[str, str] = {}
        raw_env = d.get("extra_env")
        if isinstance(raw_env, list):
            for pair in raw_env:
                if isinstance(pair, (list, tuple)) and len(pair) == 2:
                    env[str(pair[0])] = str(pair[1])
        elif isinstance(raw_env, Mapping):
            env = {str(k): str(v) for k, v in raw_env.items()}
        ssh_port = d.get("ssh_port")
        return cls(
            id=_i(d.get("id")),
            label=d.get("label"),
            actual_status=d.get("actual_status"),
            intended_status=d.get("intended_status"),
            cur_state=d.get("cur_state"),
            next_state=d.get("next_state"),
            status_msg=_s(d.get("status_msg")),
            gpu_name=d.get("gpu_name"),
            num_gpus=_i(d.get("num_gpus"), 0),
            gpu_ram=_i(d.get("gpu_ram")),
            dph_total=_f(d.get("dph_total")),
            ssh_host=_s(d.get("ssh_host")) or None,
            ssh_port=_i(ssh_port) if ssh_port not in (None, "") else None,
            public_ipaddr=_s(d.get("public_ipaddr")) or None,
            ports=ports,
            start_date=d.get("start_date"),
            end_date=d.get("end_date"),
            disk_space=_f(d.get("disk_space")),
            geolocation=_s(d.get("geolocation")),
            image_uuid=d.get("image_uuid"),
            image_runtype=d.get("image_runtype"),
            machine_id=d.get("machine_id"),
            uptime_mins=d.get("uptime_mins"),
            direct_port_start=d.get("direct_port_start"),
            direct_port_end=d.get("direct_port_end"),
            extra_env=env,
            raw=dict(d),
        )

    @property
    def is_running(self) -> bool:
        return self.actual_status == "running"

    @property
    def is_failed(self) -> bool:
        """The instance will not come up by itself: destroy it and try another offer."""
        if self.actual_status in ("exited", "unknown", "offline"):
            return True
        # Docker create errors surface as "created" plus the runtime's complaint.
        return self.actual_status == "created" and "OCI runtime create failed" in (
            self.status_msg or ""
        )

    @property
    def is_interrupted(self) -> bool:
        """All three stopped: outbid or credit-stopped (if we did not stop it ourselves)."""
        return self.cur_state == self.intended_status == self.next_state == "stopped"

    @property
    def country(self) -> str | None:
        return _country(self.geolocation)

    def public_port(self, container_port: int, proto: str = "tcp") -> int | None:
        """The public port on ``public_ipaddr`` that maps to ``container_port``."""
        return self.ports.get(f"{container_port}/{proto}")

    @property
    def direct_ssh(self) -> tuple[str, int] | None:
        port = self.public_port(22)
        return (self.public_ipaddr, port) if self.public_ipaddr and port else None

    @property
    def proxy_ssh(self) -> tuple[str, int] | None:
        return (self.ssh_host, self.ssh_port) if self.ssh_host and self.ssh_port else None

    @property
    def ssh_endpoint(self) -> tuple[str, int] | None:
        """Direct SSH when mapped, else the proxy."""
        return self.direct_ssh or self.proxy_ssh

    @property
    def comfy_endpoint(self) -> tuple[str, int] | None:
        port = self.public_port(8188)
        return (self.public_ipaddr, port) if self.public_ipaddr and port else None


@dataclass(frozen=True, slots=True)
class SshKey:
    id: int
    public_key: str
    created_at: str | None = None


@dataclass(frozen=True, slots=True)
class Balance:
    credit: float  # prepaid dollars left (falls back to "balance")
    balance: float
    user_id: int | None = None
    has_billing: bool | None = None
    can_pay: bool | None = None
    balance_threshold: float | None = None


# --------------------------------------------------------------------------- client


_REGIONS: dict[str, tuple[str, ...]] = {
    "north-america": ("US", "CA", "MX"),
    "europe": ("DE", "NL", "FR", "GB", "SE", "NO", "FI", "PL", "ES", "IT", "CZ", "BE", "AT",
               "CH", "DK", "IE", "PT", "RO", "BG", "HU", "LT", "LV", "EE", "SI", "SK", "HR",
               "GR", "IS", "UA", "RS"),
    "asia": ("JP", "KR", "SG", "TW", "HK", "IN", "TH", "VN", "MY", "CN", "ID", "PH"),
    "oceania": ("AU", "NZ"),
    "south-america": ("BR", "AR", "CL", "CO", "PE"),
}
_REGION_ALIASES = {"na": "north-america", "eu": "europe", "as": "asia", "oc": "oceania",
                   "sa": "south-america", "us": None}

_SORTS: dict[str, tuple[str, str]] = {
    "price": ("dph_total", "asc"),
    "reliability": ("reliability2", "desc"),
    "score": ("score", "desc"),
    "performance": ("dlperf", "desc"),
    "value": ("dlperf_per_dphtotal", "desc"),
    "bandwidth": ("inet_down", "desc"),
    "vram": ("gpu_ram", "desc"),
}


def _countries(region: str | Sequence[str]) -> list[str]:
    items = [region] if isinstance(region, str) else list(region)
    out: list[str] = []
    for item in items:
        for part in item.split(","):
            key = part.strip().lower().replace("_", "-").replace(" ", "-")
            if not key:
                continue
            group = _REGIONS.get(_REGION_ALIASES.get(key, key) or "")
            out.extend(group if group else [key.upper()])
    return list(dict.fromkeys(out))


def build_search_body(query: OfferQuery) -> JsonDict:
    """The flat JSON filter object that ``POST /bundles/`` expects."""
    body: JsonDict = {
        # The SDK adds these unless told not to; without them the search returns
        # machines that cannot be rented.
        "external": {"eq": False},
        "rentable": {"eq": True},
        "rented": {"eq": False},
    }
    if query.verified is not None:
        body["verified"] = {"eq": query.verified}
    if query.gpu_name:
        names = [query.gpu_name] if isinstance(query.gpu_name, str) else list(query.gpu_name)
        # The CLI turns "RTX_4090" into "RTX 4090"; Vast's names contain spaces.
        names = [n.replace("_", " ").strip() for n in names if n.strip()]
        body["gpu_name"] = {"eq": names[0]} if len(names) == 1 else {"in": names}
    if query.num_gpus is not None:
        body["num_gpus"] = {"eq": query.num_gpus}
    if query.max_price_per_hour is not None:
        body["dph_total"] = {"lte": query.max_price_per_hour}
    if query.min_reliability is not None:
        body["reliability2"] = {"gte": query.min_reliability}
    if query.min_disk_gb is not None:
        body["disk_space"] = {"gte": query.min_disk_gb}
    if query.min_gpu_ram_gb is not None:
        body["gpu_ram"] = {"gte": query.min_gpu_ram_gb * 1000}  # MB, as the CLI does
    if query.min_inet_down is not None:
        body["inet_down"] = {"gte": query.min_inet_down}
    if query.min_cuda is not None:
        body["cuda_max_good"] = {"gte": query.min_cuda}
    if query.min_direct_ports is not None:
        body["direct_port_count"] = {"gte": query.min_direct_ports}
    if query.region:
        codes = _countries(query.region)
        if codes:
            body["geolocation"] = {"eq": codes[0]} if len(codes) == 1 else {"in": codes}
    sort = _SORTS.get(query.sort)
    if sort is None:
        name = query.sort.lstrip("-")
        if not re.fullmatch(r"[a-z_0-9]+", name):
            raise ValueError(f"unknown sort {query.sort!r}")
        sort = (name, "desc" if query.sort.startswith("-") else "asc")
    body["order"] = [list(sort)]
    body["type"] = "on-demand"
    body["limit"] = max(1, int(query.limit))
    storage = query.allocated_storage_gb or query.min_disk_gb
    if storage:
        # Prices dph_total with the disk we will actually rent.
        body["allocated_storage"] = float(storage)
    return body


def _normalise_key(public_key: str) -> str:
    # "type base64 [comment]": two keys are the same key whatever their comments say.
    parts = public_key.strip().split()
    return " ".join(parts[:2])


def _derive_urls(base_url: str) -> tuple[str, str]:
    base = base_url.rstrip("/")
    match = re.search(r"/api/v\d+$", base)
    root = base[: match.start()] if match else base
    v0 = base if match else f"{root}/api/v0"
    return v0, f"{root}/api/v1"


class VastClient:
    """Typed async access to Vast.ai. Construct once with the app's shared session."""

    def __init__(
        self,
        api_key: SecretStr | str,
        session: aiohttp.ClientSession,
        *,
        base_url: str = DEFAULT_BASE_URL,
        timeout: float = 30.0,
        max_retries: int = 3,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._api_key = api_key if isinstance(api_key, SecretStr) else SecretStr(api_key)
        self._session = session
        self._v0, self._v1 = _derive_urls(base_url)
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._max_retries = max(0, max_retries)
        self._backoff_base = backoff_base
        self._backoff_max = backoff_max
        self._sleep = sleep

    def __repr__(self) -> str:
        return f"VastClient(base_url={self._v0!r})"

    @property
    def base_url(self) -> str:
        return self._v0

    # ----------------------------------------------------------------- transport

    def _redact(self, text: str) -> str:
        key = self._api_key.get_secret_value()
        return text.replace(key, "***") if key else text

    def _backoff(self, attempt: int, hint: float | None) -> float:
        # Full jitter keeps several bot processes from retrying in lockstep.
        delay = random.uniform(0, min(self._backoff_max, self._backoff_base * 2**attempt))
        if hint is not None:
            delay = max(delay, hint)
        return delay

    async def _request(
        self,
        method: str,
        path: str,
        *,
        op: str,
        json_body: JsonDict | None = None,
        params: Mapping[str, str] | None = None,
        idempotent: bool,
        v1: bool = False,
    ) -> Any:
        url = f"{self._v1 if v1 else self._v0}{path}"
        headers = {
            "Authorization": f"Bearer {self._api_key.get_secret_value()}",
            "Accept": "application/json",
            "User-Agent": USER_AGENT,
        }
        if method != "GET" and json_body is None:
            json_body = {}  # the API wants a JSON body on PUT/POST/DELETE, even empty
        attempts = 1 + (self._max_retries if idempotent else 0)
        for attempt in range(attempts):
            last = attempt == attempts - 1
            started = time.monotonic()
            try:
                async with self._session.request(
                    method, url, json=json_body, params=params, headers=headers,
                    timeout=self._timeout, allow_redirects=False,
                ) as resp:
                    raw = await resp.read()
                    status = resp.status
                    resp_headers = {k: v for k, v in resp.headers.items()}
            except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
                log.warning("vast %s %s timed out after %.1fs (attempt %d/%d)",
                            method, path, time.monotonic() - started, attempt + 1, attempts)
                if last:
                    raise VastTimeout(op=op, may_have_succeeded=not idempotent) from exc
                await self._sleep(self._backoff(attempt, None))
                continue
            except aiohttp.ClientError as exc:
                # Connection refused/reset: for a create we cannot know whether the
                # request reached Vast before the connection died.
                log.warning("vast %s %s failed: %s (attempt %d/%d)", method, path,
                            type(exc).__name__, attempt + 1, attempts)
                if last:
                    # Refused before connecting means the request never left us.
                    sent = not isinstance(exc, aiohttp.ClientConnectorError)
                    raise VastConnectionError(
                        op=op, may_have_succeeded=sent and not idempotent
                    ) from exc
                await self._sleep(self._backoff(attempt, None))
                continue

            text = self._redact(raw.decode("utf-8", errors="replace"))
            try:
                # 429s are often text/plain; never trust Content-Type.
                data = json.loads(text) if text.strip() else None
            except ValueError:
                data = None
            log.debug("vast %s %s -> %d in %.2fs", method, path, status,
                      time.monotonic() - started)

            if 200 <= status < 300:
                if isinstance(data, Mapping) and data.get("success") is False:
                    # A 200 with success:false is a failure (SDK and dstack agree).
                    raise error_from_response(status, data, text=text,
                                              headers=resp_headers, op=op)
                if data is None and text.strip():
                    raise VastServerError("Vast.ai sent a response we could not read.",
                                          status=status, op=op)
                return data

            err = error_from_response(status, data, text=text, headers=resp_headers, op=op)
            transient = isinstance(err, VastServerError) and status in (500, 502, 503, 504)
            transient = transient or (
                isinstance(err, VastRateLimited) and not isinstance(err, SearchQuotaExceeded)
            )
            if not idempotent and isinstance(err, VastServerError):
                # A 5xx on create may come after the rental was committed.
                err.may_have_succeeded = True
            hint = err.retry_after if isinstance(err, VastRateLimited) else None
            if not transient or last or (hint is not None and hint > MAX_HONOURED_RETRY_AFTER):
                if transient:
                    log.warning("vast %s %s -> %d, giving up after %d attempt(s)",
                                method, path, status, attempt + 1)
                raise err
            delay = min(self._backoff(attempt, hint), MAX_HONOURED_RETRY_AFTER)
            log.info("vast %s %s -> %d (%s), retrying in %.2fs (attempt %d/%d)", method, path,
                     status, err.code or type(err).__name__, delay, attempt + 1, attempts)
            await self._sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    # ----------------------------------------------------------------- offers

    async def search_offers(self, query: OfferQuery) -> list[Offer]:
        """Rentable offers matching ``query``, in the requested order."""
        body = build_search_body(query)
        data = await self._request("POST", "/bundles/", op="search", json_body=body,
                                   idempotent=True)  # a search changes nothing
        offers = data.get("offers") if isinstance(data, Mapping) else None
        if not isinstance(offers, list):
            raise VastServerError("Vast.ai sent an unexpected search response.", op="search")
        return [Offer.from_api(o) for o in offers if isinstance(o, Mapping)]

    # ----------------------------------------------------------------- instances

    async def create_instance(self, offer_id: int, request: CreateRequest) -> int:
        """Rent ``offer_id``; returns the new instance id (not the offer id).

        Never retried. On VastTimeout/VastServerError/VastConnectionError with
        ``may_have_succeeded`` the rental may exist: look it up by label first.
        """
        data = await self._request("PUT", f"/asks/{int(offer_id)}/", op="create",
                                   json_body=request.to_body(), idempotent=False)
        new_id = data.get("new_contract") if isinstance(data, Mapping) else None
        if not isinstance(new_id, int):
            raise VastServerError("Vast.ai accepted the rental but sent no instance id.",
                                  op="create", may_have_succeeded=True)
        log.info("rented offer %d as instance %d (label %r)", offer_id, new_id, request.label)
        return new_id

    async def show_instance(self, instance_id: int) -> Instance:
        data = await self._request("GET", f"/instances/{int(instance_id)}/", op="show",
                                   params={"owner": "me"}, idempotent=True)
        obj = data.get("instances") if isinstance(data, Mapping) else None
        if not isinstance(obj, Mapping):
            # {"instances": null} is how Vast says "destroyed or never yours".
            raise VastNotFound(status=200, op="show")
        return Instance.from_api(obj)

    async def list_instances(self, *, label: str | None = None,
                             filters: Mapping[str, Any] | None = None) -> list[Instance]:
        """Every instance on the account (optionally filtered), following all pages."""
        select: dict[str, Any] = dict(filters or {})
        if label is not None:
            select["label"] = {"eq": label}
        out: list[Instance] = []
        token: str | None = None
        seen: set[str] = set()
        while True:
            params: dict[str, str] = {
                "limit": str(LIST_PAGE_LIMIT),
                "order_by": json.dumps([{"col": "id", "dir": "asc"}]),
            }
            if select:
                params["select_filters"] = json.dumps(select)
            if token:
                params["after_token"] = token
            data = await self._request("GET", "/instances/", op="list", params=params,
                                       idempotent=True, v1=True)
            items = data.get("instances") if isinstance(data, Mapping) else None
            if not isinstance(items, list):
                # Never read "no list" as "no instances": that is how skypilot lost
                # track of billing machines (skypilot#10517).
                raise VastServerError("Vast.ai sent an unexpected instance list.", op="list")
            out.extend(Instance.from_api(i) for i in items if isinstance(i, Mapping))
            token = data.get("next_token")
            if not token:
                return out
            if token in seen:
                raise VastServerError("Vast.ai's instance list did not advance.", op="list")
            seen.add(token)

    async def find_instance_by_label(self, label: str) -> Instance | None:
        found = await self.list_instances(label=label)
        if len(found) > 1:
            log.warning("%d instances share label %r; using the newest", len(found), label)
        return max(found, key=lambda i: i.id) if found else None

    async def _set_state(self, instance_id: int, state: str) -> None:
        await self._request("PUT", f"/instances/{int(instance_id)}/", op=f"set_{state}",
                            json_body={"state": state}, idempotent=True)

    async def start_instance(self, instance_id: int) -> None:
        await self._set_state(instance_id, "running")

    async def stop_instance(self, instance_id: int) -> None:
        await self._set_state(instance_id, "stopped")

    async def set_label(self, instance_id: int, label: str) -> None:
        await self._request("PUT", f"/instances/{int(instance_id)}/", op="label",
                            json_body={"label": label}, idempotent=True)

    async def reboot_instance(self, instance_id: int) -> None:
        await self._request("PUT", f"/instances/reboot/{int(instance_id)}/", op="reboot",
                            idempotent=True)

    async def destroy_instance(self, instance_id: int) -> bool:
        """Destroy; returns False when it was already gone (destroy is idempotent)."""
        try:
            await self._request("DELETE", f"/instances/{int(instance_id)}/", op="destroy",
                                idempotent=True)
        except VastNotFound:
            # dstack treats no_such_instance as success; so does a retried DELETE whose
            # first attempt went through.
            log.info("instance %d was already destroyed", instance_id)
            return False
        log.info("destroyed instance %d", instance_id)
        return True

    async def instance_logs(self, instance_id: int, *, tail: int = 200,
                            attempts: int = 30, interval: float = 0.3) -> str:
        """The container's last ``tail`` log lines.

        Vast uploads them to a ``result_url`` that 404s until ready; the SDK polls it 30
        times, 0.3 s apart. That URL is third-party storage: it gets no Authorization.
        """
        data = await self._request("PUT", f"/instances/request_logs/{int(instance_id)}/",
                                   op="logs", json_body={"tail": str(tail)}, idempotent=True)
        url = data.get("result_url") if isinstance(data, Mapping) else None
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise VastServerError("Vast.ai sent no log location.", op="logs")
        for _ in range(max(1, attempts)):
            try:
                async with self._session.get(url, timeout=self._timeout) as resp:
                    if resp.status == 200:
                        return self._redact(await resp.text(errors="replace"))
            except (TimeoutError, aiohttp.ClientError) as exc:
                log.debug("log poll for instance %d failed: %s", instance_id,
                          type(exc).__name__)
            await self._sleep(interval)
        raise VastTimeout("Vast.ai did not produce the instance logs in time.", op="logs")

    # ----------------------------------------------------------------- ssh keys

    async def list_ssh_keys(self) -> list[SshKey]:
        data = await self._request("GET", "/ssh/", op="list_ssh_keys", idempotent=True)
        items = data if isinstance(data, list) else (
            data.get("ssh_keys") or data.get("keys") if isinstance(data, Mapping) else None
        )
        if not isinstance(items, list):
            raise VastServerError("Vast.ai sent an unexpected SSH key list.", op="list_ssh_keys")
        return [_ssh_key(k) for k in items if isinstance(k, Mapping) and not k.get("deleted_at")]

    async def add_ssh_key(self, public_key: str) -> int:
        """Register ``public_key`` on the account unless an identical key is there."""
        wanted = _normalise_key(public_key)
        if not wanted:
            raise ValueError("empty public key")
        for key in await self.list_ssh_keys():
            if _normalise_key(key.public_key) == wanted:
                return key.id
        # POST is not retried: a lost response would register the key twice. The
        # next call's list finds it instead.
        data = await self._request("POST", "/ssh/", op="add_ssh_key",
                                   json_body={"ssh_key": public_key.strip()}, idempotent=False)
        key = data.get("key") if isinstance(data, Mapping) else None
        if isinstance(key, Mapping) and isinstance(key.get("id"), int):
            return int(key["id"])
        if isinstance(data, Mapping) and isinstance(data.get("id"), int):
            return int(data["id"])
        for k in await self.list_ssh_keys():
            if _normalise_key(k.public_key) == wanted:
                return k.id
        raise VastServerError("Vast.ai did not confirm the SSH key.", op="add_ssh_key")

    async def delete_ssh_key(self, key_id: int) -> None:
        await self._request("DELETE", f"/ssh/{int(key_id)}/", op="delete_ssh_key",
                            idempotent=True)

    async def attach_ssh_key(self, instance_id: int, public_key: str) -> None:
        """Attach a key to one instance; Vast refreshes authorized_keys from this set,
        so keys added only by onstart vanish after some hours (skypilot#10730)."""
        # Retried: attaching the same key twice leaves the same state and costs nothing.
        await self._request("POST", f"/instances/{int(instance_id)}/ssh/", op="attach_ssh_key",
                            json_body={"ssh_key": public_key.strip()}, idempotent=True)

    async def list_instance_ssh_keys(self, instance_id: int) -> list[SshKey]:
        data = await self._request("GET", f"/instances/{int(instance_id)}/ssh/",
                                   op="list_instance_ssh_keys", idempotent=True)
        raw = data.get("ssh_keys") if isinstance(data, Mapping) else None
        if isinstance(raw, str):
            # The list arrives JSON-encoded inside the JSON.
            try:
                raw = json.loads(raw)
            except ValueError:
                raw = None
        if not isinstance(raw, list):
            return []
        return [_ssh_key(k) for k in raw if isinstance(k, Mapping)]

    # ----------------------------------------------------------------- account

    async def balance(self) -> Balance:
        data = await self._request("GET", "/users/current/", op="balance", idempotent=True)
        if not isinstance(data, Mapping):
            raise VastServerError("Vast.ai sent an unexpected account response.", op="balance")
        credit = data.get("credit")
        bal = _f(data.get("balance"))
        return Balance(
            credit=_f(credit) if credit is not None else bal,
            balance=bal,
            user_id=data.get("id"),
            has_billing=data.get("has_billing"),
            can_pay=data.get("can_pay"),
            balance_threshold=data.get("balance_threshold"),
        )


def _ssh_key(d: Mapping[str, Any]) -> SshKey:
    # The OpenAPI names the field "key"; skypilot reads "public_key". Accept both.
    return SshKey(
        id=_i(d.get("id")),
        public_key=str(d.get("public_key") or d.get("key") or d.get("ssh_key") or "").strip(),
        created_at=d.get("created_at"),
    )


__all__ = [
    "Balance", "CreateRequest", "InsufficientCredit", "Instance", "Offer", "OfferQuery",
    "OfferUnavailable", "SearchQuotaExceeded", "SshKey", "SshKeysNotSupported", "VastAuthError",
    "VastClient", "VastConnectionError", "VastError", "VastNotFound", "VastRateLimited",
    "VastServerError", "VastTimeout", "build_search_body", "error_from_response",
]
