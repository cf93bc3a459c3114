"""Finishing what a dead process started: no rental is ever lost.

Every create, start, stop and destroy writes its intent first (the row's status, and a
:mod:`core.servers.pending` record naming the Discord message that waits). At start-up and
in every sync, rows still in such a state that no task of this process is working on are
settled against Vast.ai's instance list:

* ``creating``: the request's unique label is looked up. Found, the instance is adopted
  and the rent finishes (boot wait, message updated). Not found once the create's outcome
  is certain (its request cannot land any more), the row is marked failed, saying why.
* ``loading``: a fresh rental whose boot wait died; the wait resumes (first-boot rules).
* ``starting``: running -> recorded; still stopped at Vast (the start never arrived) ->
  asked again; otherwise (scheduling, loading) left to come up. Never destroyed.
* ``stopping`` / ``destroying``: the call is repeated (both are idempotent).

An instance carrying a label the bot handed out for a request that is settled (failed,
destroyed, or matched to another instance) is destroyed: nobody knows it, yet it bills.
"""

from __future__ import annotations

import datetime as dt
import logging

from sqlalchemy import select

from core.audit import OUTCOME_ERROR, OUTCOME_OK, SYSTEM
from core.db.models import Server, ServerStatus
from core.errors import ComfyVastError
from core.providers import kinds
from core.providers.vast import LABEL_PREFIX
from core.servers.billing import Billing
from core.servers.boot import BootWait, StillStarting
from core.servers.context import ServerContext
from core.servers.state import ServerStates
from core.vast import Instance, VastError

log = logging.getLogger(__name__)

IN_FLIGHT = (
    ServerStatus.CREATING.value,
    ServerStatus.LOADING.value,
    ServerStatus.STARTING.value,
    ServerStatus.STOPPING.value,
    ServerStatus.DESTROYING.value,
)


