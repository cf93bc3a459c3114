"""A GPU instance rented on Vast.ai: the bot starts, stops and destroys it, and it bills.

Also what is Vast-specific about renting one: which API errors are worth repeating, and
the onstart script with its dead man's switch. ``Offer`` and ``OfferQuery`` are re-exported
here so the Discord side names offers without importing the API client.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

from core.config import Settings
from core.db.models import Provider
from core.providers.base import ServerProvider
from core.vast import (
    Offer,
    OfferQuery,
    SearchQuotaExceeded,
    VastConnectionError,
    VastRateLimited,
    VastServerError,
    VastTimeout,
)

__all__ = [
    "BOOT_DIR",
    "COMFY_IMAGE_PORT",
    "HEARTBEAT_FILE",
    "INSTALL_DIR",
    "LEGACY_HEARTBEAT_FILE",
    "Launch",
    "LABEL_PREFIX",
    "Offer",
    "OfferQuery",
    "VastProvider",
    "is_comfy_image",
    "launch_plan",
    "onstart_script",
    "transient",
    "watchdog_script",
]

LABEL_PREFIX = "comfyvast"
HEARTBEAT_FILE = "/root/.comfyvast/heartbeat"
#: Where instances rented before 2026-12 watch for it; still touched so their watchdogs
#: do not stop them.
LEGACY_HEARTBEAT_FILE = "/root/.comfyvast-heartbeat"
#: Scripts the onstart runs on every boot (the default profile puts ComfyUI's start here).
BOOT_DIR = "/root/.comfyvast/boot.d"
#: What SSH sessions may need from the container's environment, secrets left out, mode 0600.
ENV_FILE = "/root/.comfyvast/env"
#: Seconds between two looks of the dead man's switch at the heartbeat file.
WATCHDOG_INTERVAL = 60.0
#: Where ComfyUI lives on a rented instance, whatever the image (vast.md section 7: Vast's
#: ComfyUI image syncs /opt/workspace-internal/ComfyUI there at boot; the default profile
#: installs there on a plain image).
INSTALL_DIR = "/workspace/ComfyUI"
#: Vast's ComfyUI image runs ComfyUI under supervisord on this port (supervisor-scripts/
#: comfyui.sh, args from COMFYUI_ARGS); Caddy holds 8188 behind a login (vast.md section 7).
COMFY_IMAGE_PORT = 18188
_COMFY_IMAGES = ("vastai/comfy",)  # also matches vastai/comfyui
#: A stopped Vast instance still bills its disk; estimated at 10% when Vast gives no figure.
STOPPED_DISK_SHARE = 0.1


class VastProvider(ServerProvider):
    kind = Provider.VAST.value
    what = "a rented Vast.ai instance"
    rented = True
    can_start_stop = True
    bills = True
    synced = True

    def rate(self, state: str, price_per_hour: float) -> float:
        if state == "stopped":
            return round(price_per_hour * STOPPED_DISK_SHARE, 6)
        return super().rate(state, price_per_hour)


def transient(exc: BaseException) -> bool:
    """Worth repeating: the API was busy, slow or unreachable (not a refusal)."""
    if isinstance(exc, SearchQuotaExceeded):
        return False
    return isinstance(exc, VastServerError | VastTimeout | VastConnectionError | VastRateLimited)


def is_comfy_image(image: str) -> bool:
    """Whether ``image`` is Vast's ComfyUI image (``vastai/comfy:<tag>``), which carries
    ComfyUI and starts it itself once its ``entrypoint.sh`` runs."""
    name = image.strip().lower().split("@", 1)[0].rsplit(":", 1)[0]
    name = name.removeprefix("docker.io/").removeprefix("index.docker.io/")
    return name.startswith(_COMFY_IMAGES)


@dataclass(frozen=True, slots=True)
class Launch:
    """How to create an instance of an image: what Vast gets, what the server row records."""

    image: str
    #: The setup profile for the image: ``fast`` checks Vast's ComfyUI, ``default`` installs.
    profile: str
    comfy_port: int
    comfy_path: str
    onstart: str
    env: dict[str, str] = field(default_factory=dict)
    expose_ports: tuple[int, ...] = ()


def launch_plan(image: str, settings: Settings, public_key: str | None) -> Launch:
    """The create request's image-dependent parts and the server row's ComfyUI facts."""
    listen = "0.0.0.0" if settings.comfy.expose_port else "127.0.0.1"
    onstart = onstart_script(public_key, settings.vast.base_url, settings.costs.orphan_timeout)
    if is_comfy_image(image):
        port = COMFY_IMAGE_PORT
        env = {
            # supervisor-scripts/comfyui.sh exits unless /etc/portal.yaml (written from
            # PORTAL_CONFIG) names ComfyUI; it runs `python main.py $COMFYUI_ARGS`. Nothing
            # reads COMFY_PORT (vast.md section 7). No -p mapping: no public port.
            "PORTAL_CONFIG": "localhost:8188:18188:/:ComfyUI",
            "COMFYUI_ARGS": f"--disable-auto-launch --listen {listen} --port {port}",
        }
        profile = "fast"
    else:
        port, env, profile = settings.comfy.default_port, {}, "default"
    ports = (port,) if settings.comfy.expose_port else ()
    return Launch(image, profile, port, INSTALL_DIR, onstart, env, ports)


def watchdog_script(
    vast_base_url: str, orphan_minutes: int, *, interval: float | None = None
) -> str:
    """A dead man's switch the onstart starts on every boot.

    It stops the instance through Vast.ai's API with the instance's own restricted
    ``CONTAINER_API_KEY`` (read from the environment, never written to a file) when the
    bot has not touched the heartbeat file for ``orphan_minutes``, so a crashed bot does not
    leave a GPU billing. Only python3's standard library: plain CUDA images have no curl
    (vast.md section 7). The boot touches the file, so a restart is not taken for silence.
    """
    # Double quotes only: the code travels inside single quotes (shlex.quote).
    code = (
        'import json,os,sys,time,urllib.request as r\n'
        'u,h,l,i=sys.argv[1],sys.argv[2],float(sys.argv[3]),float(sys.argv[4])\n'
        'open(h,"a").close();os.utime(h)\n'
        'while 1:\n'
        ' time.sleep(i)\n'
        ' try:a=time.time()-os.stat(h).st_mtime\n'
        ' except OSError:open(h,"a").close();continue\n'
        ' if a>l:\n'
        '  try:r.urlopen(r.Request(u+os.environ["CONTAINER_ID"]+"/",'
        'json.dumps({"state":"stopped"}).encode(),{"Authorization":"Bearer "+'
        'os.environ["CONTAINER_API_KEY"],"Content-Type":"application/json"},method="PUT"),'
        'timeout=30);os.utime(h)\n'
        '  except Exception:pass\n'
    )
    url = f"{vast_base_url.rstrip('/')}/instances/"
    every = WATCHDOG_INTERVAL if interval is None else interval
    args = " ".join(shlex.quote(a) for a in (url, HEARTBEAT_FILE, str(int(orphan_minutes) * 60),
                                            f"{every:g}"))
    return f"nohup python3 -c {shlex.quote(code)} {args} >/dev/null 2>&1 &"


def onstart_script(public_key: str | None, vast_base_url: str, orphan_minutes: int) -> str:
    """What Vast runs on every boot (create and each start), instead of the image's own
    entrypoint (vast.md section 7): our key, the watchdog, the boot hooks setup left, then
    the image's ``entrypoint.sh`` when it has one (Vast's images: workspace sync,
    supervisord and ComfyUI), exactly as Vast's own templates do with ``onstart:
    entrypoint.sh``."""
    parts = ["touch ~/.no_auto_tmux", f"mkdir -p ~/.ssh {BOOT_DIR}", "chmod 700 /root/.comfyvast"]
    if public_key:
        # Single-quoted: double quotes made sshd reject it (vast.md, PR #9059). Once only,
        # although this runs on every boot.
        key = shlex.quote(public_key.strip())
        parts.append(f"grep -qxF {key} ~/.ssh/authorized_keys 2>/dev/null || "
                     f"echo {key} >> ~/.ssh/authorized_keys")
        parts.append("chmod 600 ~/.ssh/authorized_keys")
    # Not `env >> /etc/environment`: that file is world-readable and the environment holds
    # CONTAINER_API_KEY. SSH sessions get the rest in a 0600 file they may source.
    env_code = ('import os,re,shlex\nfor k,v in os.environ.items():\n'
                ' if re.fullmatch("[A-Za-z_][A-Za-z0-9_]*",k) and not '
                're.search("KEY|TOKEN|SECRET|PASS|AUTH",k.upper()):'
                'print("export %s=%s"%(k,shlex.quote(v)))')
    parts.append(f"(umask 077; python3 -c {shlex.quote(env_code)} > {ENV_FILE}.tmp && "
                 f"mv {ENV_FILE}.tmp {ENV_FILE})")
    parts.append(watchdog_script(vast_base_url, orphan_minutes))
    parts.append(f'for f in {BOOT_DIR}/*.sh; do [ -f "$f" ] && sh "$f"; done')
    parts.append("if command -v entrypoint.sh >/dev/null 2>&1; then exec entrypoint.sh; fi")
    return "\n".join(parts) + "\n"
