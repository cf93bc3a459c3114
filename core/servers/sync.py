"""Keeping rows true to the provider: the provider is the truth, rows follow it.

Run at start-up and every minute: operations a dead process left in flight are finished
(:mod:`core.servers.recovery`), instances that vanished, were stopped outside the bot or
re-priced are written back, and running instances get their heartbeat.
"""

from __future__ import annotations

import logging

from sqlalchemy import select

from core.db.models import Server, ServerStatus
from core.providers import kinds
from core.servers.context import ServerContext
from core.servers.recovery import IN_FLIGHT, Recovery
from core.servers.state import ServerStates
from core.vast import VastError

log = logging.getLogger(__name__)


class ProviderSync:
    def __init__(self, ctx: ServerContext, states: ServerStates, recovery: Recovery) -> None:
        self._ctx = ctx
        self._states = states
        self._recovery = recovery

    async def register_key(self) -> bool:
        """Register the bot's public key with the Vast.ai account (idempotent).

        Best effort: team keys cannot hold account SSH keys, and every instance also gets
        the key attached and installed by its onstart script.
        """
        ctx = self._ctx
        public_key = ctx.public_key
        if ctx.vast_client is None or public_key is None:
            return False
        try:
            await ctx.retry("add ssh key", lambda: ctx.vast.add_ssh_key(public_key()))
            return True
        except VastError as exc:
            log.warning("could not register the SSH key with Vast.ai: %s", exc)
            return False

    async def sync(self) -> None:
        """Reconcile synced rows with the provider (vanished, stopped outside, new price)."""
        ctx = self._ctx
        if ctx.vast_client is None:
            return
        try:
            instances = {i.id: i for i in await ctx.vast.list_instances()}
        except VastError as exc:
            # An error is not "no instances": change nothing (vast.md pitfall 1).
            log.warning("sync skipped: listing instances failed: %s", exc)
            return
        await self._recovery.reconcile(instances)
        async with ctx.sessions() as session:
            rows = (
                await session.scalars(
                    select(Server)
                    .where(Server.provider.in_(kinds(synced=True)))
                    # In-flight rows belong to their operation, or to the recovery above.
                    .where(Server.status.not_in([ServerStatus.DESTROYED.value, *IN_FLIGHT]))
                    .where(Server.provider_id.is_not(None))
                )
            ).all()
            targets = [
                (r.id, int(r.provider_id or 0), r.status, r.price_per_hour)
                for r in rows
                if r.id not in ctx.busy
            ]
        for server_id, instance_id, status, price in targets:
            instance = instances.get(instance_id)
            if instance is None:
                log.warning("instance %s of server %s vanished", instance_id, server_id)
                await self._states.set(
                    server_id,
                    status=ServerStatus.DESTROYED,
                    message="The instance no longer exists on Vast.ai.",
                )
                continue
            if instance.is_running and status != ServerStatus.RUNNING.value:
                if status not in (ServerStatus.STOPPING.value,):
                    await self._states.apply_instance(server_id, instance)
            elif (
                instance.actual_status in ("stopped", "exited")
                and status == ServerStatus.RUNNING.value
            ):
                await self._states.set(
                    server_id,
                    status=ServerStatus.STOPPED,
                    message="Stopped outside the bot (or outbid).",
                )
                await ctx.connections_stale(server_id)
            elif (
                instance.is_running
                and instance.dph_total
                and abs(instance.dph_total - price) > 1e-6
            ):
                await self._states.set_price(server_id, instance.dph_total)
            if instance.is_running and ctx.heartbeat is not None:
                try:
                    await ctx.heartbeat(await ctx.registry.get(server_id))
                except Exception as exc:  # a missed heartbeat only matters after many
                    log.info("heartbeat to server %s failed: %s", server_id, exc)
