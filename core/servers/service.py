"""ServerService: the one face of renting, running and paying for servers.

A small facade over the parts in this package: :class:`Rental` (plan, labelled create,
boot wait), :class:`Lifecycle` (start, stop, destroy), :class:`Billing` (spend, budget),
:class:`ProviderSync` and :class:`Autostop`, which share one :class:`ServerContext`. It also
runs their periodic maintenance (sync every minute, autostop every 30 s) as a background
task.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Awaitable, Callable

from core.audit import Actor, AuditService
from core.comfy.client import ComfyClient
from core.config import Settings
from core.db.engine import SessionFactory
from core.db.models import utcnow
from core.remote import Remote
from core.servers.autostop import Autostop
from core.servers.billing import Billing, SpendReport
from core.servers.boot import BootWait
from core.servers.context import Progress, ServerContext, ServerEvents, no_progress
from core.servers.lifecycle import Lifecycle
from core.servers.own_hosts import AddedHost, AddedURL, add_direct_host, add_ssh_host
from core.servers.pending import MessageRef
from core.servers.recovery import Recovery
from core.servers.registry import ServerRegistry, ServerView
from core.servers.rental import Rental, RentPlan
from core.servers.state import ServerStates
from core.servers.sync import ProviderSync
from core.vast import Offer, OfferQuery, VastClient

log = logging.getLogger(__name__)

__all__ = ["MessageRef", "RentPlan", "ServerEvents", "ServerService"]


class ServerService:
    def __init__(
        self,
        settings: Settings,
        sessions: SessionFactory,
        registry: ServerRegistry,
        audit: AuditService,
        vast: VastClient | None,
        *,
        remote: Remote | None = None,
        comfy_client_for: Callable[[str], ComfyClient] | None = None,
        public_key: Callable[[], str] | None = None,
        clock: Callable[[], dt.datetime] = utcnow,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        poll_interval: float | None = None,
        boot_timeout: float | None = None,
    ) -> None:
        self._ctx = ctx = ServerContext(
            settings, sessions, registry, audit, vast,
            public_key=public_key, clock=clock, sleep=sleep,
            poll_interval=settings.vast.poll_interval if poll_interval is None else poll_interval,
            boot_timeout=settings.vast.boot_timeout if boot_timeout is None else boot_timeout,
        )
        self._remote = remote
        self._comfy_client_for = comfy_client_for
        self.billing = Billing(ctx)
        states = ServerStates(ctx, self.billing)
        boot = BootWait(ctx, states)
        self.rental = Rental(ctx, self.billing, states, boot)
        self.lifecycle = Lifecycle(ctx, self.billing, states, boot)
        self.recovery = Recovery(ctx, states, self.billing, boot)
        self.provider_sync = ProviderSync(ctx, states, self.recovery)
        self.autostop = Autostop(ctx, self.lifecycle)
        self._wait_running = boot.wait_running
        self._tasks = ctx.tasks
        # Set by the wiring: the SSH key rotation's periodic check (core.servers.keys).
        self.key_check: Callable[[], Awaitable[None]] | None = None
        # Set by the wiring: the pools' autoscaler (core.pools), before the autostop.
        self.pool_check: Callable[[], Awaitable[object]] | None = None
        # The maintenance loop's sleep (a simulation's compressed clock replaces it).
        self.tick_sleep: Callable[[float], Awaitable[None]] = asyncio.sleep

    # The knobs tests and the wiring set on the service reach every part.

    @property
    def clock(self) -> Callable[[], dt.datetime]:
        return self._ctx.clock

    @clock.setter
    def clock(self, clock: Callable[[], dt.datetime]) -> None:
        self._ctx.clock = clock

    @property
    def _sleep(self) -> Callable[[float], Awaitable[None]]:
        return self._ctx.sleep

    @_sleep.setter
    def _sleep(self, sleep: Callable[[float], Awaitable[None]]) -> None:
        self._ctx.sleep = sleep

    @property
    def poll_interval(self) -> float:
        return self._ctx.poll_interval

    @poll_interval.setter
    def poll_interval(self, seconds: float) -> None:
        self._ctx.poll_interval = seconds

    @property
    def boot_timeout(self) -> float:
        return self._ctx.boot_timeout

    @boot_timeout.setter
    def boot_timeout(self, seconds: float) -> None:
        self._ctx.boot_timeout = seconds

    @property
    def events(self) -> ServerEvents:
        return self._ctx.events

    @events.setter
    def events(self, events: ServerEvents) -> None:
        self._ctx.events = events

    @property
    def heartbeat(self) -> Callable[[ServerView], Awaitable[None]] | None:
        """Hook for the SSH layer: touch the heartbeat file on a running instance."""
        return self._ctx.heartbeat

    @heartbeat.setter
    def heartbeat(self, hook: Callable[[ServerView], Awaitable[None]] | None) -> None:
        self._ctx.heartbeat = hook

    @property
    def comfy_ready(
        self,
    ) -> Callable[[ServerView, tuple[str, int] | None, Progress], Awaitable[None]] | None:
        """Hook for the SSH layer: wait until a booted server's ComfyUI answers."""
        return self._ctx.comfy_ready

    @comfy_ready.setter
    def comfy_ready(
        self, hook: Callable[[ServerView, tuple[str, int] | None, Progress], Awaitable[None]] | None
    ) -> None:
        self._ctx.comfy_ready = hook

    @property
    def forget_connections(self) -> Callable[[int], Awaitable[None]] | None:
        """Hook for the ComfyUI layer: close a stopped or restarted server's connection."""
        return self._ctx.forget_connections

    @forget_connections.setter
    def forget_connections(self, hook: Callable[[int], Awaitable[None]] | None) -> None:
        self._ctx.forget_connections = hook

    @property
    def vast(self) -> VastClient:
        return self._ctx.vast

    # ------------------------------------------------------------------ costs

    async def month_spend(self, now: dt.datetime | None = None) -> float:
        return await self.billing.month_spend(now)

    async def server_spend(self, server_id: int, now: dt.datetime | None = None) -> float:
        return await self.billing.server_spend(server_id, now)

    async def spend_report(self, servers: list[ServerView]) -> SpendReport:
        return await self.billing.report(servers)

    async def check_budget(self, price_per_hour: float, what: str) -> float:
        return await self.billing.check_budget(price_per_hour, what)

    # ------------------------------------------------------------------ renting

    async def offers(self, query: OfferQuery) -> list[Offer]:
        return await self.rental.offers(query)

    async def plan(self, query: OfferQuery, *, offer_id: int | None = None) -> RentPlan:
        return await self.rental.plan(query, offer_id=offer_id)

    async def rent(
        self,
        actor: Actor,
        plan: RentPlan,
        name: str,
        *,
        image: str | None = None,
        disk_gb: int | None = None,
        progress: Progress = no_progress,
        message: MessageRef | None = None,
    ) -> ServerView:
        return await self.rental.rent(
            actor, plan, name, image=image, disk_gb=disk_gb, progress=progress, message=message
        )

    async def wait_running(
        self, server_id: int, *, progress: Progress = no_progress
    ) -> ServerView:
        return await self._wait_running(server_id, progress=progress)

    # ------------------------------------------------------------------ life cycle

    async def start(
        self,
        actor: Actor,
        name: str,
        *,
        progress: Progress = no_progress,
        message: MessageRef | None = None,
    ) -> ServerView:
        return await self.lifecycle.start(actor, name, progress=progress, message=message)

    async def stop(
        self,
        actor: Actor,
        name: str,
        *,
        reason: str = "stopped",
        message: MessageRef | None = None,
    ) -> ServerView:
        return await self.lifecycle.stop(actor, name, reason=reason, message=message)

    async def destroy(
        self,
        actor: Actor,
        name: str,
        *,
        reason: str = "destroyed",
        message: MessageRef | None = None,
    ) -> ServerView:
        return await self.lifecycle.destroy(actor, name, reason=reason, message=message)

    async def set_autostop(self, actor: Actor, name: str, minutes: int) -> ServerView:
        return await self.lifecycle.set_autostop(actor, name, minutes)

    async def add_direct(self, actor: Actor, name: str, url: str) -> AddedURL:
        """Register a ComfyUI that already runs at ``url``, once it answers there."""
        if self._comfy_client_for is None:
            raise RuntimeError("ServerService was built without ComfyUI clients")
        return await add_direct_host(
            self._ctx.registry, self._comfy_client_for, actor, name, url
        )

    async def add_ssh(
        self, actor: Actor, name: str, host: str, port: int, user: str, *, comfy_port: int
    ) -> AddedHost:
        """Register an own host over SSH, its host key pinned on first use."""
        if self._remote is None:
            raise RuntimeError("ServerService was built without SSH access")
        return await add_ssh_host(
            self._ctx.registry, self._remote, actor, name, host, port, user,
            comfy_port=comfy_port,
        )

    # ------------------------------------------------------------------ sync & autostop

    async def register_key(self) -> bool:
        return await self.provider_sync.register_key()

    async def sync(self) -> None:
        await self.provider_sync.sync()

    async def busy(self, server_id: int) -> bool:
        return await self.autostop.busy(server_id)

    async def keep_alive(self, actor: Actor, server_id: int) -> ServerView:
        return await self.autostop.keep_alive(actor, server_id)

    async def autostop_tick(self) -> list[str]:
        return await self.autostop.tick()

    def start_maintenance(
        self, *, sync_every: float = 60.0, autostop_every: float = 30.0
    ) -> asyncio.Task[None]:
        """Run :meth:`maintain` in the background (once: a second call returns the task)."""
        return self._tasks.spawn(
            self.maintain(sync_every=sync_every, autostop_every=autostop_every),
            key="maintenance",
            name="server-maintenance",
        )

    async def maintain(self, *, sync_every: float = 60.0, autostop_every: float = 30.0) -> None:
        """Reconcile with the provider at start and every minute; check idle servers often,
        and again the moment the next idle server's timeout passes.

        Periods are seconds of the services' clock, slept through ``tick_sleep``."""
        await self.register_key()
        next_sync: dt.datetime | None = None
        first = True
        while True:
            now = self._ctx.clock()
            try:
                if next_sync is None or now >= next_sync:
                    await self.sync()
                    next_sync = now + dt.timedelta(seconds=sync_every)
                # The pools first: their tick sets each member's idle stop (a member that
                # became surplus drains), which autostop then applies in the same round.
                if self.pool_check is not None:
                    await self.pool_check()
                await self.autostop_tick()
                if self.key_check is not None:
                    await self.key_check()  # SSH key rotation, when ssh.rotate_days is due
            except Exception:
                log.exception("server maintenance failed; retrying on the next tick")
            if first:
                # What start-up found is settled from here (tests wait for this line).
                log.info("server maintenance: first round done")
                first = False
            await self.tick_sleep(self._next_round(autostop_every))

    def _next_round(self, every: float) -> float:
        """Seconds to the next round: ``every``, or sooner when an idle server's timeout
        passes first (a stop 0-30 s late billed that much more GPU; at least 1 s)."""
        due = self.autostop.next_due
        if due is None:
            return every
        return min(every, max((due - self._ctx.clock()).total_seconds() + 0.5, 1.0))

    async def close(self) -> None:
        """Stop the maintenance loop."""
        await self._tasks.close()
