"""A loopback fake of the Vast.ai REST API, faithful to the wire protocol.

Routes, wrappers, field names, status codes and error bodies follow
``/work/shared/reference/vast.md`` (section 7 is the checklist). Time is a fake clock
(``advance(seconds)`` or an injected callable), so a test can walk an instance through
``null -> loading -> running`` without waiting. Faults are switchable per test:
``fail_next``, ``fail_ratio``, ``delay``, ``throttle``, ``take_offer``, auth modes,
credit, boot failures, interruptions, ``remove_image`` (a tag that does not exist stays
in loading), ``hold_gpu`` (a start waits in scheduling) and ``hold_after`` (act on a call,
answer only when released: for tests that kill the client in between). Each behaviour's
source is given beside it.

Usage::

    async with FakeVast() as fake:
        client = VastClient(fake.api_key, session, base_url=fake.base_url)
"""

from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
import json
import logging
import random
import re
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)

JsonDict = dict[str, Any]

_OPS = ("eq", "neq", "gt", "gte", "lt", "lte", "in", "notin")
_SEARCH_CONTROL_KEYS = {"order", "limit", "type", "allocated_storage", "disable_bundling"}
_SEARCH_TYPES = {"on-demand", "ondemand", "bid", "reserved", "interruptible"}
_SEARCH_ALIASES = {"dph": "dph_total", "cuda_vers": "cuda_max_good"}
_RUNTYPE_TOKENS = {"ssh", "ssh_proxy", "ssh_direct", "ssh_direc", "jupyter", "jupyter_proxy",
                   "jupyter_direct", "jupyter_direc", "args"}
# Columns the v1 list cannot filter on because the server computes them per request.
_COMPUTED_COLUMNS = {"dph_total", "dph_base", "num_gpus", "duration", "uptime_mins", "search",
                     "instance", "storage_total_cost", "gpu_util", "gpu_temp"}
DEFAULT_API_KEY = "fakevast-" + "0" * 8 + "-not-a-real-key"

BOOT_FAILURES = ("exited", "oci", "unknown", "offline", "stuck")


# --------------------------------------------------------------------------- catalogue

_OFFER_TEMPLATE: JsonDict = {
    "num_gpus": 1, "gpu_arch": "nvidia", "compute_cap": 890, "cuda_max_good": 12.8,
    "driver_version": "570.124.04", "cpu_name": "AMD Ryzen 9 7950X", "cpu_cores": 32,
    "cpu_cores_effective": 16.0, "cpu_ram": 64302, "disk_space": 412.3, "disk_bw": 3100.5,
    "inet_up": 820.1, "inet_down": 905.7, "inet_up_cost": 0.005, "inet_down_cost": 0.005,
    "direct_port_count": 100, "direct_port_start": 40100, "direct_port_end": 40199,
    "dph_base": 0.35, "storage_cost": 0.15, "min_bid": 0.18, "is_bid": False,
    "reliability": 0.9962, "reliability2": 0.9962, "verification": "verified",
    "rentable": True, "rented": False, "external": False, "hosting_type": 0,
    "geolocation": "Texas, US", "public_ipaddr": "203.0.113.45", "static_ip": True,
    "score": 212.4, "dlperf": 78.2, "total_flops": 82.6, "pci_gen": 4.0, "pcie_bw": 25.1,
    "gpu_frac": 1.0, "duration": 2419200.0, "cpu_arch": "amd64", "cluster_id": None,
}

_GPU_RAM = {"RTX 4090": 24564, "RTX 3090": 24576, "RTX A6000": 49140, "A100 SXM4": 81920,
            "H100 SXM": 81559, "RTX 3060": 12288, "Tesla V100": 16384, "RTX 5090": 32607}


def make_offer(offer_id: int, gpu_name: str = "RTX 4090", **overrides: Any) -> JsonDict:
    """A realistic ``/bundles/`` offer; any field can be overridden."""
    offer = copy.deepcopy(_OFFER_TEMPLATE)
    offer.update(id=offer_id, ask_contract_id=offer_id, bundle_id=offer_id * 27 + 11,
                 machine_id=40000 + offer_id % 10000, host_id=100000 + offer_id % 997,
                 gpu_name=gpu_name, gpu_ram=_GPU_RAM.get(gpu_name, 24564))
    offer.update(overrides)
    offer.setdefault("gpu_total_ram", offer["gpu_ram"] * offer["num_gpus"])
    if "reliability" in overrides and "reliability2" not in overrides:
        offer["reliability2"] = overrides["reliability"]
    if "reliability2" in overrides and "reliability" not in overrides:
        offer["reliability"] = overrides["reliability2"]
    if "dlperf" not in overrides:
        offer["dlperf"] = round(offer["dlperf"] * offer["num_gpus"], 2)
    return offer


def default_offers() -> list[JsonDict]:
    """A small mixed catalogue: several GPUs, countries, prices and reliabilities."""
    return [
        make_offer(18822341, "RTX 4090", dph_base=0.35, geolocation="Texas, US"),
        make_offer(18822342, "RTX 4090", dph_base=0.42, reliability=0.999,
                   geolocation="Quebec, CA", public_ipaddr="198.51.100.7"),
        make_offer(18822343, "RTX 4090", dph_base=0.29, reliability=0.91,
                   geolocation="Guangdong, CN", verification="unverified"),
        make_offer(18822344, "RTX 3090", dph_base=0.18, compute_cap=860, cuda_max_good=12.4,
                   geolocation="Noord-Holland, NL", disk_space=120.0, inet_down=450.2),
        make_offer(18822345, "RTX 3090", num_gpus=2, dph_base=0.36, compute_cap=860,
                   geolocation="Bavaria, DE"),
        make_offer(18822346, "A100 SXM4", dph_base=1.05, compute_cap=800,
                   geolocation="Yutakachō, Shinagawa District, Tokyo, JP", hosting_type=1,
                   disk_space=1800.0, inet_down=4500.0, inet_up=4200.0),
        make_offer(18822347, "H100 SXM", dph_base=2.10, compute_cap=900,
                   geolocation="Oregon, US", hosting_type=1, direct_port_count=0,
                   direct_port_start=-1, direct_port_end=-1),
        make_offer(18822348, "RTX A6000", dph_base=0.47, compute_cap=860,
                   geolocation="Ontario, CA", reliability=0.985, disk_space=35.0),
    ]


# --------------------------------------------------------------------------- records


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: dict[str, str]
    body: Any
    at: float
    authorized: bool
    bearer: bool  # sent "Authorization: Bearer ..."
    key_in_query: bool  # sent ?api_key=... (mature clients must not)
    status: int | None = None
    fault: str | None = None

    @property
    def line(self) -> str:
        return f"{self.method} {self.path}"


@dataclass
class Fault:
    route: str
    status: int | str  # an HTTP status or "timeout"
    count: int
    body: Any = None
    headers: Mapping[str, str] | None = None
    after: bool = False  # process the request for real, then fail the response


@dataclass
class Hold:
    """A request that is carried out, then answered only when the test releases it.

    ``arrived`` is set once Vast has acted on the request (the instance exists, the state
    changed): the moment a test kills the client to leave the outcome unknown to it.
    """

    route: str
    count: int
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    released: asyncio.Event = field(default_factory=asyncio.Event)
    requests: list[str] = field(default_factory=list)

    def release(self) -> None:
        self.released.set()


