"""Waiting for an instance to boot, then recording where to reach it.

A *first* boot (a fresh rental that never ran) that fails, vanishes, does not start in
time, or cannot pull its image is destroyed so it does not bill; nothing on its disk is
worth keeping. A *restart* of a server that ran before is never destroyed: its disk holds
the installation and the models. When Vast.ai keeps a start waiting (``scheduling``:
another renter holds the GPU, docs guides/reference/troubleshooting.mdx), the bot stops
waiting, says so, and leaves the instance to come up by itself (the sync marks it running).
"""

from __future__ import annotations

import asyncio
import re

from core.db.models import Server, ServerStatus
from core.errors import ValidationFailed
from core.servers.context import Progress, ServerContext, no_progress
from core.servers.registry import ServerView
from core.servers.state import ServerStates
from core.vast import Instance, VastNotFound

# Docker's wording when a tag or repository does not exist or cannot be pulled (Docker
# daemon messages, e.g. "manifest for x:y not found: manifest unknown"), which Vast.ai
# passes on in status_msg like its other daemon errors (vast.md section 3).
PULL_ERROR = re.compile(
    r"manifest unknown|manifest for \S+ not found|pull access denied|"
    r"repository does not exist|no such image|error pulling image|failed to pull",
    re.IGNORECASE,
)


class StillStarting(ValidationFailed):
    """A start did not reach ``running`` in time; the instance is kept and may still start."""


def pull_error(instance: Instance) -> str | None:
    """Vast's status message when it says the image cannot be pulled, else None."""
    msg = instance.status_msg or ""
    return msg if PULL_ERROR.search(msg) else None


def waiting_for_gpu(instance: Instance) -> bool:
    """A start that Vast.ai has accepted but not scheduled yet (the console's "Scheduling").

    The API's spelling of this phase is not documented; it shows as ``scheduling`` or as
    an instance asked to run (``intended_status`` running) that is still ``stopped``.
    """
    status = (instance.actual_status or "").lower()
    return status == "scheduling" or (
        instance.intended_status == "running" and status in ("stopped", "inactive")
    )


def describe(instance: Instance) -> str:
    if waiting_for_gpu(instance):
        return "waiting for the GPU to be free (Vast.ai: scheduling)"
    return instance.actual_status or "provisioning"


class BootWait:
    def __init__(self, ctx: ServerContext, states: ServerStates) -> None:
        self._ctx = ctx
        self._states = states

    async def wait_running(
        self,
        server_id: int,
        *,
        progress: Progress = no_progress,
        first_boot: bool | None = None,
    ) -> ServerView:
        """Poll the instance until it runs, then record where to reach it.

        ``first_boot`` defaults to "the server never ran" (its row was never launched).
        """
        ctx = self._ctx
        async with ctx.sessions() as session:
            row = await session.get(Server, server_id)
            assert row is not None and row.provider_id
            instance_id = int(row.provider_id)
            if first_boot is None:
                first_boot = not row.is_launched
        loop = asyncio.get_running_loop()
        timeout = ctx.boot_timeout if first_boot else ctx.start_timeout
        deadline = loop.time() + timeout
        loading_since: float | None = None
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
            now = loop.time()
            if instance.is_failed:
                await self._failed(server_id, instance, first_boot)
            if first_boot:
                if instance.actual_status == "loading":
                    loading_since = now if loading_since is None else loading_since
                else:
                    loading_since = None
                error = pull_error(instance)
                if error or (loading_since is not None and now - loading_since > ctx.pull_timeout):
                    await self._image_missing(server_id, instance, error)
            state = describe(instance)
            if state != last_state:
                await progress(f"Instance {instance_id}: {state}…")
                last_state = state
            if now > deadline:
                await self._timed_out(server_id, instance, first_boot, timeout)
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

    async def _failed(self, server_id: int, instance: Instance, first_boot: bool) -> None:
        ctx = self._ctx
        if first_boot:
            await ctx.destroy_instance(instance.id)
            await self._states.set(
                server_id,
                status=ServerStatus.ERROR,
                message=f"The instance failed to start ({instance.status_msg}).",
            )
            raise ValidationFailed(
                f"The instance failed to start ({instance.actual_status}); it was destroyed "
                "so it does not bill."
            )
        # A server that ran before keeps its disk: report, never destroy.
        await self._states.set(
            server_id,
            status=ServerStatus.ERROR,
            message=f"The instance failed to start ({instance.status_msg}); it was kept.",
        )
        raise ValidationFailed(
            f"The instance failed to start ({instance.actual_status}). It was kept with its "
            "disk; try /server start again later, or /server destroy it."
        )

    async def _image_missing(
        self, server_id: int, instance: Instance, error: str | None
    ) -> None:
        ctx = self._ctx
        image = instance.image_uuid or "the image"
        if error:
            reason = f"Vast.ai could not pull {image}: {error[:300]}"
        else:
            reason = (
                f"{image} did not load within {ctx.pull_timeout / 60:.0f} minutes "
                f"(still loading: {(instance.status_msg or 'no status')[:200]}); the image "
                "or its tag probably does not exist"
            )
        await ctx.destroy_instance(instance.id)
        await self._states.set(server_id, status=ServerStatus.ERROR, message=reason)
        raise ValidationFailed(
            f"{reason}. The instance was destroyed so it does not bill; check the image "
            "name and tag (Vast publishes versioned tags) and rent again."
        )

    async def _timed_out(
        self, server_id: int, instance: Instance, first_boot: bool, timeout: float
    ) -> None:
        ctx = self._ctx
        minutes = f"{timeout / 60:.0f} minutes" if timeout >= 60 else f"{timeout:g} s"
        if first_boot:
            await ctx.destroy_instance(instance.id)
            await self._states.set(
                server_id,
                status=ServerStatus.ERROR,
                message="The instance did not start in time.",
            )
            raise ValidationFailed(
                f"The instance did not start within {minutes}; "
                "it was destroyed so it does not bill."
            )
        state = describe(instance)
        # The row stays "starting": the sync marks it running once Vast starts it.
        await self._states.set(
            server_id, status=ServerStatus.STARTING, message=f"Still starting: {state}."
        )
        raise StillStarting(
            f"The instance did not start within {minutes}: {state}. It was kept with its "
            "disk and may still start by itself (this message is updated when it does); "
            "/server stop gives up the start (the disk still bills)."
        )
