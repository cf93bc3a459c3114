"""The writes that move a server between states, each with its billing interval.

Rows are written before every side effect; the billing interval follows the status so
spend is always derived from the rows.
"""

from __future__ import annotations

from sqlalchemy import select

from core.db.models import ComfyGeneration, Server, ServerStatus
from core.overview import ACTIVE_JOB_STATES
from core.servers.billing import Billing
from core.servers.context import ServerContext
from core.vast import Instance

# Billing follows the instance: booting bills like loading; while stopping or destroying,
# the previous interval simply runs on until the final state.
BILLING_STATE = {
    ServerStatus.RUNNING: "running",
    ServerStatus.LOADING: "loading",
    ServerStatus.STARTING: "loading",
    ServerStatus.STOPPED: "stopped",
    ServerStatus.DESTROYED: "destroyed",
    ServerStatus.ERROR: "destroyed",
}


class ServerStates:
    def __init__(self, ctx: ServerContext, billing: Billing) -> None:
        self._ctx = ctx
        self._billing = billing

    async def set(
        self, server_id: int, *, status: ServerStatus, message: str | None = None
    ) -> None:
        async with self._ctx.sessions.begin() as session:
            row = await session.get(Server, server_id)
            if row is None:
                return
            row.status = status.value
            row.status_message = message
            if status in (ServerStatus.STOPPED, ServerStatus.DESTROYED, ServerStatus.ERROR):
                row.running_since = None
            state = BILLING_STATE.get(status)
            if state is not None:
                await self._billing.open_interval(session, row, state)

    async def begin_stop(self, server_id: int, *, only_if_idle: bool) -> bool:
        """Mark a server stopping; False (nothing written) when ``only_if_idle`` and a job
        is on it. The check and the write hold the server row's lock, which recording a
        job on the server takes too (core.generation.store: record, assign): a job is
        either seen here, or refused there because the stop began. Without the lock the
        idle autostop stopped servers that a job had just been placed on."""
        async with self._ctx.sessions.begin() as session:
            row = await session.get(Server, server_id, with_for_update=True)
            if row is None:
                return False
            if only_if_idle:
                active = await session.scalar(
                    select(ComfyGeneration.id)
                    .where(ComfyGeneration.server_id == server_id)
                    .where(ComfyGeneration.status.in_(ACTIVE_JOB_STATES))
                    .limit(1)
                )
                if active is not None:
                    return False
            row.status = ServerStatus.STOPPING.value
            row.status_message = None
        return True

    async def apply_instance(self, server_id: int, instance: Instance) -> None:
        """Record a running instance: where to reach it, its price, running since when."""
        ctx = self._ctx
        async with ctx.sessions.begin() as session:
            row = await session.get(Server, server_id)
            assert row is not None
            endpoint = instance.ssh_endpoint
            if endpoint:
                row.ssh_host, row.ssh_port = endpoint
            comfy = instance.comfy_endpoint(row.comfy_port or ctx.settings.comfy.default_port)
            if comfy and ctx.settings.comfy.expose_port:
                row.comfy_url = f"http://{comfy[0]}:{comfy[1]}"
            if instance.dph_total:
                row.price_per_hour = instance.dph_total
            was = row.status
            row.status = ServerStatus.RUNNING.value
            row.status_message = None
            row.is_launched = True
            if was != ServerStatus.RUNNING.value or row.running_since is None:
                row.running_since = ctx.clock()
                row.last_used_at = ctx.clock()
            await self._billing.open_interval(session, row, "running")

    async def set_price(self, server_id: int, price_per_hour: float) -> None:
        """A running instance's price changed (Vast re-priced it): bill the new rate."""
        async with self._ctx.sessions.begin() as session:
            row = await session.get(Server, server_id)
            assert row is not None
            row.price_per_hour = price_per_hour
            await self._billing.open_interval(session, row, "running")

    async def tombstone(self, server_id: int) -> None:
        """Free a destroyed server's name for reuse; the row keeps its history."""
        async with self._ctx.sessions.begin() as session:
            row = await session.get(Server, server_id)
            if row is not None and "~" not in row.name:
                row.name = f"{row.name[:20]}~{row.id}"