@dataclass
class FakeInstance:
    id: int
    offer: JsonDict
    label: str | None
    image: str
    disk: float
    env: dict[str, str]
    onstart: str | None
    runtype: str
    args: list[str]
    created_at: float
    instance_api_key: str
    is_bid: bool = False
    bid_price: float | None = None
    actual_status: str | None = None
    intended_status: str = "running"
    cur_state: str = "running"
    next_state: str = "running"
    status_msg: str | None = None
    loading_at: float | None = None
    ready_at: float | None = None
    running_since: float | None = None
    started_at: float | None = None
    boot_failure: str | None = None
    ports: dict[str, str] | None = None
    ssh_host: str = "ssh4.vast.ai"
    ssh_idx: str = "4"
    ssh_port: int = 35122
    public_ipaddr: str = ""
    network_override: dict[str, Any] = field(default_factory=dict)
    ssh_keys: list[JsonDict] = field(default_factory=list)
    last_billed: float = 0.0
    spent: float = 0.0
    logs: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # raw field overrides

    @property
    def storage_per_hour(self) -> float:
        # storage_cost is $/GB/month.
        return self.disk * float(self.offer.get("storage_cost") or 0.0) / 30 / 24

    @property
    def gpu_per_hour(self) -> float:
        return self.bid_price if self.is_bid and self.bid_price else float(self.offer["dph_base"])

    @property
    def dph_total(self) -> float:
        return round(self.gpu_per_hour + self.storage_per_hour, 6)


# --------------------------------------------------------------------------- helpers


def _err(error: str | None, msg: str, **extra: Any) -> JsonDict:
    body: JsonDict = {"success": False}
    if error is not None:
        body["error"] = error
    body["msg"] = msg
    body.update(extra)
    return body


def _json(status: int, data: Any, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=json.dumps(data), content_type="application/json",
                        headers=headers)


def _coerce(value: Any, like: Any) -> Any:
    # The CLI sends numbers as strings ({"num_gpus":{"eq":"1"}}); compare like with like.
    if isinstance(like, bool):
        if isinstance(value, str):
            return value.strip().lower() in ("true", "1", "yes")
        return bool(value)
    if isinstance(like, (int, float)) and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


class _BadFilter(ValueError):
    pass


def _match(actual: Any, ops: Any) -> bool:
    if not isinstance(ops, Mapping):
        # A bare value means equality (the CLI's "verified=true" has no operator form).
        ops = {"eq": ops}
    for op, want in ops.items():
        if op not in _OPS:
            raise _BadFilter(f"unknown operator {op!r}")
        if op in ("in", "notin"):
            if not isinstance(want, list):
                raise _BadFilter(f"operator {op!r} needs a list")
            values = [_coerce(w, actual) for w in want]
            inside = actual in values
            if inside != (op == "in"):
                return False
            continue
        want = _coerce(want, actual)
        if op == "eq":
            ok = actual == want
        elif op == "neq":
            ok = actual != want
        else:
            if actual is None or want is None:
                return False
            try:
                ok = {"gt": actual > want, "gte": actual >= want, "lt": actual < want,
                      "lte": actual <= want}[op]
            except TypeError as exc:
                raise _BadFilter(f"cannot compare {actual!r} with {want!r}") from exc
        if not ok:
            return False
    return True


def _country(geolocation: Any) -> str | None:
    if not isinstance(geolocation, str):
        return None
    tail = geolocation.strip().rsplit(",", 1)[-1].strip()
    return tail.upper() if len(tail) == 2 else None


def _sort_key(value: Any) -> tuple[int, Any]:
    # Missing values sort last whatever the direction.
    if value is None:
        return (1, 0)
    if isinstance(value, (int, float)):
        return (0, value)
    return (0, str(value))


def _ordered(rows: list[JsonDict], order: list[tuple[str, str]]) -> list[JsonDict]:
    out = list(rows)
    for col, direction in reversed(order):
        present = [r for r in out if r.get(col) is not None]
        missing = [r for r in out if r.get(col) is None]
        present.sort(key=lambda r, c=col: _sort_key(r.get(c)), reverse=direction == "desc")
        out = present + missing
    return out


# --------------------------------------------------------------------------- server


