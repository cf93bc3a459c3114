"""Diagnostics: what works and what does not on one server, each with a hint.

The checks, in order; a failure makes the checks that depend on it "not checked":

1. reachability: a TCP connection to the SSH port (or, for a direct server, ComfyUI's);
2. SSH login with the pinned host key and the bot's key;
3. the ComfyUI port on the server (through the SSH connection, so nothing needs exposing)
   and its ``/system_stats`` answer;
4. the service: the supervisor and ComfyUI processes the setup started;
5. the installation: files, the Python interpreter, ComfyUI's version;
6. GPU and VRAM: ``nvidia-smi`` when present, else what ComfyUI reports.

Everything the server runs is one probe script built with :func:`shlex.quote` values.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shlex
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import asyncssh

from core.providers import has_shell
from core.remote import Remote
from core.servers import ServerRegistry, ServerView
from core.setup import SetupService, posix_sh
from core.ssh import HostKeyMismatch, SSHAuthError, SSHError, SSHTarget, SSHTimeout

log = logging.getLogger(__name__)

__all__ = ["Check", "DiagnosticReport", "Diagnostics"]

TCP_TIMEOUT = 5.0
PROBE_TIMEOUT = 30.0
HTTP_TIMEOUT = 10.0
MAX_HTTP_BYTES = 1_000_000


@dataclass(frozen=True, slots=True)
class Check:
    """One line of the report. ``ok`` is None when the check did not apply or was skipped."""

    name: str
    ok: bool | None
    detail: str
    hint: str | None = None


@dataclass(frozen=True, slots=True)
class DiagnosticReport:
    server: str
    provider: str
    checks: tuple[Check, ...]
    seconds: float

    @property
    def ok(self) -> bool:
        return all(c.ok is not False for c in self.checks)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.ok is False]

    def check(self, name: str) -> Check:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(name)


REACHABILITY = "Reachability"
SSH_LOGIN = "SSH login"
COMFY_PORT = "ComfyUI port"
SERVICE = "ComfyUI service"
INSTALLATION = "Installation"
GPU = "GPU and VRAM"


@dataclass
class _Probe:
    """The server's answers to the probe script (``key=value`` lines)."""

    values: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> _Probe:
        probe = cls()
        for line in text.splitlines():
            key, sep, value = line.partition("=")
            if sep:
                probe.values.setdefault(key.strip(), []).append(value.strip())
        return probe

    def get(self, key: str) -> str | None:
        found = self.values.get(key)
        return found[0] if found else None

    def all(self, key: str) -> list[str]:
        return self.values.get(key, [])


def probe_script(params: Mapping[str, str]) -> str:
    """The shell script that gathers facts about the installation, values quoted."""
    install_dir = shlex.quote(params.get("install_dir", "/opt/ComfyUI"))
    python = shlex.quote(params.get("python", "python3"))
    return f"""
dir={install_dir}
py={python}
state="$dir/.comfyvast"
if [ "$py" = auto ]; then py=$(cat "$state/python" 2>/dev/null || echo python3); fi
echo "install_dir=$dir"
if [ -d "$dir" ]; then echo dir=yes; else echo dir=no; fi
if [ -f "$dir/main.py" ]; then echo main=yes; else echo main=no; fi
if v=$("$py" -c 'import sys; print(sys.version.split()[0])' 2>/dev/null); then
  echo "python=$v"
else
  echo "python_missing=$py"
fi
if [ -f "$dir/comfyui_version.py" ]; then
  v=$(sed -n 's/^__version__ *= *//p' "$dir/comfyui_version.py" | tr -d "\\"'" | head -n 1)
  echo "version=$v"
fi
if [ -f "$state/checkout" ]; then echo "checkout=$(head -n 1 "$state/checkout")"; fi
for name in supervisor comfyui; do
  # kill -0 also succeeds for a zombie; /proc tells them apart.
  if pid=$(cat "$state/$name.pid" 2>/dev/null) && kill -0 "$pid" 2>/dev/null \
      && ! grep -qs '^[0-9]* (.*) Z' "/proc/$pid/stat"; then
    echo "$name=$pid"
  fi
done
if [ -f "$state/endpoint" ]; then echo "endpoint=$(cat "$state/endpoint")"; fi
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader,nounits 2>/dev/null \\
    | sed 's/^/gpu=/'
else
  echo gpu_tool=none
fi
if [ -f "$state/comfyui.log" ]; then tail -n 5 "$state/comfyui.log" | sed 's/^/log=/'; fi
echo probe=done
"""


