"""What the Vast.ai API takes and returns, as frozen dataclasses: the offer query and
offers, the create request, instances, SSH keys and the account balance. Parsing from the
API's JSON is defensive (missing or mistyped fields fall back to defaults)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

JsonDict = dict[str, Any]


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

    def comfy_endpoint(self, port: int = 8188) -> tuple[str, int] | None:
        """Where ComfyUI's ``port`` inside the instance is reachable from outside, if it
        is mapped (Vast's ComfyUI image listens on 18188, a plain image on 8188)."""
        public = self.public_port(port)
        return (self.public_ipaddr, public) if self.public_ipaddr and public else None


@dataclass(frozen=True, slots=True)
class SshKey:
    id: int
    public_key: str
    created_at: str | None = None

    @classmethod
    def from_api(cls, d: Mapping[str, Any]) -> SshKey:
        # The OpenAPI names the field "key"; skypilot reads "public_key". Accept both.
        return cls(
            id=_i(d.get("id")),
            public_key=str(d.get("public_key") or d.get("key") or d.get("ssh_key") or "").strip(),
            created_at=d.get("created_at"),
        )


@dataclass(frozen=True, slots=True)
class Balance:
    credit: float  # prepaid dollars left (falls back to "balance")
    balance: float
    user_id: int | None = None
    has_billing: bool | None = None
    can_pay: bool | None = None
    balance_threshold: float | None = None

    @classmethod
    def from_api(cls, data: Mapping[str, Any]) -> Balance:
        credit = data.get("credit")
        bal = _f(data.get("balance"))
        return cls(
            credit=_f(credit) if credit is not None else bal,
            balance=bal,
            user_id=data.get("id"),
            has_billing=data.get("has_billing"),
            can_pay=data.get("can_pay"),
            balance_threshold=data.get("balance_threshold"),
        )
