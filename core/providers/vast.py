"""A GPU instance rented on Vast.ai: the bot starts, stops and destroys it, and it bills.

Also what is Vast-specific about renting one: which API errors are worth repeating, and
the onstart script with its dead man's switch. ``Offer`` and ``OfferQuery`` are re-exported
here so the Discord side names offers without importing the API client.
"""

from __future__ import annotations

import shlex

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
    "HEARTBEAT_FILE",
    "LABEL_PREFIX",
    "Offer",
    "OfferQuery",
    "VastProvider",
    "onstart_script",
    "transient",
    "watchdog_script",
]

LABEL_PREFIX = "comfyvast"
HEARTBEAT_FILE = "/root/.comfyvast-heartbeat"
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


def watchdog_script(vast_base_url: str, orphan_minutes: int) -> str:
    """A dead man's switch started by the instance's onstart.

    It stops the instance through Vast.ai's API with the instance's own restricted
    ``CONTAINER_API_KEY`` when the bot has not touched the heartbeat file for
    ``orphan_minutes``, so a crashed bot does not leave a GPU billing.
    """
    url = shlex.quote(f"{vast_base_url.rstrip('/')}/instances/")
    limit = int(orphan_minutes) * 60
    hb = HEARTBEAT_FILE
    return (
        f"touch {hb}; (while sleep 60; do "
        f"age=$(( $(date +%s) - $(stat -c %Y {hb} 2>/dev/null || date +%s) )); "
        f'if [ "$age" -gt {limit} ]; then '
        f'curl -fsS -m 30 -X PUT -H "Authorization: Bearer $CONTAINER_API_KEY" '
        f"-H 'Content-Type: application/json' -d '{{\"state\":\"stopped\"}}' "
        f'{url}"$CONTAINER_ID/" && touch {hb}; fi; done) >/dev/null 2>&1 &'
    )


def onstart_script(public_key: str, vast_base_url: str, orphan_minutes: int) -> str:
    # The key is single-quoted: double quotes made sshd reject it (vast.md, PR #9059).
    return (
        "touch ~/.no_auto_tmux; env >> /etc/environment; mkdir -p ~/.ssh; "
        f"echo {shlex.quote(public_key.strip())} >> ~/.ssh/authorized_keys; "
        "chmod 600 ~/.ssh/authorized_keys; " + watchdog_script(vast_base_url, orphan_minutes)
    )
