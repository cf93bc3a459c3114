"""Idle autostop: warn, then stop (or destroy) idle servers that bill; cap their lifetime.

Setup runs, model downloads and queued or running jobs count as activity. The periodic
loop that drives :meth:`Autostop.tick` (and the provider sync) lives in the service.
"""

from __future__ import annotations

import datetime as dt
import logging

from sqlalchemy import select

from core.audit import OUTCOME_OK, SYSTEM, Actor
from core.db.models import ComfyGeneration, ModelDownload, ServerExecution, ServerStatus
from core.errors import ComfyVastError, ResourceBusy
from core.overview import ACTIVE_JOB_STATES
from core.providers import provider_for
from core.servers.context import ServerContext
from core.servers.lifecycle import Lifecycle
from core.servers.registry import ServerView

log = logging.getLogger(__name__)


class Autostop:
    def __init__(self, ctx: ServerContext, lifecycle: Lifecycle) -> None:
        self._ctx = ctx
        self._lifecycle = lifecycle
        # Servers warned of their coming stop, so each idle spell warns once.
        self._warned: dict[int, dt.datetime] = {}
        # When the earliest idle server found by the last tick reaches its idle timeout
        # (None: none will): the maintenance loop wakes then instead of at its next
        # 30-s round, so a stop bills no more than the timeout (up to 30 s a stop).
        self.next_due: dt.datetime | None = None

    async def busy(self, server_id: int) -> bool:
        """Setup, downloads and queued or running jobs count as activity, never idle."""
        active = (
            (ComfyGeneration.id, ComfyGeneration.server_id,
             ComfyGeneration.status.in_(ACTIVE_JOB_STATES)),
            (ServerExecution.id, ServerExecution.server_id,
             ServerExecution.status.in_(["pending", "running"])),
            (ModelDownload.id, ModelDownload.server_id,
             ModelDownload.status.in_(["pending", "running"])),
        )
        async with self._ctx.sessions() as session:
            for row_id, server_col, is_active in active:
                stmt = select(row_id).where(server_col == server_id).where(is_active).limit(1)
                if (await session.scalars(stmt)).first() is not None:
                    return True
        return False

    async def keep_alive(self, actor: Actor, server_id: int) -> ServerView:
        ctx = self._ctx
        await ctx.registry.touch(server_id)
        self._warned.pop(server_id, None)
        server = await ctx.registry.get(server_id)
        await ctx.audit.record(
            actor, "server keep-alive", outcome=OUTCOME_OK, resource=server.name
        )
        return server

    async def tick(self) -> list[str]:
        """Warn, then stop (or destroy) idle servers; enforce the lifetime cap.

        Returns the names of the servers acted on.
        """
        ctx = self._ctx
        costs = ctx.settings.costs
        now = ctx.clock()
        acted: list[str] = []
        self.next_due = None
        for server in await ctx.registry.list():
            if (
                not provider_for(server).can_start_stop
                or server.status != ServerStatus.RUNNING.value
            ):
                continue
            if (
                costs.max_hours
                and server.running_since
                and (now - server.running_since >= dt.timedelta(hours=costs.max_hours))
            ):
                await self._idle_action(server, f"reached the {costs.max_hours:g} h lifetime cap")
                acted.append(server.name)
                continue
            timeout = server.idle_timeout if server.idle_timeout is not None else costs.idle_timeout
            if timeout <= 0:
                continue
            if await self.busy(server.id):
                await ctx.registry.touch(server.id)
                self._warned.pop(server.id, None)
                continue
            # Idle since the last job or since it came up, whichever is later: a server
            # started again keeps the last job's time from before its stop, and counted
            # from that it was stopped again at the first tick, before any job reached it.
            seen = [t for t in (server.last_used_at, server.running_since) if t is not None]
            last = max(seen) if seen else server.created_at
            idle = now - last
            if idle >= dt.timedelta(minutes=timeout):
                await self._idle_action(server, f"idle for {timeout} minutes")
                acted.append(server.name)
                continue
            due = last + dt.timedelta(minutes=timeout)
            self.next_due = due if self.next_due is None else min(self.next_due, due)
            if (
                costs.idle_warning
                and idle >= dt.timedelta(minutes=max(timeout - costs.idle_warning, 0))
                and server.id not in self._warned
                and server.last_channel_id
            ):
                self._warned[server.id] = now
                left = max(1, round((dt.timedelta(minutes=timeout) - idle).total_seconds() / 60))
                await ctx.events.idle_warning(server, server.last_channel_id, left)
        return acted

    async def _idle_action(self, server: ServerView, why: str) -> None:
        action = self._ctx.settings.costs.idle_action
        try:
            if action == "destroy":
                await self._lifecycle.destroy(SYSTEM, server.name, reason=why)
            else:
                # Re-checked under the lock that recording a job takes: a job placed in
                # the instant of the stop keeps the server (ResourceBusy).
                await self._lifecycle.stop(SYSTEM, server.name, reason=why,
                                           only_if_idle=True)
        except ResourceBusy as exc:
            log.info("autostop of %s skipped: %s", server.name, exc)
            return
        except ComfyVastError as exc:
            log.warning("autostop of %s failed: %s", server.name, exc)
            return
        self._warned.pop(server.id, None)
        if server.last_channel_id:
            verb = "destroyed" if action == "destroy" else "stopped"
            await self._ctx.events.notice(
                server.last_channel_id, f"Server **{server.name}** was {verb}: {why}."
            )
