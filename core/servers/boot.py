"""Waiting for a rented instance to boot, then recording where to reach it.

An instance that fails, vanishes or does not start in time is destroyed so it does not
bill, and its server is marked accordingly.
"""

from __future__ import annotations

import asyncio

from core.db.models import Server, ServerStatus
from core.errors import ValidationFailed
from core.servers.context import Progress, ServerContext, no_progress
from core.servers.registry import ServerView
from core.servers.state import ServerStates
from core.vast import VastNotFound


class BootWait:
    def __init__(self, ctx: ServerContext, states: ServerStates) -> None:
        self._ctx = ctx
        self._states = states

    async def wait_running(
        self, server_id: int, *, progress: Progress = no_progress
    ) -> ServerView:
        """Poll the instance until it runs, then record where to reach it."""
        ctx = self._ctx
        async with ctx.sessions() as session:
            row = await session.get(Server, server_id)
            assert row is not None and row.provider_id
            instance_id = int(row.provider_id)
        deadline = asyncio.get_running_loop().time() + ctx.boot_timeout
        last_state = None
        while True:
            try:
                instance = await ctx.retry(
                    "show instance", lambda: ctx.vast.show_instance(instance_id)
                )
            except VastNotFound:
                await self._states.set(
                    server_id,
                    status=ServerStatus.DESTROYED,
                    message="The instance vanished while starting.",
                )
                raise ValidationFailed("The instance vanished while it was starting.") from None
            if instance.is_running and instance.ssh_endpoint:
                break
            if instance.is_failed:
                await ctx.destroy_instance(instance_id)
                await self._states.set(
                    server_id,
                    status=ServerStatus.ERROR,
                    message=f"The instance failed to start ({instance.status_msg}).",
                )
                raise ValidationFailed(
                    f"The instance failed to start ({instance.actual_status}); it was destroyed "
                    "so it does not bill."
                )
            state = instance.actual_status or "provisioning"
            if state != last_state:
                await progress(f"Instance {instance_id}: {state}…")
                last_state = state
            if asyncio.get_running_loop().time() > deadline:
                await ctx.destroy_instance(instance_id)
                await self._states.set(
                    server_id,
                    status=ServerStatus.ERROR,
                    message="The instance did not start in time.",
                )
                raise ValidationFailed(
                    f"The instance did not start within {ctx.boot_timeout / 60:.0f} minutes; "
                    "it was destroyed so it does not bill."
                )
            await ctx.sleep(ctx.poll_interval)
        if ctx.comfy_ready is not None:
            # Running at Vast is not ready: a server that was set up counts as running only
            # once its ComfyUI answers through the tunnel (core.remote.Remote.wait_comfy).
            await ctx.comfy_ready(
                await ctx.registry.get(server_id), instance.ssh_endpoint, progress)
        await self._states.apply_instance(server_id, instance)
        view = await ctx.registry.get(server_id)
        await progress(f"Server {view.name} is running.")
        return view