class FakeVast:
    """A Vast.ai API on 127.0.0.1 with a fake clock and switchable faults."""

    def __init__(
        self,
        *,
        api_key: str = DEFAULT_API_KEY,
        offers: Iterable[Mapping[str, Any]] | None = None,
        credit: float = 25.0,
        clock: Callable[[], float] | None = None,
        provision_seconds: float = 2.0,
        boot_seconds: float = 30.0,
        restart_seconds: float = 10.0,
        reboot_seconds: float = 5.0,
        auth_failure_status: int = 401,
        team_key: bool = False,
        legacy_list: bool = False,
        throttle_threshold: float = 2.0,
        timeout_hang: float = 10.0,
        logs_ready_after: int = 1,
        spend_rate_limit: float | None = None,
        anonymous_search: bool = True,
        first_instance_id: int = 27815123,
        containers: Any = None,
    ) -> None:
        self.api_key = api_key
        self.offers: dict[int, JsonDict] = {
            int(o["id"]): dict(o) for o in (offers if offers is not None else default_offers())
        }
        self.credit = float(credit)
        self.provision_seconds = provision_seconds
        self.boot_seconds = boot_seconds
        self.restart_seconds = restart_seconds
        self.reboot_seconds = reboot_seconds
        # Some routes answer a bad key with 404 rather than 401 (vast.md section 4).
        self.auth_failure_status = auth_failure_status
        self.team_key = team_key
        self.legacy_list = legacy_list
        self.throttle_threshold = throttle_threshold
        self.timeout_hang = timeout_hang
        self.logs_ready_after = logs_ready_after
        self.spend_rate_limit = spend_rate_limit
        self.anonymous_search = anonymous_search

        self.instances: dict[int, FakeInstance] = {}
        # tests.fakevast.container.ContainerHost: each instance is a real SSH server with
        # the image's file system, and runs its onstart on every boot. None: no container.
        self.containers = containers
        if containers is not None:
            containers.vast = self
        self.destroyed: dict[int, FakeInstance] = {}
        self.requests: list[RecordedRequest] = []
        self.ssh_keys: list[JsonDict] = []
        self.taken_offers: set[int] = set()  # rented by someone else
        self.rented_offers: dict[int, int] = {}  # offer id -> our instance id
        self.forbidden: list[str] = []  # route fragments a scoped key may not call
        self.search_quota_reset: float | None = None  # epoch s; set = quota used up
        # Images whose tag does not exist: the create is accepted, the pull never ends.
        self.missing_images: set[str] = set()
        # Instances whose next start waits for the GPU ("scheduling") until release_gpu().
        self.gpu_busy: set[int] = set()
        self.holds: list[Hold] = []

        self._clock = clock
        self._t0 = time.time()
        self._offset = 0.0
        self._next_id = first_instance_id
        self._next_key_id = 98001
        self._faults: list[Fault] = []
        self._delays: dict[str, float] = {}
        self._throttles: dict[str, tuple[float, str]] = {}
        self._last_call: dict[str, float] = {}
        self._chaos: tuple[float, random.Random, tuple[int | str, ...], str | None] | None = None
        self._next_boot_failure: str | None = None
        self._logs: dict[str, tuple[int, int]] = {}  # token -> (instance id, tail)
        self._log_gets: dict[str, int] = {}
        self._ports_used: dict[int, set[int]] = {}  # machine id -> used host ports
        self._runner: web.AppRunner | None = None
        self._stopping = asyncio.Event()
        self.port: int | None = None

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        app = web.Application(middlewares=[self._middleware], client_max_size=4 * 1024**2)
        self._routes(app.router)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeVast:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def root_url(self) -> str:
        if self.port is None:
            raise RuntimeError("FakeVast is not started")
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/api/v0"

    # ----------------------------------------------------------------- time

    def now(self) -> float:
        return (self._clock() if self._clock else self._t0) + self._offset

    def advance(self, seconds: float) -> None:
        """Move the fake clock forward, running boots and billing up to the new time."""
        self._offset += seconds
        self._tick()

    # ----------------------------------------------------------------- test controls

    def fail_next(self, route: str, status: int | str = 500, count: int = 1, *,
                  body: Any = None, headers: Mapping[str, str] | None = None,
                  after: bool = False) -> None:
        """Fail the next ``count`` calls whose "METHOD /path" contains ``route``.

        ``status`` is an HTTP status or "timeout" (hang past the client's timeout).
        ``after=True`` lets the call take effect before the failure is sent (a create
        whose response is lost). A 200 ``status`` with a ``body`` fakes success:false.
        """
        self._faults.append(Fault(route, status, count, body, headers, after))

    def fail_ratio(self, p: float, seed: int | None = None, *,
                   statuses: Iterable[int | str] = (429, 500, 502, 503, 504, "timeout"),
                   route: str | None = None) -> None:
        """Fail a fraction ``p`` of calls at random; creates sometimes commit first."""
        self._chaos = (p, random.Random(seed), tuple(statuses), route) if p > 0 else None

    def delay(self, route: str, seconds: float) -> None:
        """Add real latency to calls matching ``route`` (0 removes it)."""
        if seconds <= 0:
            self._delays.pop(route, None)
        else:
            self._delays[route] = seconds

    def throttle(self, route: str, min_interval: float, style: str = "text") -> None:
        """Enforce a real-time minimum interval between calls, as Vast does per endpoint.

        ``style`` picks the 429 body: "text" (plain text, the usual one), "detail"
        (``{"detail": ...}``) or "json" (``{"success": false, "error":
        "rate_limit_exceeded", ...}``).
        """
        if style not in ("text", "detail", "json"):
            raise ValueError(style)
        if min_interval <= 0:
            self._throttles.pop(route, None)
        else:
            self._throttles[route] = (min_interval, style)

    def take_offer(self, offer_id: int) -> None:
        """Someone else rents the offer: it leaves search and creates on it fail."""
        self.taken_offers.add(int(offer_id))

    def release_offer(self, offer_id: int) -> None:
        self.taken_offers.discard(int(offer_id))

    def add_offer(self, offer: Mapping[str, Any]) -> None:
        self.offers[int(offer["id"])] = dict(offer)

    def forbid(self, route: str) -> None:
        """Answer 403 on ``route``, as for a scoped key lacking the permission."""
        self.forbidden.append(route)

    def exhaust_search_quota(self, reset_in: float = 3600.0) -> None:
        self.search_quota_reset = time.time() + reset_in

    def hold_after(self, route: str, count: int = 1) -> Hold:
        """Carry out the next ``count`` calls matching ``route``, then hold each answer
        until ``hold.release()`` (or the server stops). ``hold.arrived`` is set when the
        first one has taken effect: kill the client there and the outcome is unknown to it.
        """
        hold = Hold(route, count)
        self.holds.append(hold)
        return hold

    def remove_image(self, image: str) -> None:
        """``image`` (with its tag) does not exist on the registry.

        Vast.ai accepts the create (it does not check the registry) and the instance sits
        in ``loading`` while its storage bills (issue 11, from a rental with
        ``vastai/comfy:latest``, a tag Vast does not publish). Its ``status_msg`` carries
        the Docker daemon's pull error. Vast's own wording around it could not be found in
        Vast's docs, CLI or issues (searched 2026-12); the text is Docker's message for a
        missing tag ("Error response from daemon: manifest for <image> not found: manifest
        unknown: manifest unknown", e.g. portainer/portainer#12908, docker-on-windows#13),
        which Vast passes on like the OCI errors dstack reads from status_msg (vast.md 3).
        ``missing_image_message = None`` leaves the generic pull message instead.
        """
        self.missing_images.add(image)

    missing_image_message: str | None = (
        "Error response from daemon: manifest for {image} not found: manifest unknown: "
        "manifest unknown"
    )

    def hold_gpu(self, instance_id: int) -> None:
        """The instance's GPU is taken by another renter: a start waits in "scheduling".

        Source: docs guides/reference/troubleshooting.mdx ("When you stop an instance, the
        gpu(s) it was using may get reassigned ... your instance will be stuck in
        'scheduling' phase until the conflicting jobs are done") and vast.md section 7.
        The API's spelling of the phase is not documented (the console shows
        "Scheduling"); modelled as ``actual_status`` "scheduling" with the contract
        moving to running (``intended_status``/``next_state`` running, ``cur_state``
        stopped), no ports, and no GPU billing (GPU bills only while running, vast.md 3).
        """
        self.gpu_busy.add(instance_id)

    def release_gpu(self, instance_id: int) -> None:
        """The other renter is done: a scheduled start goes on to loading and running."""
        self.gpu_busy.discard(instance_id)
        inst = self.instances.get(instance_id)
        if inst is not None and inst.actual_status == "scheduling":
            inst.actual_status = "loading"
            inst.cur_state = "running"
            inst.status_msg = "Starting container"
            inst.ready_at = self.now() + self.restart_seconds

    def fail_next_boot(self, kind: str) -> None:
        """The next created instance fails to boot: one of BOOT_FAILURES."""
        if kind not in BOOT_FAILURES:
            raise ValueError(kind)
        self._next_boot_failure = kind

    def break_instance(self, instance_id: int, kind: str) -> None:
        """Force a failure state now: "exited", "oci", "unknown", "offline"."""
        inst = self.instances[instance_id]
        self._tick()
        self._apply_failure(inst, kind)

    def interrupt(self, instance_id: int, reason: str = "outbid") -> None:
        """Stop an instance the way Vast does on outbid or zero credit."""
        self._tick()
        self._all_stopped(self.instances[instance_id],
                          f"Instance stopped: {reason}")

    def set_network(self, instance_id: int, *, public_ipaddr: str | None = None,
                    ports: Mapping[str, int] | None = None, ssh_host: str | None = None,
                    ssh_port: int | None = None) -> None:
        """Point an instance at real endpoints (e.g. a loopback SSH server)."""
        inst = self.instances[instance_id]
        if public_ipaddr is not None:
            inst.network_override["public_ipaddr"] = public_ipaddr
        if ports is not None:
            inst.network_override["ports"] = {
                k: [{"HostIp": "0.0.0.0", "HostPort": str(v)}] for k, v in ports.items()
            }
        if ssh_host is not None:
            inst.network_override["ssh_host"] = ssh_host
        if ssh_port is not None:
            inst.network_override["ssh_port"] = ssh_port

    def refresh_authorized_keys(self, instance_id: int, path: Any) -> None:
        """Do what Vast does to a running instance from time to time: rewrite its
        ``authorized_keys`` from the keys attached to it, so a key that was only appended
        over SSH (or by onstart) is gone afterwards (skypilot PR #10730; vast.md 2.8 and
        the pitfalls section). ``path`` is the file a test SSH server reads."""
        inst = self.instances[instance_id]
        Path(path).write_text("".join(k["public_key"] + "\n" for k in inst.ssh_keys))

    def set_logs(self, instance_id: int, text: str) -> None:
        self.instances[instance_id].logs = text

    def calls(self, route: str = "") -> list[RecordedRequest]:
        """Recorded calls whose "METHOD /path" contains ``route``."""
        return [r for r in self.requests if route in r.line]

    def instance_json(self, instance_id: int) -> JsonDict:
        self._tick()
        return self._instance_json(self.instances[instance_id])

    # ----------------------------------------------------------------- state machine

    def _tick(self) -> None:
        now = self.now()
        for inst in list(self.instances.values()):
            self._progress(inst, now)
        self._bill(now)

    def _progress(self, inst: FakeInstance, now: float) -> None:
        if inst.intended_status != "running" or inst.actual_status == "scheduling":
            return
        if inst.actual_status is None and inst.loading_at is not None and now >= inst.loading_at:
            inst.actual_status = "loading"
            inst.status_msg = f"Pulling image {inst.image}: downloading layers"
        if inst.image in self.missing_images and inst.actual_status == "loading":
            # The pull fails and is retried; the instance never leaves loading.
            if self.missing_image_message is not None:
                inst.status_msg = self.missing_image_message.format(image=inst.image)
            return
        if (inst.actual_status in ("loading", "rebooting", None) and inst.ready_at is not None
                and now >= inst.ready_at):
            if inst.boot_failure:
                if inst.boot_failure != "stuck":
                    self._apply_failure(inst, inst.boot_failure)
                return
            inst.actual_status = "running"
            inst.cur_state = inst.next_state = "running"
            inst.running_since = inst.ready_at
            inst.started_at = inst.started_at or inst.ready_at
            inst.status_msg = f"success, running {inst.image.replace(':', '_')}/ssh"
            inst.ports = self._assign_ports(inst)
            if self.containers is not None:
                # Onstart runs on create and on every start (vast.md section 7).
                self.containers.boot(inst)

    def _apply_failure(self, inst: FakeInstance, kind: str) -> None:
        inst.running_since = None
        if self.containers is not None:
            self.containers.halt(inst)
        if kind == "oci":
            inst.actual_status = "created"
            inst.ports = None
            inst.status_msg = (
                "Error response from daemon: failed to create task for container: "
                "failed to create shim task: OCI runtime create failed: runc create failed: "
                "unable to start container process: error during container init"
            )
        elif kind == "exited":
            inst.actual_status = "exited"
            inst.ports = None
            inst.status_msg = "container exited with code 1"
        elif kind in ("unknown", "offline"):
            inst.actual_status = kind
            inst.status_msg = None
        else:
            raise ValueError(kind)

    def _all_stopped(self, inst: FakeInstance, msg: str) -> None:
        if self.containers is not None:
            self.containers.halt(inst)  # a stopped container's processes are gone
        inst.actual_status = "stopped"
        inst.intended_status = inst.cur_state = inst.next_state = "stopped"
        inst.running_since = None
        inst.ports = None
        inst.status_msg = msg

    def _bill(self, now: float) -> None:
        # Storage bills from creation in every state; the GPU only while running.
        for inst in self.instances.values():
            start = inst.last_billed
            if now <= start:
                continue
            cost = inst.storage_per_hour * (now - start) / 3600
            if inst.running_since is not None:
                gpu_from = max(start, inst.running_since)
                if now > gpu_from:
                    cost += inst.gpu_per_hour * (now - gpu_from) / 3600
            inst.spent += cost
            self.credit -= cost
            inst.last_billed = now
        if self.credit <= 0:
            for inst in self.instances.values():
                if inst.intended_status != "stopped" or inst.actual_status != "stopped":
                    self._all_stopped(inst, "Instance stopped: insufficient credit")

    def _assign_ports(self, inst: FakeInstance) -> dict[str, str]:
        start = int(inst.offer.get("direct_port_start") or -1)
        end = int(inst.offer.get("direct_port_end") or -1)
        if start <= 0 or end < start or int(inst.offer.get("direct_port_count") or 0) <= 0:
            return {}  # no direct ports on this host: proxy SSH only
        wanted: list[str] = []
        tokens = set(inst.runtype.split())
        if tokens & {"ssh_direc", "ssh_direct"}:
            wanted.append("22/tcp")
        if tokens & {"jupyter_direc", "jupyter_direct"}:
            wanted.append("8080/tcp")
        for key in inst.env:
            m = re.fullmatch(r"-p\s+(?:\d+:)?(\d+)(/(tcp|udp))?", key.strip())
            if m:
                wanted.append(f"{m.group(1)}/{m.group(3) or 'tcp'}")
        used = self._ports_used.setdefault(int(inst.offer["machine_id"]), set())
        out: dict[str, str] = {}
        candidates = (p for p in range(start, end + 1) if p not in used)
        for key in dict.fromkeys(wanted):
            port = next(candidates, None)
            if port is None:
                break
            used.add(port)
            out[key] = str(port)  # HostPort is a string on the wire
        return out

    def _release_ports(self, inst: FakeInstance) -> None:
        used = self._ports_used.get(int(inst.offer["machine_id"]), set())
        for port in (inst.ports or {}).values():
            used.discard(int(port))

    def _instance_json(self, inst: FakeInstance) -> JsonDict:
        o = inst.offer
        now = self.now()
        running = inst.actual_status == "running"
        ports = None
        if inst.ports is not None:
            ports = {k: [{"HostIp": "0.0.0.0", "HostPort": v}] for k, v in inst.ports.items()}
        data: JsonDict = {
            "id": inst.id, "machine_id": o["machine_id"], "host_id": o["host_id"],
            "bundle_id": o.get("bundle_id"),
            "actual_status": inst.actual_status, "intended_status": inst.intended_status,
            "cur_state": inst.cur_state, "next_state": inst.next_state,
            "status_msg": inst.status_msg, "label": inst.label,
            "image_uuid": inst.image, "image_runtype": self._echo_runtype(inst.runtype),
            "image_args": inst.args,
            "extra_env": [[k, v] for k, v in inst.env.items()],
            "onstart": inst.onstart,
            "ssh_host": inst.ssh_host, "ssh_port": inst.ssh_port, "ssh_idx": inst.ssh_idx,
            # Real responses carry stray whitespace here.
            "public_ipaddr": inst.public_ipaddr + "\n", "local_ipaddrs": "172.17.0.2 \n",
            "ports": ports,
            "direct_port_start": o.get("direct_port_start", -1),
            "direct_port_end": o.get("direct_port_end", -1),
            "direct_port_count": o.get("direct_port_count", 0),
            "machine_dir_ssh_port": int(inst.ports["22/tcp"]) if inst.ports
            and "22/tcp" in inst.ports else None,
            "gpu_name": o["gpu_name"], "num_gpus": o["num_gpus"], "gpu_ram": o["gpu_ram"],
            "gpu_totalram": o.get("gpu_total_ram"), "gpu_arch": o.get("gpu_arch"),
            "gpu_util": 0.0 if running else None, "gpu_temp": 34.0 if running else None,
            "cpu_name": o.get("cpu_name"), "cpu_cores": o.get("cpu_cores"),
            "cpu_cores_effective": o.get("cpu_cores_effective"), "cpu_ram": o.get("cpu_ram"),
            "cpu_util": 0.01 if running else None,
            "mem_usage": 1.2 if running else None, "mem_limit": None, "vmem_usage": None,
            "disk_space": inst.disk, "disk_usage": 4.1 if running else -1,
            "disk_util": round(4.1 / inst.disk, 3) if running else -1,
            "dph_total": inst.dph_total, "dph_base": inst.gpu_per_hour,
            "storage_cost": o.get("storage_cost"),
            "storage_total_cost": round(inst.storage_per_hour, 6),
            "inet_up_cost": o.get("inet_up_cost"), "inet_down_cost": o.get("inet_down_cost"),
            "min_bid": o.get("min_bid"), "is_bid": inst.is_bid,
            "search": self._price_breakdown(inst.gpu_per_hour, inst.storage_per_hour),
            "instance": self._price_breakdown(inst.gpu_per_hour, inst.storage_per_hour),
            "start_date": inst.created_at, "end_date": inst.created_at + float(
                o.get("duration") or 2419200.0),
            "duration": now - inst.created_at,
            "uptime_mins": round((now - inst.running_since) / 60, 2)
            if inst.running_since is not None else None,
            "geolocation": o.get("geolocation"), "verification": o.get("verification"),
            "reliability2": o.get("reliability2"), "hosting_type": o.get("hosting_type"),
            "static_ip": o.get("static_ip"), "cuda_max_good": o.get("cuda_max_good"),
            "driver_version": o.get("driver_version"), "inet_up": o.get("inet_up"),
            "inet_down": o.get("inet_down"), "compute_cap": o.get("compute_cap"),
            "template_id": None, "template_hash_id": None, "template_name": None,
            "jupyter_token": hashlib.sha256(inst.instance_api_key.encode()).hexdigest()[:32],
            "credit_balance": None, "credit_discount": None,
        }
        data.update(inst.network_override)
        if "public_ipaddr" in inst.network_override:
            data["public_ipaddr"] = inst.network_override["public_ipaddr"]
        if ports is None and "ports" in inst.network_override and not running:
            data["ports"] = None  # ports stay null until running, override or not
        data.update(inst.extra)
        return data

    @staticmethod
    def _echo_runtype(runtype: str) -> str:
        # The instance echoes the SDK spelling: "ssh ssh_direc ssh_proxy".
        tokens = [t.replace("ssh_direct", "ssh_direc").replace("jupyter_direct", "jupyter_direc")
                  for t in runtype.split()]
        if any(t.startswith("ssh") for t in tokens) and "ssh" not in tokens:
            tokens.insert(0, "ssh")
        return " ".join(dict.fromkeys(tokens))

    @staticmethod
    def _price_breakdown(gpu: float, disk: float) -> JsonDict:
        total = round(gpu + disk, 6)
        return {"gpuCostPerHour": gpu, "diskHour": round(disk, 6), "totalHour": total,
                "discountTotalHour": 0, "discountedTotalPerHour": total}

    # ----------------------------------------------------------------- middleware

    def _matches(self, route: str, line: str) -> bool:
        return route in line

    def _fault_response(self, status: int, body: Any = None,
                        headers: Mapping[str, str] | None = None) -> web.Response:
        if body is not None:
            if isinstance(body, (dict, list)):
                return _json(status, body, headers)
            return web.Response(status=status, text=str(body), headers=headers)
        if status == 429:
            # Vast's throttle body is usually plain text, with no Retry-After.
            resp = self._throttled(self.throttle_threshold, "text")
            if headers:
                resp.headers.update(headers)
            return resp
        if status == 500:
            return web.Response(status=500, text="Internal Server Error", headers=headers)
        if status in (502, 503, 504):
            reason = {502: "Bad Gateway", 503: "Service Temporarily Unavailable",
                      504: "Gateway Time-out"}[status]
            html = f"<html><head><title>{status} {reason}</title></head><body>" \
                   f"<center><h1>{status} {reason}</h1></center></body></html>"
            return web.Response(status=status, text=html, content_type="text/html",
                                headers=headers)
        return _json(status, _err("server_error", f"error {status}: injected failure"), headers)

    @staticmethod
    def _throttled(threshold: float, style: str) -> web.Response:
        if style == "detail":
            return _json(429, {"detail": f"API requests too frequent endpoint "
                                         f"threshold={threshold}"})
        if style == "json":
            return _json(429, _err("rate_limit_exceeded",
                                   f"API requests too frequent endpoint threshold={threshold}"))
        return web.Response(status=429,
                            text=f"API requests too frequent: endpoint threshold={threshold}")

    async def _hang(self) -> web.Response:
        # Long enough for the client to give up; ends early when the server stops.
        try:
            await asyncio.wait_for(self._stopping.wait(), self.timeout_hang)
        except TimeoutError:
            pass
        return self._fault_response(504)

    def _take_fault(self, line: str) -> Fault | None:
        for fault in self._faults:
            if fault.count > 0 and self._matches(fault.route, line):
                fault.count -= 1
                if fault.count == 0:
                    self._faults.remove(fault)
                return fault
        chaos = self._chaos
        if chaos is not None and not line.startswith("GET /_fake"):
            p, rng, statuses, route = chaos
            if (route is None or route in line) and rng.random() < p:
                status = rng.choice(statuses)
                # A create may be committed before its response is lost: exactly the
                # case the service layer must reconcile by label.
                after = "/asks/" in line and status != 429 and rng.random() < 0.5
                return Fault(route or "*", status, 1, after=after)
        return None

    @web.middleware
    async def _middleware(self, request: web.Request,
                          handler: Callable[[web.Request], Any]) -> web.StreamResponse:
        raw = await request.read()
        body: Any = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw.decode("utf-8", "replace")
        auth = request.headers.get("Authorization", "")
        bearer = auth.startswith("Bearer ")
        query_key = request.query.get("api_key")
        authorized = (bearer and auth[7:] == self.api_key) or query_key == self.api_key
        if not authorized and bearer and request.method in ("PUT", "DELETE"):
            # The instance's own CONTAINER_API_KEY may start/stop/destroy that instance
            # only (vast.md section 7, "Fake fidelity"); the watchdog relies on it.
            m = re.fullmatch(r"/api/v0/instances/(\d+)/", request.path)
            inst = self.instances.get(int(m.group(1))) if m else None
            authorized = inst is not None and auth[7:] == inst.instance_api_key
        rec = RecordedRequest(
            method=request.method, path=request.path,
            query={k: v for k, v in request.query.items() if k != "api_key"}, body=body,
            at=self.now(), authorized=authorized, bearer=bearer,
            key_in_query=query_key is not None,
        )
        self.requests.append(rec)
        try:
            response = await self._dispatch(request, handler, rec, raw, body)
        except web.HTTPException as exc:
            rec.status = exc.status
            raise
        rec.status = response.status
        return response

    async def _dispatch(self, request: web.Request, handler: Callable[[web.Request], Any],
                        rec: RecordedRequest, raw: bytes, body: Any) -> web.StreamResponse:
        line = rec.line
        self._tick()
        for route, seconds in self._delays.items():
            if self._matches(route, line):
                await asyncio.sleep(seconds)
        if request.path.startswith("/_fake/"):
            return await handler(request)  # log result URLs take no auth, like S3
        anonymous_search = (self.anonymous_search and "/bundles/" in line
                            and "Authorization" not in request.headers
                            and "api_key" not in request.query)
        if not rec.authorized and not anonymous_search:
            # Search answers without any key (gpuhunt relies on it); a wrong key fails.
            return _json(self.auth_failure_status, _err("auth_error", "Invalid user key"))
        for route in self.forbidden:
            if self._matches(route, line):
                return _json(403, _err("not_authorized",
                                       "error 403: This API key does not have permission "
                                       "for this endpoint."))
        for route, (interval, style) in self._throttles.items():
            if self._matches(route, line):
                last = self._last_call.get(route)
                mono = time.monotonic()
                if last is not None and mono - last < interval:
                    rec.fault = "throttle"
                    return self._throttled(interval, style)
                self._last_call[route] = mono
        if raw and request.method in ("PUT", "POST", "DELETE") and isinstance(body, str):
            # Form-encoded bodies get a 400 (vast-cli tests note this).
            return _json(400, _err("invalid_args", "error 400: request body must be JSON"))

        fault = self._take_fault(line)
        if fault is not None and not fault.after:
            rec.fault = str(fault.status)
            if fault.status == "timeout":
                return await self._hang()
            return self._fault_response(int(fault.status), fault.body, fault.headers)
        response = await handler(request)
        hold = next((h for h in self.holds if h.count > 0 and self._matches(h.route, line)),
                    None)
        if hold is not None:
            hold.count -= 1
            hold.requests.append(line)
            hold.arrived.set()
            stop = asyncio.ensure_future(self._stopping.wait())
            release = asyncio.ensure_future(hold.released.wait())
            try:
                await asyncio.wait({stop, release}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stop.cancel()
                release.cancel()
        if fault is not None:
            rec.fault = f"{fault.status} after commit"
            if fault.status == "timeout":
                return await self._hang()
            return self._fault_response(int(fault.status), fault.body, fault.headers)
        return response

    # ----------------------------------------------------------------- routes

    def _routes(self, r: web.UrlDispatcher) -> None:
        v0 = "/api/v0"
        r.add_post(f"{v0}/bundles/", self._search)
        r.add_get(f"{v0}/bundles/", self._search_get)
        r.add_put(f"{v0}/search/asks/", self._search_new)
        r.add_put(f"{v0}/asks/{{id}}/", self._create)
        r.add_get(f"{v0}/instances/", self._legacy_list)
        r.add_get("/api/v1/instances/", self._list_v1)
        r.add_put(f"{v0}/instances/reboot/{{id}}/", self._reboot)
        r.add_put(f"{v0}/instances/request_logs/{{id}}/", self._request_logs)
        r.add_get(f"{v0}/instances/{{id}}/", self._show)
        r.add_put(f"{v0}/instances/{{id}}/", self._update)
        r.add_delete(f"{v0}/instances/{{id}}/", self._destroy)
        r.add_post(f"{v0}/instances/{{id}}/ssh/", self._attach_key)
        r.add_get(f"{v0}/instances/{{id}}/ssh/", self._instance_keys)
        r.add_delete(f"{v0}/instances/{{id}}/ssh/{{key_id}}/", self._detach_key)
        r.add_get(f"{v0}/ssh/", self._list_keys)
        r.add_post(f"{v0}/ssh/", self._add_key)
        r.add_put(f"{v0}/ssh/{{id}}/", self._update_key)
        r.add_delete(f"{v0}/ssh/{{id}}/", self._delete_key)
        r.add_get(f"{v0}/users/current/", self._current_user)
        r.add_get(f"{v0}/users/current", self._current_user)  # the SDK omits the slash
        r.add_get("/_fake/logs/{token}", self._log_result)
        r.add_route("*", "/{tail:.*}", self._unknown)

    @staticmethod
    def _int_id(request: web.Request, name: str = "id") -> int | None:
        try:
            return int(request.match_info[name])
        except ValueError:
            return None

    async def _unknown(self, request: web.Request) -> web.Response:
        if not request.path.endswith("/"):
            # Vast redirects to the documented trailing-slash form.
            raise web.HTTPMovedPermanently(location=request.path + "/")
        return web.Response(status=404, text="Not Found")

    # --- search

    async def _search(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        return self._search_response(body if isinstance(body, dict) else {}, "offers")

    async def _search_get(self, request: web.Request) -> web.Response:
        try:
            q = json.loads(request.query.get("q", "{}"))
        except ValueError:
            return _json(400, _err("invalid_args", "error 400: q must be JSON"))
        return self._search_response(q if isinstance(q, dict) else {}, "offers")

    async def _search_new(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        q = body.get("q") if isinstance(body, dict) else None
        resp = self._search_response(q if isinstance(q, dict) else {}, "offers")
        if resp.status == 200:
            data = json.loads(resp.text or "{}")
            data["success"] = True
            return _json(200, data)
        return resp

    def _search_response(self, q: JsonDict, wrapper: str) -> web.Response:
        if self.search_quota_reset is not None:
            if time.time() < self.search_quota_reset:
                return _json(429, _err("search_quota_exceeded",
                                       "Daily search quota exceeded; resets at midnight UTC."),
                             headers={"X-RateLimit-Reset": str(int(self.search_quota_reset))})
            self.search_quota_reset = None
        kind = q.get("type", "on-demand")
        if kind not in _SEARCH_TYPES:
            return _json(400, _err("invalid_args", f"error 400: invalid type {kind!r}"))
        try:
            storage = float(q.get("allocated_storage", 8.0))
            limit = int(q.get("limit", 64))
        except (TypeError, ValueError):
            return _json(400, _err("invalid_args", "error 400: invalid limit/allocated_storage"))
        order_raw = q.get("order", [["score", "desc"]])
        if (isinstance(order_raw, list) and len(order_raw) == 2
                and all(isinstance(x, str) for x in order_raw)):
            order_raw = [order_raw]
        order: list[tuple[str, str]] = []
        for item in order_raw if isinstance(order_raw, list) else []:
            if not (isinstance(item, list) and len(item) == 2 and item[1] in ("asc", "desc")):
                return _json(400, _err("invalid_args", f"error 400: bad order {item!r}"))
            order.append((_SEARCH_ALIASES.get(item[0], item[0]), item[1]))
        rows = []
        for offer in self.offers.values():
            oid = int(offer["id"])
            if oid in self.taken_offers or oid in self.rented_offers:
                continue  # rented offers leave the market
            rows.append(self._priced(offer, storage, kind))
        try:
            rows = [r for r in rows if self._offer_matches(r, q)]
        except _BadFilter as exc:
            return _json(400, _err("invalid_args", f"error 400: {exc}"))
        rows = _ordered(rows, order)[: max(0, limit)]
        return _json(200, {wrapper: rows})

    @staticmethod
    def _priced(offer: JsonDict, storage_gb: float, kind: str) -> JsonDict:
        row = copy.deepcopy(offer)
        disk_hour = storage_gb * float(offer.get("storage_cost") or 0) / 30 / 24
        base = float(offer["dph_base"])
        if kind in ("bid", "interruptible"):
            base = float(offer.get("min_bid") or base)
        row["dph_total"] = round(base + disk_hour, 6)
        row["storage_total_cost"] = round(disk_hour, 6)
        row["search"] = FakeVast._price_breakdown(base, disk_hour)
        row["dlperf_per_dphtotal"] = round(float(row.get("dlperf") or 0) / row["dph_total"], 3)
        row["flops_per_dphtotal"] = round(float(row.get("total_flops") or 0) / row["dph_total"],
                                          3)
        row["rentable"] = True
        row["rented"] = False
        return row

    @staticmethod
    def _offer_matches(row: JsonDict, q: JsonDict) -> bool:
        for key, ops in q.items():
            if key in _SEARCH_CONTROL_KEYS:
                continue
            name = _SEARCH_ALIASES.get(key, key)
            if name == "verified":
                actual: Any = row.get("verification") == "verified"
            elif name == "datacenter":
                actual = int(row.get("hosting_type") or 0) >= 1
            elif name == "geolocation":
                # Results hold free text; filters use the trailing country code.
                actual = _country(row.get("geolocation"))
                if isinstance(ops, Mapping):
                    ops = {k: ([str(x).upper() for x in v] if isinstance(v, list)
                               else str(v).upper()) for k, v in ops.items()}
            elif name in row:
                actual = row[name]
            else:
                continue  # unknown fields are ignored rather than rejected
            if not _match(actual, ops):
                return False
        return True

    # --- create

    async def _body(self, request: web.Request) -> Any:
        raw = await request.read()
        if not raw:
            return {}
        try:
            return json.loads(raw)
        except ValueError:
            return None

    async def _create(self, request: web.Request) -> web.Response:
        offer_id = self._int_id(request)
        body = await self._body(request)
        if offer_id is None or not isinstance(body, dict):
            return _json(400, _err("invalid_args", "error 400/3467: Invalid args: bad request"))
        offer = self.offers.get(offer_id)
        cancel_unavail = body.get("cancel_unavail", "price" not in body)
        if offer_id in self.taken_offers and cancel_unavail and offer is not None:
            return _json(410, _err(
                "no_such_ask",
                f"error 410/3907: no_such_ask Instance type {offer_id} is no longer available.",
                ask_id=offer_id))
        if offer is None or offer_id in self.taken_offers or offer_id in self.rented_offers:
            return _json(404, _err(
                "no_such_ask",
                f"error 404/3603: no_such_ask Instance type by id {offer_id} is not available.",
                ask_id=offer_id))

        image = body.get("image")
        if not image and not body.get("template_hash_id"):
            return _json(400, _err("invalid_args",
                                   "error 400/3467: Invalid args: 'image' is required",
                                   ask_id=offer_id))
        if isinstance(image, str) and len(image) > 1024:
            return _json(400, _err("invalid_args", "error 400/3467: image too long"))
        env = body.get("env", {})
        if env is None:
            env = {}
        if not isinstance(env, dict):
            # The docs are explicit: a Docker flag string here is wrong.
            return _json(400, _err("invalid_args",
                                   "error 400/3467: Invalid args: env must be a JSON object",
                                   ask_id=offer_id))
        if any(len(f"{k}={v}") > 256 for k, v in env.items()) or len(json.dumps(env)) > 32768:
            return _json(400, _err("invalid_args", "error 400/3467: env entry too long"))
        try:
            disk = float(body.get("disk", 10.0))
        except (TypeError, ValueError):
            return _json(400, _err("invalid_args", "error 400/3467: disk must be a number"))
        if disk < 8:
            return _json(400, _err("invalid_args",
                                   "error 400/3467: Invalid args: disk must be at least 8 GB"))
        if disk > float(offer.get("disk_space") or 0):
            return _json(400, _err("invalid_args",
                                   f"error 400/3467: Invalid args: machine has only "
                                   f"{offer.get('disk_space')} GB of disk"))
        label = body.get("label")
        if label is not None and (not isinstance(label, str) or len(label) > 256):
            return _json(400, _err("label_too_long", "error 400: label is too long"))
        onstart = body.get("onstart")
        args = body.get("args") or []
        if not isinstance(args, list):
            return _json(400, _err("invalid_args", "error 400/3467: args must be a list"))
        if len((onstart or "") + " ".join(map(str, args)) + str(body.get("args_str") or "")) \
                > 4096:
            return _json(400, _err("invalid_args",
                                   "error 400/3467: onstart and args exceed 4096 characters"))
        runtype = str(body.get("runtype") or ("args" if args else "ssh"))
        if not set(runtype.split()) <= _RUNTYPE_TOKENS:
            return _json(400, _err("invalid_args", f"error 400/3467: bad runtype {runtype!r}"))

        # The prepay endpoint's documented body; the docs define no create-specific one.
        if self.credit <= 0:
            return _json(411, {"success": False, "msg": "Insufficient credit"})
        if self.spend_rate_limit is not None:
            current = sum(i.dph_total for i in self.instances.values()
                          if i.intended_status == "running")
            if current + float(offer["dph_base"]) > self.spend_rate_limit:
                return _json(400, _err("spend_rate_limit",
                                       "error 400: New accounts have a spend rate limit; "
                                       "verify your email or pick a cheaper offer."))

        price = body.get("price")
        is_bid = price is not None
        if is_bid:
            try:
                price = float(price)
            except (TypeError, ValueError):
                return _json(400, _err("invalid_price", "error 400: invalid price"))
            if not 0.001 <= price <= 128:
                return _json(400, _err("invalid_price", "error 400: price out of range"))

        inst = self._new_instance(offer, body, disk, env, runtype, args,
                                  bid=price if is_bid else None)
        if self.containers is not None:
            # The instance's direct SSH port is its container's real SSH server.
            ssh_port = await self.containers.create(inst)
            inst.network_override["ports"] = {
                "22/tcp": [{"HostIp": "0.0.0.0", "HostPort": str(ssh_port)}]}
        if is_bid and price is not None and price < float(offer.get("min_bid") or 0):
            # A low bid still creates the instance, stopped, and says so in an error.
            self._all_stopped(inst, "Instance stopped: outbid")
            return _json(400, _err(
                "invalid_price",
                f"error 400: bid {price} is below the minimum bid {offer.get('min_bid')}; "
                f"instance created in stopped state",
                new_contract=inst.id, ask_id=offer_id))
        return _json(200, {"success": True, "new_contract": inst.id,
                           "instance_api_key": inst.instance_api_key})

    def _new_instance(self, offer: JsonDict, body: JsonDict, disk: float, env: dict[str, Any],
                      runtype: str, args: list[Any], *, bid: float | None) -> FakeInstance:
        now = self.now()
        iid = self._next_id
        self._next_id += 1 + iid % 7  # ids are not contiguous on the real service
        idx = str(1 + iid % 9)
        inst = FakeInstance(
            id=iid, offer=copy.deepcopy(offer), label=body.get("label"),
            image=str(body.get("image") or f"template:{body.get('template_hash_id')}"),
            disk=disk, env={str(k): str(v) for k, v in env.items()},
            onstart=body.get("onstart"), runtype=runtype, args=[str(a) for a in args],
            created_at=now, instance_api_key=secrets.token_hex(32), is_bid=bid is not None,
            bid_price=bid, loading_at=now + self.provision_seconds,
            ready_at=now + self.boot_seconds, ssh_host=f"ssh{idx}.vast.ai", ssh_idx=idx,
            ssh_port=20000 + iid % 40000, public_ipaddr=str(offer.get("public_ipaddr") or ""),
            last_billed=now, boot_failure=self._next_boot_failure,
        )
        self._next_boot_failure = None
        if body.get("target_state") == "stopped":
            self._all_stopped(inst, "Created in stopped state")
        self.instances[iid] = inst
        self.rented_offers[int(offer["id"])] = iid
        return inst

    # --- instances

    def _no_such_instance(self, iid: int | str | None) -> web.Response:
        return _json(404, _err("no_such_instance",
                               f"error 404/3705: no_such_instance Instance {iid} not found."))

    async def _legacy_list(self, request: web.Request) -> web.Response:
        if not self.legacy_list:
            return _json(410, _err("deprecated_endpoint",
                                   "/api/v0/instances/ is deprecated. Use /api/v1/instances/ "
                                   "instead."))
        rows = [self._instance_json(i) for i in self.instances.values()]
        return _json(200, {"instances_found": len(rows), "instances": rows})

    async def _list_v1(self, request: web.Request) -> web.Response:
        q = request.query

        def bad(msg: str) -> web.Response:
            return _json(400, _err("invalid_args", f"error 400: {msg}"))

        try:
            limit = int(q.get("limit", "25"))
        except ValueError:
            return bad("limit must be an integer")
        limit = 5 if limit <= 0 else min(limit, 25)
        try:
            filters = json.loads(q["select_filters"]) if "select_filters" in q else {}
            order_by = json.loads(q["order_by"]) if "order_by" in q else []
            cols = json.loads(q["select_cols"]) if "select_cols" in q else ["*"]
        except ValueError:
            return bad("select_filters, order_by and select_cols must be JSON")
        if not isinstance(filters, dict) or not isinstance(order_by, list) \
                or not isinstance(cols, list):
            return bad("malformed query")
        for col in filters:
            if col in _COMPUTED_COLUMNS:
                return bad(f"cannot filter on computed column {col!r}")
        order: list[tuple[str, str]] = []
        for item in order_by:
            if not isinstance(item, dict) or item.get("dir", "asc") not in ("asc", "desc"):
                return bad(f"bad order_by entry {item!r}")
            order.append((str(item.get("col")), str(item.get("dir", "asc"))))
        if not any(c == "id" for c, _ in order):
            order.append(("id", "asc"))  # id is always the tiebreaker

        rows = [self._instance_json(i) for i in self.instances.values()]
        try:
            matched = [r for r in rows if all(_match(r.get(k), v) for k, v in filters.items())]
        except _BadFilter as exc:
            return bad(str(exc))
        matched = _ordered(matched, order)
        digest = hashlib.sha256(json.dumps([filters, order], sort_keys=True).encode()).hexdigest()
        offset = 0
        if q.get("after_token"):
            try:
                token = json.loads(base64.urlsafe_b64decode(q["after_token"].encode()))
                offset = int(token["o"])
                if token["h"] != digest[:16] or offset < 0:
                    raise ValueError("token for another query")
            except (ValueError, KeyError, TypeError):
                return bad("invalid after_token")
        page = matched[offset: offset + limit]
        next_token = None
        if offset + limit < len(matched):
            next_token = base64.urlsafe_b64encode(
                json.dumps({"o": offset + limit, "h": digest[:16]}).encode()).decode()
        if cols != ["*"]:
            page = [{c: r.get(c) for c in cols} for r in page]
        label_counts: dict[str, int] = {}
        for r in rows:
            label_counts[r.get("label") or ""] = label_counts.get(r.get("label") or "", 0) + 1
        return _json(200, {"success": True, "instances_found": len(matched),
                           "total_instances": len(rows), "label_counts": label_counts,
                           "next_token": next_token, "instances": page})

    async def _show(self, request: web.Request) -> web.Response:
        iid = self._int_id(request)
        if iid is None:
            return _json(400, _err("invalid_args", "error 400: invalid instance_id"))
        inst = self.instances.get(iid)
        # Unknown or destroyed: a 200 with a null wrapper, which clients read as "gone".
        return _json(200, {"instances": self._instance_json(inst) if inst else None})

    async def _update(self, request: web.Request) -> web.Response:
        iid = self._int_id(request)
        body = await self._body(request)
        if iid is None or not isinstance(body, dict):
            return _json(400, _err("invalid_args", "error 400: invalid instance_id"))
        inst = self.instances.get(iid)
        if inst is None:
            return self._no_such_instance(iid)
        if "label" in body:
            label = body["label"]
            if not isinstance(label, str) or len(label) > 1024:
                return _json(400, _err("label_too_long", "error 400: label too long"))
            inst.label = label
            if "state" not in body:
                return _json(200, {"success": True, "msg": f"label for {iid} set to '{label}'"})
        state = body.get("state")
        if state == "stopped":
            if inst.intended_status != "stopped":
                self._release_ports(inst)
                self._all_stopped(inst, "Stopped by user")
            return _json(200, {"success": True})
        if state == "running":
            if inst.intended_status != "running":
                if self.credit <= 0:
                    return _json(400, _err("missing_billing",
                                           "error 400: Insufficient credit; add credit to "
                                           "start instances."))
                now = self.now()
                inst.intended_status = inst.next_state = "running"
                if inst.id in self.gpu_busy:
                    inst.actual_status = "scheduling"  # see hold_gpu()
                    inst.status_msg = "Waiting for the GPU to be free (scheduling)"
                    inst.ready_at = None
                    return _json(200, {"success": True})
                inst.cur_state = "running"
                inst.actual_status = "loading"
                inst.status_msg = "Starting container"
                inst.ready_at = now + self.restart_seconds
            return _json(200, {"success": True})
        return _json(400, _err("invalid_args", "error 400: state must be running or stopped"))

    async def _destroy(self, request: web.Request) -> web.Response:
        iid = self._int_id(request)
        if iid is None:
            return _json(400, _err("invalid_args", "invalid instance_id"))
        inst = self.instances.pop(iid, None)
        if inst is None:
            return self._no_such_instance(iid)
        self._release_ports(inst)
        if self.containers is not None:
            await self.containers.destroy(inst.id)
        inst.actual_status = None
        inst.cur_state = inst.next_state = "unloaded"
        inst.running_since = None
        self.destroyed[iid] = inst
        self.rented_offers.pop(int(inst.offer["id"]), None)
        return _json(200, {"success": True})

    async def _reboot(self, request: web.Request) -> web.Response:
        iid = self._int_id(request)
        inst = self.instances.get(iid) if iid is not None else None
        if inst is None:
            return self._no_such_instance(iid)
        if inst.actual_status == "running":
            if self.containers is not None:
                self.containers.halt(inst)  # a reboot restarts the container
            inst.actual_status = "rebooting"
            inst.status_msg = "Rebooting"
            inst.ready_at = self.now() + self.reboot_seconds
            # GPU billing pauses until the container is back.
            inst.running_since = None
        return _json(200, {"success": True})

    async def _request_logs(self, request: web.Request) -> web.Response:
        iid = self._int_id(request)
        inst = self.instances.get(iid) if iid is not None else None
        if inst is None:
            return _json(404, _err("invalid_id", "Invalid instance id."))
        body = await self._body(request)
        tail = 1000
        if isinstance(body, dict) and "tail" in body:
            try:
                tail = int(body["tail"])
            except (TypeError, ValueError):
                return _json(400, _err("invalid_args", "tail must be a number"))
        token = secrets.token_hex(8)
        self._logs[token] = (inst.id, tail)
        self._log_gets[token] = 0
        return _json(200, {"success": True, "result_url": f"{self.root_url}/_fake/logs/{token}.log",
                           "msg": "Logs requested; poll result_url."})

    async def _log_result(self, request: web.Request) -> web.Response:
        token = request.match_info["token"].removesuffix(".log")
        if token not in self._logs:
            return web.Response(status=404, text="NoSuchKey")
        gets = self._log_gets[token] = self._log_gets[token] + 1
        if gets <= self.logs_ready_after:
            return web.Response(status=404, text="NoSuchKey")  # not uploaded yet
        iid, tail = self._logs[token]
        inst = self.instances.get(iid) or self.destroyed.get(iid)
        text = inst.logs if inst else ""
        lines = text.splitlines()[-tail:] if tail > 0 else []
        return web.Response(text="\n".join(lines))

    # --- ssh keys

    @staticmethod
    def _valid_key(key: Any) -> bool:
        return isinstance(key, str) and bool(
            re.match(r"^(ssh-(ed25519|rsa|dss)|ecdsa-sha2-\S+|sk-\S+)\s+[A-Za-z0-9+/=]+", key))

    async def _list_keys(self, request: web.Request) -> web.Response:
        return _json(200, [k for k in self.ssh_keys if k["deleted_at"] is None])

    async def _add_key(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        key = body.get("ssh_key") if isinstance(body, dict) else None
        if not key:
            return _json(400, _err("no_ssh_key", "No ssh key provided"))
        if self.team_key:
            return _json(400, _err("team_ssh_keys_not_supported",
                                   "Team SSH keys are not supported. Attach keys to instances "
                                   "instead."))
        if not self._valid_key(key):
            return _json(400, _err("invalid_args", "error 400: Invalid ssh key"))
        # The real service does not de-duplicate; idempotency is the client's job.
        record = {"id": self._next_key_id, "user_id": 123456, "key": key.strip(),
                  "public_key": key.strip(), "created_at": time.strftime(
                      "%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.now())), "deleted_at": None}
        self._next_key_id += 1
        self.ssh_keys.append(record)
        return _json(200, {"success": True, "key": record})

    async def _update_key(self, request: web.Request) -> web.Response:
        kid = self._int_id(request)
        body = await self._body(request)
        for rec in self.ssh_keys:
            if rec["id"] == kid and rec["deleted_at"] is None:
                key = body.get("ssh_key") if isinstance(body, dict) else None
                if not self._valid_key(key):
                    return _json(400, _err("invalid_args", "error 400: Invalid ssh key"))
                rec["key"] = rec["public_key"] = str(key).strip()
                return _json(200, {"success": True, "key": rec})
        return _json(404, _err("no_such_ssh_key", "error 404: no such ssh key"))

    async def _delete_key(self, request: web.Request) -> web.Response:
        kid = self._int_id(request)
        for rec in self.ssh_keys:
            if rec["id"] == kid and rec["deleted_at"] is None:
                rec["deleted_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.now()))
                return _json(200, {"success": True})
        return _json(404, _err("no_such_ssh_key", "error 404: no such ssh key"))

    async def _attach_key(self, request: web.Request) -> web.Response:
        iid = self._int_id(request)
        inst = self.instances.get(iid) if iid is not None else None
        if inst is None:
            return self._no_such_instance(iid)
        body = await self._body(request)
        key = body.get("ssh_key") if isinstance(body, dict) else None
        if not key:
            return _json(400, _err("no_ssh_key", "No ssh key provided"))
        if not self._valid_key(key):
            return _json(400, _err("invalid_args", "error 400: Invalid ssh key"))
        if not any(k["public_key"] == key.strip() for k in inst.ssh_keys):
            inst.ssh_keys.append({"id": self._next_key_id, "public_key": key.strip()})
            self._next_key_id += 1
        return _json(200, {"success": True, "msg": "SSH key attached successfully"})

    async def _instance_keys(self, request: web.Request) -> web.Response:
        iid = self._int_id(request)
        inst = self.instances.get(iid) if iid is not None else None
        if inst is None:
            return self._no_such_instance(iid)
        # The list is JSON-encoded inside the JSON.
        return _json(200, {"success": True, "ssh_keys": json.dumps(inst.ssh_keys)})

    async def _detach_key(self, request: web.Request) -> web.Response:
        iid = self._int_id(request)
        kid = self._int_id(request, "key_id")
        inst = self.instances.get(iid) if iid is not None else None
        if inst is None:
            return self._no_such_instance(iid)
        for k in inst.ssh_keys:
            if k["id"] == kid:
                inst.ssh_keys.remove(k)
                return _json(200, {"success": True, "msg": "SSH key removed from instance."})
        return _json(404, _err("no_such_ssh_key", "error 404: no such ssh key"))

    # --- account

    async def _current_user(self, request: web.Request) -> web.Response:
        # The real response echoes the API key; clients must never log this body.
        return _json(200, {
            "id": 123456, "username": "fakeuser", "email": "fake@example.com",
            "email_verified": True, "credit": round(self.credit, 6), "balance": 0.0,
            "balance_threshold": 10.0, "balance_threshold_enabled": False,
            "billing_creditonly": True, "can_pay": self.credit > 0, "has_billing": True,
            "ssh_key": self.ssh_keys[0]["public_key"] if self.ssh_keys else None,
            "key_id": 998877, "sid": "fake-session", "api_key": self.api_key,
        })