class Diagnostics:
    def __init__(
        self,
        registry: ServerRegistry,
        remote: Remote,
        setup: SetupService,
        http: aiohttp.ClientSession | None = None,
    ) -> None:
        self._registry = registry
        self._remote = remote
        self._setup = setup
        self._http = http

    async def diagnose(self, server: str | int) -> DiagnosticReport:
        view = await self._registry.get(server)
        started = time.monotonic()
        if not has_shell(view):
            checks = await self._direct(view)
        else:
            checks = await self._over_ssh(view)
        report = DiagnosticReport(view.name, view.provider, tuple(checks),
                                  round(time.monotonic() - started, 2))
        log.info("diagnosed %s: %d of %d checks failed", view.name, len(report.failed),
                 len(report.checks))
        return report

    # ------------------------------------------------------------------ direct servers

    async def _direct(self, view: ServerView) -> list[Check]:
        url = view.comfy_url or ""
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        reach = await _tcp_check(host, port)
        checks = [reach]
        if not reach.ok:
            checks.append(Check(COMFY_PORT, None, "not checked: the host is unreachable"))
            return checks
        if self._http is None:
            checks.append(Check(COMFY_PORT, None, "not checked: no HTTP client"))
            return checks
        try:
            async with asyncio.timeout(HTTP_TIMEOUT):
                # No redirects: ComfyUI never sends one, and a hostile server could point
                # the bot at an internal URL (core/comfy/limits.py).
                async with self._http.get(f"{url}/system_stats", allow_redirects=False) as resp:
                    status = resp.status
                    body = await resp.content.read(MAX_HTTP_BYTES)
        except (TimeoutError, aiohttp.ClientError) as exc:
            checks.append(Check(COMFY_PORT, False, f"{url} did not answer ({exc or 'timeout'})",
                                "Check that ComfyUI runs and that the URL is right."))
            return checks
        stats = _stats(status, body)
        if stats is None:
            checks.append(Check(COMFY_PORT, False, f"{url}/system_stats answered HTTP {status}",
                                "The URL does not point at ComfyUI's API."))
            return checks
        checks.append(Check(COMFY_PORT, True, f"ComfyUI {_version(stats)} answers at {url}"))
        checks.append(_gpu_from_stats(stats))
        return checks

    # ------------------------------------------------------------------ SSH servers

    async def _over_ssh(self, view: ServerView) -> list[Check]:
        assert view.ssh_host is not None
        port = view.ssh_port or 22
        reach = await _tcp_check(view.ssh_host, port)
        if not reach.ok:
            return [reach] + _skipped("the host is unreachable", SSH_LOGIN, COMFY_PORT, SERVICE,
                                      INSTALLATION, GPU)
        target = self._remote.target(view)
        installation = await self._setup.installation(view)
        params = installation.params
        login, probe = await self._probe(view, target, params)
        if probe is None:
            return [reach, login] + _skipped("SSH login failed", COMFY_PORT, SERVICE,
                                             INSTALLATION, GPU)
        comfy_port = int(params.get("port") or view.comfy_port or 8188)
        port_check, stats = await self._comfy_port(view, target, comfy_port)
        return [
            reach,
            login,
            port_check,
            _service_check(view, probe, port_ok=bool(port_check.ok)),
            _install_check(view, probe, installation.profile),
            _gpu_check(probe, stats),
        ]

    async def _probe(
        self, view: ServerView, target: SSHTarget, params: Mapping[str, str]
    ) -> tuple[Check, _Probe | None]:
        user = target.username
        try:
            result = await self._remote.pool.run(
                target, posix_sh(probe_script(params)), timeout=PROBE_TIMEOUT, check=False)
        except HostKeyMismatch as exc:
            return Check(SSH_LOGIN, False, str(exc),
                         "If the server was reinstalled on purpose, remove it and add it "
                         "again to pin the new key."), None
        except SSHAuthError:
            return Check(SSH_LOGIN, False, f"{user}@{target.address} refused the bot's key",
                         f"Add the bot's public key to ~{user}/.ssh/authorized_keys: "
                         f"{self._remote.key.public_openssh}"), None
        except SSHTimeout:
            return Check(SSH_LOGIN, False, "logged in, but the probe did not finish in "
                         f"{PROBE_TIMEOUT:g} s", "The server may be overloaded."), None
        except SSHError as exc:
            return Check(SSH_LOGIN, False, str(exc),
                         "Check the SSH port, the user and that sshd runs."), None
        probe = _Probe.parse(result.stdout)
        if probe.get("probe") != "done":
            return Check(SSH_LOGIN, False, "logged in, but the login shell did not run the "
                         "probe (it must be a POSIX shell)", "Use sh, bash or dash as "
                         f"{user}'s login shell."), None
        return Check(SSH_LOGIN, True, f"logged in as {user} with the pinned host key"), probe

    async def _comfy_port(
        self, view: ServerView, target: SSHTarget, port: int
    ) -> tuple[Check, dict[str, Any] | None]:
        where = f"127.0.0.1:{port} on the server"
        try:
            async with asyncio.timeout(HTTP_TIMEOUT):
                status, body = await self._http_over_ssh(target, port, "/system_stats")
        except (asyncssh.ChannelOpenError, ConnectionError) as exc:
            log.debug("ComfyUI port on %s: %s", view.name, exc)
            return Check(COMFY_PORT, False, f"nothing listens on {where}",
                         f"Start ComfyUI with /setup run {view.name}."), None
        except TimeoutError:
            return Check(COMFY_PORT, False, f"{where} accepted but did not answer in "
                         f"{HTTP_TIMEOUT:g} s", "ComfyUI may still be starting, or hung: "
                         f"see /server diagnose again, or re-run /setup run {view.name}."), None
        except (SSHError, asyncssh.Error, OSError) as exc:
            return Check(COMFY_PORT, False, f"could not reach {where}: {exc}",
                         "Check the SSH connection."), None
        stats = _stats(status, body)
        if stats is None:
            return Check(COMFY_PORT, False, f"{where} answered HTTP {status}, not ComfyUI",
                         f"Another program uses port {port}; free it or change the server's "
                         "ComfyUI port."), None
        return Check(COMFY_PORT, True, f"ComfyUI {_version(stats)} answers on {where}"), stats

    async def _http_over_ssh(
        self, target: SSHTarget, port: int, path: str
    ) -> tuple[int, bytes]:
        """A minimal HTTP/1.0 GET through a direct-tcpip channel: no tunnel, no exposure."""
        async with self._remote.pool.connection(target) as conn:
            reader, writer = await conn.open_connection("127.0.0.1", port)
            try:
                writer.write(
                    f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n"
                    "Accept: application/json\r\nConnection: close\r\n\r\n".encode())
                data = b""
                while len(data) <= MAX_HTTP_BYTES:
                    chunk = await reader.read(65536)
                    if not chunk:
                        break
                    data += chunk
            finally:
                writer.close()
        head, _, body = data.partition(b"\r\n\r\n")
        status_line = head.split(b"\r\n", 1)[0].split()
        status = int(status_line[1]) if len(status_line) > 1 and status_line[1].isdigit() else 0
        return status, body


