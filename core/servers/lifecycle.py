"""A server's life cycle: start, stop and destroy, and its idle timeout.

Only kinds that can be powered are started or stopped; destroying a rented server ends
its instance, destroying any other kind forgets it. Each server's changes are serialised
by a lock, and the row keeps its history under a tombstone name after a destroy.
"""

from __future__ import annotations

from core.audit import OUTCOME_OK, Actor
from core.db.models import Server, ServerStatus
from core.errors import ComfyVastError, ResourceBusy, ValidationFailed
from core.providers import provider_for
from core.servers.billing import Billing
from core.servers.boot import BootWait, StillStarting
from core.servers.context import Progress, ServerContext, no_progress
from core.servers.pending import MessageRef
from core.servers.registry import ServerView
from core.servers.state import ServerStates


def require_powered(server: ServerView, what: str) -> None:
    """Refuse to ``what`` (start, stop) a server the bot cannot power, or a destroyed one."""
    provider = provider_for(server)
    if not provider.can_start_stop:
        raise ValidationFailed(
            f"Server '{server.name}' is {provider.what}; the bot cannot {what} it."
        )
    if server.status == ServerStatus.DESTROYED.value:
        raise ValidationFailed(f"Server '{server.name}' was destroyed.")


class Lifecycle:
    def __init__(
        self, ctx: ServerContext, billing: Billing, states: ServerStates, boot: BootWait
    ) -> None:
        self._ctx = ctx
        self._billing = billing
        self._states = states
        self._boot = boot

    async def start(
        self,
        actor: Actor,
        name: str,
        *,
        progress: Progress = no_progress,
        message: MessageRef | None = None,
    ) -> ServerView:
        """Start and wait for ``running``; never destroys (the disk holds the install).

        The row says ``starting`` and the pending record names ``message`` before Vast.ai
        is asked, so a restart can finish the start and report it there.
        """
        ctx = self._ctx
        server = await ctx.registry.get(name)
        require_powered(server, "start")
        async with ctx.lock(f"server:{server.id}"):
            # A restart's background wait for this server gives way to the admin's command.
            ctx.tasks.cancel(("boot", server.id))
            server = await ctx.registry.get(server.id)
            if server.status == ServerStatus.RUNNING.value:
                raise ValidationFailed(f"Server '{server.name}' is already running.")
            if server.status == ServerStatus.DESTROYED.value:
                raise ValidationFailed(f"Server '{server.name}' was destroyed.")
            await self._billing.check_budget(server.price_per_hour, "Starting this server")
            await self._states.set(server.id, status=ServerStatus.STARTING)
            await ctx.pending.begin(server.id, "start", message)
            instance_id = int(server.provider_id or 0)
            ctx.claim(server.id)
            keep_pending = False
            try:
                try:
                    await ctx.retry("start", lambda: ctx.vast.start_instance(instance_id))
                except ComfyVastError as exc:
                    await self._states.set(
                        server.id, status=ServerStatus.STOPPED, message=f"Start failed: {exc}"
                    )
                    raise
                await ctx.connections_stale(server.id)  # a fresh stream once it runs
                await ctx.audit.record(
                    actor, "server start", outcome=OUTCOME_OK, resource=server.name
                )
                return await self._boot.wait_running(
                    server.id, progress=progress, first_boot=False
                )
            except StillStarting:
                keep_pending = True  # the sync reports to the message when it runs
                raise
            finally:
                ctx.release(server.id)
                if not keep_pending:
                    await ctx.pending.take(server.id)

    async def stop(
        self,
        actor: Actor,
        name: str,
        *,
        reason: str = "stopped",
        message: MessageRef | None = None,
        only_if_idle: bool = False,
    ) -> ServerView:
        """Stop the instance. ``only_if_idle`` (the idle autostop): not if a job was
        placed on it meanwhile (ResourceBusy; see ServerStates.begin_stop)."""
        ctx = self._ctx
        server = await ctx.registry.get(name)
        require_powered(server, "stop")
        async with ctx.lock(f"server:{server.id}"):
            # A restart's background wait for this server gives way to the admin's command.
            ctx.tasks.cancel(("boot", server.id))
            server = await ctx.registry.get(server.id)
            if server.status == ServerStatus.STOPPED.value:
                raise ValidationFailed(f"Server '{server.name}' is already stopped.")
            if not await self._states.begin_stop(server.id, only_if_idle=only_if_idle):
                raise ResourceBusy(f"Server '{server.name}' has a job again; not stopped.")
            await ctx.pending.begin(server.id, "stop", message)
            instance_id = int(server.provider_id or 0)
            ctx.claim(server.id)
            try:
                await ctx.retry("stop", lambda: ctx.vast.stop_instance(instance_id))
                await self._states.set(server.id, status=ServerStatus.STOPPED, message=reason)
                await ctx.connections_stale(server.id)
            finally:
                ctx.release(server.id)
                await ctx.pending.take(server.id)
        await ctx.audit.record(
            actor,
            "server stop",
            outcome=OUTCOME_OK,
            resource=server.name,
            details={"reason": reason},
        )
        return await ctx.registry.get(server.id)

    async def destroy(
        self,
        actor: Actor,
        name: str,
        *,
        reason: str = "destroyed",
        message: MessageRef | None = None,
    ) -> ServerView:
        """Destroy the instance (rented kinds) or forget the server (others); the row stays."""
        ctx = self._ctx
        server = await ctx.registry.get(name)
        async with ctx.lock(f"server:{server.id}"):
            # A restart's background wait for this server gives way to the admin's command.
            ctx.tasks.cancel(("boot", server.id))
            server = await ctx.registry.get(server.id)
            if server.status == ServerStatus.DESTROYED.value:
                raise ValidationFailed(f"Server '{server.name}' is already destroyed.")
            if provider_for(server).has_instance(server):
                await self._states.set(server.id, status=ServerStatus.DESTROYING)
                await ctx.pending.begin(server.id, "destroy", message)
                ctx.claim(server.id)
                try:
                    await ctx.destroy_instance(int(server.provider_id or 0))
                finally:
                    ctx.release(server.id)
                    await ctx.pending.take(server.id)
            await self._states.set(server.id, status=ServerStatus.DESTROYED, message=reason)
            # Free the name for reuse; the row keeps its history under a tombstone name.
            await self._states.tombstone(server.id)
        await ctx.audit.record(
            actor,
            "server destroy",
            outcome=OUTCOME_OK,
            resource=server.name,
            details={"reason": reason},
        )
        return await ctx.registry.get(server.id)

    async def set_autostop(self, actor: Actor, name: str, minutes: int) -> ServerView:
        if not 0 <= minutes <= 7 * 24 * 60:
            raise ValidationFailed("Autostop minutes must be between 0 (never) and 10080.")
        ctx = self._ctx
        server = await ctx.registry.get(name)
        async with ctx.sessions.begin() as session:
            row = await session.get(Server, server.id)
            assert row is not None
            row.idle_timeout = minutes
        await ctx.audit.record(
            actor,
            "server autostop",
            outcome=OUTCOME_OK,
            resource=server.name,
            details={"minutes": minutes},
        )
        return await ctx.registry.get(server.id)
