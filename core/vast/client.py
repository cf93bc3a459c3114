"""Typed async access to the Vast.ai REST API.

One :class:`VastClient` wraps one injected :class:`aiohttp.ClientSession`. It speaks the
real protocol (see ``/work/shared/reference/vast.md``):

* ``Authorization: Bearer <key>``; the key never goes into a URL, a log line, a repr or an
  exception message.
* Most routes live under ``/api/v0``; listing instances uses the paginated
  ``/api/v1/instances/`` because the v0 collection answers 410 on migrated accounts.
* Errors are mapped in :func:`core.vast.errors.error_from_response`; requests are sent and
  retried by :class:`core.vast.transport.VastTransport`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

import aiohttp

from core.vast.errors import VastNotFound, VastServerError, VastTimeout
from core.vast.query import build_search_body
from core.vast.transport import VastTransport
from core.vast.types import Balance, CreateRequest, Instance, Offer, OfferQuery, SshKey

log = logging.getLogger(__name__)

# The v1 instance list never returns more than this per page.
LIST_PAGE_LIMIT = 25


def _normalise_key(public_key: str) -> str:
    # "type base64 [comment]": two keys are the same key whatever their comments say.
    parts = public_key.strip().split()
    return " ".join(parts[:2])



class VastClient(VastTransport):
    """Typed async access to Vast.ai. Construct once with the app's shared session."""

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
        return [SshKey.from_api(k) for k in items
                if isinstance(k, Mapping) and not k.get("deleted_at")]

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

    async def detach_ssh_key(self, instance_id: int, key_id: int) -> None:
        """Remove a key from one instance (DELETE /instances/{id}/ssh/{key_id}/)."""
        await self._request("DELETE", f"/instances/{int(instance_id)}/ssh/{int(key_id)}/",
                            op="detach_ssh_key", idempotent=True)

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
        return [SshKey.from_api(k) for k in raw if isinstance(k, Mapping)]

    # ----------------------------------------------------------------- account

    async def balance(self) -> Balance:
        data = await self._request("GET", "/users/current/", op="balance", idempotent=True)
        if not isinstance(data, Mapping):
            raise VastServerError("Vast.ai sent an unexpected account response.", op="balance")
        return Balance.from_api(data)