# --------------------------------------------------------------------------- checks


def _skipped(why: str, *names: str) -> list[Check]:
    return [Check(name, None, f"not checked: {why}") for name in names]


async def _tcp_check(host: str, port: int) -> Check:
    where = f"{host}:{port}"
    started = time.monotonic()
    try:
        async with asyncio.timeout(TCP_TIMEOUT):
            _, writer = await asyncio.open_connection(host, port)
    except TimeoutError:
        return Check(REACHABILITY, False, f"{where} did not answer within {TCP_TIMEOUT:g} s",
                     "The host is down or a firewall drops the port.")
    except OSError as exc:
        return Check(REACHABILITY, False, f"{where}: {exc.strerror or exc}",
                     "Check that the server is running and the address and port are right.")
    writer.close()
    ms = (time.monotonic() - started) * 1000
    return Check(REACHABILITY, True, f"{where} accepts connections ({ms:.0f} ms)")


def _stats(status: int, body: bytes) -> dict[str, Any] | None:
    if status != 200:
        return None
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("system"), dict):
        return None  # a server's junk is "not ComfyUI", never a crash of the command
    return data


def _version(stats: Mapping[str, Any]) -> str:
    return str(stats["system"].get("comfyui_version") or "(version unknown)")[:80]


def _mib(value: Any) -> int:
    """A VRAM byte count from /system_stats in MiB; junk counts as 0."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < 2**63
    return int(value) // 2**20 if ok else 0


def _service_check(view: ServerView, probe: _Probe, *, port_ok: bool) -> Check:
    supervisor, comfy = probe.get("supervisor"), probe.get("comfyui")
    if supervisor:
        detail = f"supervised (supervisor pid {supervisor}"
        detail += f", ComfyUI pid {comfy})" if comfy else ", ComfyUI not running)"
        if comfy and port_ok:
            return Check(SERVICE, True, detail)
        return Check(SERVICE, False, detail + _log_tail(probe),
                     "ComfyUI keeps exiting: read the log lines above or with /setup logs.")
    if port_ok:
        return Check(SERVICE, True, "running, but not started by the bot (no supervisor)")
    return Check(SERVICE, False, "not running" + _log_tail(probe),
                 f"Start it with /setup run {view.name}.")


def _log_tail(probe: _Probe) -> str:
    lines = probe.all("log")
    return ("; last log lines:\n" + "\n".join(lines[-5:])) if lines else ""


def _install_check(view: ServerView, probe: _Probe, profile: str) -> Check:
    where = probe.get("install_dir") or "?"
    if probe.get("main") != "yes":
        return Check(INSTALLATION, False, f"no ComfyUI in {where}",
                     f"Install it with /setup run {view.name}.")
    python = probe.get("python")
    if python is None:
        return Check(INSTALLATION, False,
                     f"ComfyUI in {where}, but its Python ({probe.get('python_missing')}) "
                     "does not run",
                     f"Repair it with /setup run {view.name} (it re-creates what is broken).")
    version = probe.get("version") or probe.get("checkout") or "unknown version"
    return Check(INSTALLATION, True,
                 f"ComfyUI {version} in {where}, Python {python} (profile {profile})")


def _gpu_from_stats(stats: Mapping[str, Any]) -> Check:
    raw = stats.get("devices")
    devices = [d for d in (raw if isinstance(raw, list) else []) if isinstance(d, dict)]
    gpus = [d for d in devices if d.get("type") not in ("cpu", None)] or devices
    if not gpus:
        return Check(GPU, None, "ComfyUI reports no device",
                     "ComfyUI may be running on the CPU; check the driver and PyTorch.")
    parts = [
        f"{str(d.get('name', '?'))[:80]}: {_mib(d.get('vram_free'))} of "
        f"{_mib(d.get('vram_total'))} MiB free"
        for d in gpus
    ]
    if all(d.get("type") == "cpu" for d in gpus):
        return Check(GPU, False, "ComfyUI runs on the CPU (" + "; ".join(parts) + ")",
                     "ComfyUI sees no GPU: check the NVIDIA driver and that PyTorch was "
                     "installed with CUDA.")
    return Check(GPU, True, "; ".join(parts) + " (from ComfyUI)")


def _gpu_check(probe: _Probe, stats: Mapping[str, Any] | None) -> Check:
    rows = probe.all("gpu")
    if rows:
        parts = []
        for row in rows:
            fields = [f.strip() for f in row.split(",")]
            if len(fields) >= 3 and fields[1].isdigit() and fields[2].isdigit():
                total, used = int(fields[1]), int(fields[2])
                parts.append(f"{fields[0]}: {total - used} of {total} MiB free")
            else:
                parts.append(row)
        return Check(GPU, True, "; ".join(parts))
    if stats is not None:
        return _gpu_from_stats(stats)
    if probe.get("gpu_tool") == "none":
        return Check(GPU, None, "nvidia-smi is not installed and ComfyUI is not answering",
                     "Without an NVIDIA driver ComfyUI runs on the CPU (slowly).")
    return Check(GPU, False, "nvidia-smi found no GPU",
                 "The driver does not see a GPU: check the instance or reboot it.")
