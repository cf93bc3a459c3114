"""The writes that move a server between states, each with its billing interval.

Rows are written before every side effect; the billing interval follows the status so
spend is always derived from the rows.
"""

from __future__ import annotations

from sqlalchemy import exists, select, update

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
        is on it. One conditional UPDATE (atomic on SQLite, whose writes serialize), after
        taking the server row's lock (PostgreSQL), which recording a job on the server
        takes too (core.generation.store: record, assign, whose writes are conditional on
        the server running): a job is either seen here, or refused there because the stop
        began. Without this the idle autostop stopped servers a job had just been put on."""
        async with self._ctx.sessions.begin() as session:
            await session.execute(
                select(Server.id).where(Server.id == server_id).with_for_update()
            )
            stmt = update(Server).where(Server.id == server_id)
            if only_if_idle:
                stmt = stmt.where(~exists().where(
                    ComfyGeneration.server_id == server_id,
                    ComfyGeneration.status.in_(ACTIVE_JOB_STATES),
                ))
            result = await session.execute(
                stmt.values(status=ServerStatus.STOPPING.value, status_message=None),
                execution_options={"synchronize_session": False},
            )
        return bool(result.rowcount == 1)  # type: ignore[attr-defined]

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