class Recovery:
    def __init__(
        self, ctx: ServerContext, states: ServerStates, billing: Billing, boot: BootWait
    ) -> None:
        self._ctx = ctx
        self._states = states
        self._billing = billing
        self._boot = boot

    def create_grace(self) -> dt.timedelta:
        """After this long a create request that left no instance can no longer land:
        the client gives up after ``request_timeout``; twice that plus a margin covers
        Vast's side of a request that was still being processed."""
        return dt.timedelta(seconds=2 * self._ctx.settings.vast.request_timeout + 5)

    async def reconcile(self, instances: dict[int, Instance]) -> None:
        """Settle in-flight rows and stray labelled instances with ``instances`` (the
        complete list from Vast.ai: never call this with a partial or failed list)."""
        ctx = self._ctx
        async with ctx.sessions() as session:
            rows = (
                await session.scalars(
                    select(Server).where(Server.provider.in_(kinds(synced=True)))
                )
            ).all()
            snapshot = [
                (r.id, r.status, r.provider_id, r.request_label, r.created_at, r.name)
                for r in rows
            ]
        known_ids = {int(p) for _, _, p, _, _, _ in snapshot if p}
        by_label = {i.label: i for i in instances.values() if i.label}
        # Labels of requests that are settled (anything but a create still in flight): an
        # instance carrying one that is not the row's own instance is a stray.
        labels_settled = {
            label
            for _, status, _, label, _, _ in snapshot
            if label and status != ServerStatus.CREATING.value
        }
        for server_id, status, provider_id, label, created_at, name in snapshot:
            if status not in IN_FLIGHT:
                continue
            try:
                if not await self._still(server_id, status, provider_id):
                    continue
                if status == ServerStatus.CREATING.value:
                    found = by_label.get(label or "") if not provider_id else None
                    if provider_id:
                        found = instances.get(int(provider_id))
                    await self._creating(server_id, name, found, created_at)
                    if found is not None:
                        known_ids.add(found.id)
                    continue
                instance = instances.get(int(provider_id)) if provider_id else None
                if status == ServerStatus.LOADING.value:
                    await self._loading(server_id, name, instance)
                elif status == ServerStatus.STARTING.value:
                    await self._starting(server_id, name, instance)
                elif status == ServerStatus.STOPPING.value:
                    await self._stopping(server_id, name, instance)
                elif status == ServerStatus.DESTROYING.value:
                    await self._destroying(server_id, name, instance)
            except VastError as exc:
                log.warning("recovering server %s (%s) failed: %s", name, status, exc)
        for instance in instances.values():
            label = instance.label or ""
            if (
                instance.id not in known_ids
                and label.startswith(f"{LABEL_PREFIX}:")
                and label in labels_settled
            ):
                log.warning(
                    "instance %s carries label %r of a settled rental but is not its "
                    "instance; destroying it so it does not bill unknown",
                    instance.id, label,
                )
                try:
                    await ctx.destroy_instance(instance.id)
                except VastError as exc:  # the next sync tries again
                    log.warning("destroying stray instance %s failed: %s", instance.id, exc)

    async def _still(self, server_id: int, status: str, provider_id: str | None) -> bool:
        """The row is as read and no task of this process works on it (checked late:
        an operation may have finished or begun while the list was being read)."""
        if server_id in self._ctx.busy:
            return False
        async with self._ctx.sessions() as session:
            row = await session.get(Server, server_id)
            return (
                row is not None
                and row.status == status
                and row.provider_id == provider_id
                and server_id not in self._ctx.busy
            )

    # ------------------------------------------------------------------ per state

    async def _creating(
        self, server_id: int, name: str, found: Instance | None, created_at: dt.datetime
    ) -> None:
        ctx = self._ctx
        if found is None:
            if ctx.clock() - created_at < self.create_grace():
                return  # the create may still land; look again next sync
            text = (
                "The bot stopped while renting and Vast.ai has no instance for this request, "
                "so nothing was rented (and nothing bills). Rent again if you still need it."
            )
            await self._states.set(server_id, status=ServerStatus.ERROR, message=text)
            await ctx.audit.record(
                SYSTEM, "server create", outcome=OUTCOME_ERROR, resource=name,
                details={"error": "not found at Vast.ai after a restart"},
            )
            await self._report(server_id, f"❌ {text}")
            return
        log.info("adopting instance %s for server %s after a restart", found.id, name)
        async with ctx.sessions.begin() as session:
            row = await session.get(Server, server_id)
            assert row is not None
            row.provider_id = str(found.id)
            row.status = ServerStatus.LOADING.value
            if found.dph_total:
                row.price_per_hour = found.dph_total
            await self._billing.open_interval(session, row, "loading")
        await ctx.audit.record(
            SYSTEM, "server create", outcome=OUTCOME_OK, resource=name,
            details={"instance": found.id, "adopted_after_restart": True},
        )
        note = f"The bot restarted; found the rental at Vast.ai (instance {found.id})."
        self._resume_boot(server_id, name, note)

    async def _loading(self, server_id: int, name: str, instance: Instance | None) -> None:
        self._resume_boot(server_id, name, "The bot restarted; still waiting for the boot.")

    def _resume_boot(self, server_id: int, name: str, note: str) -> None:
        self._ctx.tasks.spawn(
            self._finish_boot(server_id, name, note),
            key=("boot", server_id),
            name=f"recover-boot-{name}",
        )

    async def _finish_boot(self, server_id: int, name: str, note: str) -> None:
        ctx = self._ctx
        ctx.claim(server_id)
        try:
            view = await self._boot.wait_running(server_id, first_boot=True)
            text = (
                f"• {note}\n✅ **{view.name}** is running ({view.gpu}, "
                f"${view.price_per_hour:.3f}/h). Install ComfyUI with /setup run."
            )
        except ComfyVastError as exc:
            text = f"• {note}\n❌ {exc}"
        finally:
            ctx.release(server_id)
        await self._report(server_id, text)

    async def _starting(self, server_id: int, name: str, instance: Instance | None) -> None:
        ctx = self._ctx
        if instance is None:
            await self._gone(server_id, name)
            return
        if instance.is_running and instance.ssh_endpoint:
            await self._states.apply_instance(server_id, instance)
            await self._report(server_id, f"✅ **{name}** is running.")
            return
        if instance.intended_status == "stopped":
            # The start never reached Vast.ai (or was undone): the intent stands, ask again.
            await ctx.retry("start", lambda: ctx.vast.start_instance(instance.id))
        ctx.tasks.spawn(
            self._finish_start(server_id, name), key=("boot", server_id),
            name=f"recover-start-{name}",
        )

    async def _finish_start(self, server_id: int, name: str) -> None:
        ctx = self._ctx
        ctx.claim(server_id)
        try:
            await self._boot.wait_running(server_id, first_boot=False)
            text = f"✅ **{name}** is running."
        except StillStarting:
            return  # kept; the next sync looks again and reports when it runs
        except ComfyVastError as exc:
            text = f"❌ Starting **{name}** failed: {exc}"
        finally:
            ctx.release(server_id)
        await self._report(server_id, text)

    async def _stopping(self, server_id: int, name: str, instance: Instance | None) -> None:
        ctx = self._ctx
        if instance is None:
            await self._gone(server_id, name)
            return
        await ctx.retry("stop", lambda: ctx.vast.stop_instance(instance.id))
        await self._states.set(
            server_id, status=ServerStatus.STOPPED, message="stopped (finished after a restart)"
        )
        await self._report(server_id, f"Stopped **{name}** (finished after the bot restarted).")

    async def _destroying(self, server_id: int, name: str, instance: Instance | None) -> None:
        if instance is not None:
            await self._ctx.destroy_instance(instance.id)
        await self._states.set(
            server_id, status=ServerStatus.DESTROYED, message="destroyed (finished after a restart)"
        )
        await self._states.tombstone(server_id)
        await self._report(server_id, f"Destroyed **{name}** (finished after the bot restarted).")

    async def _gone(self, server_id: int, name: str) -> None:
        await self._states.set(
            server_id,
            status=ServerStatus.DESTROYED,
            message="The instance no longer exists on Vast.ai.",
        )
        await self._report(server_id, f"❌ The instance of **{name}** no longer exists on Vast.ai.")

    async def _report(self, server_id: int, text: str) -> None:
        pending = await self._ctx.pending.take(server_id)
        if pending is None or pending.message is None:
            return
        try:
            await self._ctx.events.operation_done(pending.message, text)
        except Exception:  # a lost Discord edit must not stop the sync
            log.exception("could not report the end of %s on server %s", pending.op, server_id)

