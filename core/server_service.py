"""ServerService: renting Vast.ai instances, their life cycle, and keeping costs in check.

Rows are written before every side effect. Renting is idempotent: each request carries a
unique label, and after an answer that may hide a success (timeout, 5xx, dropped
connection) the instance is looked up by that label before anything is tried again, so
one request never rents twice. The provider is the truth: :meth:`sync` reconciles rows
with Vast.ai every minute and at start-up.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import secrets
import shlex
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import select

from core.audit import OUTCOME_ERROR, OUTCOME_OK, SYSTEM, Actor, AuditService
from core.config import Settings
from core.db.engine import SessionFactory
from core.db.models import (
    ComfyGeneration,
    ModelDownload,
    Provider,
    Server,
    ServerBilling,
    ServerExecution,
    ServerStatus,
    utcnow,
)
from core.errors import BudgetExceeded, ComfyVastError, NotFound, ValidationFailed
from core.overview import ACTIVE_JOB_STATES
from core.servers import ServerRegistry, ServerView, validate_name
from core.vast import (
    CreateRequest,
    Instance,
    InsufficientCredit,
    Offer,
    OfferQuery,
    OfferUnavailable,
    SearchQuotaExceeded,
    VastAuthError,
    VastClient,
    VastConnectionError,
    VastError,
    VastNotFound,
    VastRateLimited,
    VastServerError,
    VastTimeout,
)

log = logging.getLogger(__name__)

Progress = Callable[[str], Awaitable[None]]
MAX_OFFER_TRIES = 3
LABEL_PREFIX = "comfyvast"
HEARTBEAT_FILE = "/root/.comfyvast-heartbeat"


async def _no_progress(_: str) -> None:
    return None


class ServerEvents(Protocol):
    """Implemented by the Discord side: tell a channel about a server."""

    async def idle_warning(
        self, server: ServerView, channel_id: int, minutes_left: int
    ) -> None: ...

    async def notice(self, channel_id: int, text: str) -> None: ...


class _NullEvents:
    async def idle_warning(self, server: ServerView, channel_id: int, minutes_left: int) -> None:
        return None

    async def notice(self, channel_id: int, text: str) -> None:
        return None


@dataclass(frozen=True, slots=True)
class RentPlan:
    """What the confirmation shows: the offer, the alternatives, and the month so far."""

    offer: Offer
    query: OfferQuery
    month_spend: float
    budget: float | None


def watchdog_script(vast_base_url: str, orphan_minutes: int) -> str:
    """A dead man's switch started by the instance's onstart.

    It stops the instance through Vast.ai's API with the instance's own restricted
    ``CONTAINER_API_KEY`` when the bot has not touched the heartbeat file for
    ``orphan_minutes``, so a crashed bot does not leave a GPU billing.
    """
    url = shlex.quote(f"{vast_base_url.rstrip('/')}/instances/")
    limit = int(orphan_minutes) * 60
    hb = HEARTBEAT_FILE
    return (
        f"touch {hb}; (while sleep 60; do "
        f"age=$(( $(date +%s) - $(stat -c %Y {hb} 2>/dev/null || date +%s) )); "
        f'if [ "$age" -gt {limit} ]; then '
        f'curl -fsS -m 30 -X PUT -H "Authorization: Bearer $CONTAINER_API_KEY" '
        f"-H 'Content-Type: application/json' -d '{{\"state\":\"stopped\"}}' "
        f'{url}"$CONTAINER_ID/" && touch {hb}; fi; done) >/dev/null 2>&1 &'
    )


def onstart_script(public_key: str, vast_base_url: str, orphan_minutes: int) -> str:
    # The key is single-quoted: double quotes made sshd reject it (vast.md, PR #9059).
    return (
        "touch ~/.no_auto_tmux; env >> /etc/environment; mkdir -p ~/.ssh; "
        f"echo {shlex.quote(public_key.strip())} >> ~/.ssh/authorized_keys; "
        "chmod 600 ~/.ssh/authorized_keys; " + watchdog_script(vast_base_url, orphan_minutes)
    )


def transient(exc: BaseException) -> bool:
    """Worth repeating: the API was busy, slow or unreachable (not a refusal)."""
    if isinstance(exc, SearchQuotaExceeded):
        return False
    return isinstance(exc, VastServerError | VastTimeout | VastConnectionError | VastRateLimited)


def _month_start(now: dt.datetime) -> dt.datetime:
    return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


class ServerService:
    def __init__(
        self,
        settings: Settings,
        sessions: SessionFactory,
        registry: ServerRegistry,
        audit: AuditService,
        vast: VastClient | None,
        *,
        public_key: Callable[[], str] | None = None,
        clock: Callable[[], dt.datetime] = utcnow,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        poll_interval: float = 5.0,
        boot_timeout: float = 900.0,
    ) -> None:
        self._settings = settings
        self._sessions = sessions
        self._registry = registry
        self._audit = audit
        self._vast = vast
        self._public_key = public_key
        self.clock = clock
        self._sleep = sleep
        self.poll_interval = poll_interval
        self.boot_timeout = boot_timeout
        self.events: ServerEvents = _NullEvents()
        self._locks: dict[str, asyncio.Lock] = {}
        self._warned: dict[int, dt.datetime] = {}
        # Hook for the SSH layer: touch the heartbeat file on a running instance.
        self.heartbeat: Callable[[ServerView], Awaitable[None]] | None = None

    # ------------------------------------------------------------------ helpers

    @property
    def vast(self) -> VastClient:
        if self._vast is None:
            raise ValidationFailed(
                "Vast.ai is not configured: set [vast] api_key (or VAST_AI_API_KEY)."
            )
        return self._vast

    async def _retry(self, what: str, call: Callable[[], Awaitable[Any]], attempts: int = 5) -> Any:
        """Repeat an idempotent call (show, start, stop, destroy) on transient errors.

        The client already retries a few times; this outer loop rides out longer bursts
        with jittered exponential backoff. Never used for create (see _create_once).
        """
        for attempt in range(attempts):
            try:
                return await call()
            except VastError as exc:
                if not transient(exc) or attempt + 1 == attempts:
                    raise
                delay = min(2.0**attempt, 20.0) * (0.5 + secrets.randbelow(1000) / 1000)
                log.warning("%s failed (%s); retrying in %.1f s", what, exc, delay)
                await self._sleep(delay)
        raise AssertionError("unreachable")

    def _lock(self, key: str) -> asyncio.Lock:
        return self._locks.setdefault(key, asyncio.Lock())

    # ------------------------------------------------------------------ costs

    async def month_spend(self, now: dt.datetime | None = None) -> float:
        now = now or self.clock()
        start = _month_start(now)
        async with self._sessions() as session:
            intervals = (
                await session.scalars(
                    select(ServerBilling).where(
                        (ServerBilling.ended_at.is_(None)) | (ServerBilling.ended_at > start)
                    )
                )
            ).all()
        return sum(self._cost(i, start, now) for i in intervals)

    async def server_spend(self, server_id: int, now: dt.datetime | None = None) -> float:
        now = now or self.clock()
        async with self._sessions() as session:
            intervals = (
                await session.scalars(
                    select(ServerBilling).where(ServerBilling.server_id == server_id)
                )
            ).all()
        return sum(self._cost(i, None, now) for i in intervals)

    @staticmethod
    def _cost(interval: ServerBilling, since: dt.datetime | None, now: dt.datetime) -> float:
        start = max(interval.started_at, since) if since else interval.started_at
        end = interval.ended_at or now
        hours = max((end - start).total_seconds(), 0.0) / 3600
        return hours * interval.price_per_hour

    async def check_budget(self, price_per_hour: float, what: str) -> float:
        """Refuse when this month's spend plus one hour at ``price_per_hour`` would pass the
        budget. Returns the month's spend so far."""
        spent = await self.month_spend()
        budget = self._settings.costs.monthly_budget
        if budget is not None and spent + price_per_hour > budget:
            raise BudgetExceeded(
                f"{what} would exceed the monthly budget: ${spent:.2f} spent of "
                f"${budget:.2f} this month, and this server costs ${price_per_hour:.3f}/h."
            )
        return spent

    async def _open_interval(self, session: Any, server: Server, state: str) -> None:
        """Close the server's open billing interval and open one for ``state``."""
        now = self.clock()
        current = (
            await session.scalars(
                select(ServerBilling)
                .where(ServerBilling.server_id == server.id)
                .where(ServerBilling.ended_at.is_(None))
            )
        ).first()
        if current is not None:
            if current.state == state and current.price_per_hour == self._rate(server, state):
                return
            current.ended_at = now
        rate = self._rate(server, state)
        if state != "destroyed":
            session.add(
                ServerBilling(server_id=server.id, state=state, price_per_hour=rate, started_at=now)
            )

    def _rate(self, server: Server, state: str) -> float:
        """$/h in a state: the full price while loading/running; a stopped Vast instance
        still bills its disk, which we estimate at 10% when Vast gives no figure."""
        if state in ("loading", "running"):
            return server.price_per_hour
        if state == "stopped" and server.provider == Provider.VAST.value:
            return round(server.price_per_hour * 0.1, 6)
        return 0.0

    # ------------------------------------------------------------------ offers / rent

    async def offers(self, query: OfferQuery) -> list[Offer]:
        return await self._retry("search", lambda: self.vast.search_offers(query))

    async def plan(self, query: OfferQuery, *, offer_id: int | None = None) -> RentPlan:
        """Pick the offer to confirm: the given id, else the cheapest match."""
        offers = await self.offers(query)
        if offer_id is not None:
            match = [o for o in offers if o.id == offer_id]
            if not match:
                match = [
                    o
                    for o in await self.vast.search_offers(OfferQuery(limit=200))
                    if o.id == offer_id
                ]
            if not match:
                raise NotFound(f"Offer {offer_id} is not available (any more).")
            offer = match[0]
        elif offers:
            offer = min(offers, key=lambda o: o.price_per_hour)
        else:
            raise NotFound("No offer matches these constraints; relax the GPU, price or region.")
        spent = await self.check_budget(offer.price_per_hour, "Renting this server")
        return RentPlan(offer, query, spent, self._settings.costs.monthly_budget)

    async def rent(
        self,
        actor: Actor,
        plan: RentPlan,
        name: str,
        *,
        image: str | None = None,
        disk_gb: int | None = None,
        progress: Progress = _no_progress,
    ) -> ServerView:
        name = validate_name(name)
        await self._registry.ensure_name_free(name)
        vast = self.vast
        await self.check_budget(plan.offer.price_per_hour, "Renting this server")
        label = f"{LABEL_PREFIX}:{name}:{secrets.token_hex(4)}"
        async with self._sessions.begin() as session:
            row = Server(
                provider=Provider.VAST.value,
                name=name,
                request_label=label,
                status=ServerStatus.CREATING.value,
                gpu=plan.offer.gpu_name,
                gpu_count=plan.offer.num_gpus,
                gpu_ram_mb=plan.offer.gpu_ram_mb,
                cpu_cores=plan.offer.cpu_cores,
                price_per_hour=plan.offer.price_per_hour,
                location=plan.offer.location,
                disk=float(disk_gb or self._settings.vast.default_disk_gb),
                comfy_port=self._settings.comfy.default_port,
                ssh_user="root",
                created_by=actor.user_id,
                last_channel_id=actor.channel_id,
            )
            session.add(row)
            await session.flush()
            server_id = row.id
        try:
            instance_id, offer = await self._create_with_fallback(
                plan, label, image, disk_gb, progress
            )
        except ComfyVastError as exc:
            await self._set(server_id, status=ServerStatus.ERROR, message=str(exc))
            await self._audit.record(
                actor,
                "server create",
                outcome=OUTCOME_ERROR,
                resource=name,
                details={"error": str(exc)},
            )
            raise
        async with self._sessions.begin() as session:
            row = await session.get(Server, server_id)
            assert row is not None
            row.provider_id = str(instance_id)
            row.status = ServerStatus.LOADING.value
            row.gpu, row.gpu_count, row.price_per_hour = (
                offer.gpu_name,
                offer.num_gpus,
                offer.price_per_hour,
            )
            row.gpu_ram_mb, row.location = offer.gpu_ram_mb, offer.location
            await self._open_interval(session, row, "loading")
        await self._audit.record(
            actor,
            "server create",
            outcome=OUTCOME_OK,
            resource=name,
            details={
                "offer": offer.id,
                "instance": instance_id,
                "price_per_hour": offer.price_per_hour,
            },
        )
        if self._public_key is not None:
            try:
                await vast.attach_ssh_key(instance_id, self._public_key())
            except VastError as exc:  # onstart also installs the key
                log.warning("attaching the SSH key to %s failed: %s", instance_id, exc)
        await progress(f"Instance {instance_id} rented; waiting for it to start…")
        return await self.wait_running(server_id, progress=progress)

    async def _create_with_fallback(
        self,
        plan: RentPlan,
        label: str,
        image: str | None,
        disk_gb: int | None,
        progress: Progress,
    ) -> tuple[int, Offer]:
        tried: set[int] = set()
        offer: Offer | None = plan.offer
        for attempt in range(MAX_OFFER_TRIES):
            assert offer is not None
            tried.add(offer.id)
            request = self._create_request(label, image, disk_gb)
            try:
                return await self._create_once(offer, request, label), offer
            except OfferUnavailable:
                log.info("offer %s was taken; looking for the next one", offer.id)
                candidates = [o for o in await self.offers(plan.query) if o.id not in tried]
                if not candidates or attempt + 1 >= MAX_OFFER_TRIES:
                    raise ValidationFailed(
                        f"Offer {offer.id} was taken and no other offer matched after "
                        f"{attempt + 1} tries; try again or relax the constraints."
                    ) from None
                previous = offer
                offer = min(candidates, key=lambda o: o.price_per_hour)
                await self.check_budget(offer.price_per_hour, "Renting the next offer")
                await progress(
                    f"Offer {previous.id} was taken; trying offer {offer.id} "
                    f"({offer.gpu_name}, ${offer.price_per_hour:.3f}/h)."
                )
        raise ValidationFailed("No offer could be rented.")

    async def _create_once(self, offer: Offer, request: CreateRequest, label: str) -> int:
        """Create, never twice: after an ambiguous failure, look for our label first."""
        vast = self.vast
        for attempt in range(4):
            try:
                return await vast.create_instance(offer.id, request)
            except (VastAuthError, InsufficientCredit, OfferUnavailable):
                raise
            except VastError as exc:
                if not (exc.may_have_succeeded or transient(exc)):
                    raise
                log.warning(
                    "create on offer %s failed (%s); checking label %s", offer.id, exc.status, label
                )
                found = await self._find_by_label(label)
                if found is not None:
                    log.info("the create had succeeded: instance %s", found.id)
                    return found.id
                if attempt == 3:
                    raise
                await self._sleep(min(2.0**attempt, 10.0) * (0.5 + secrets.randbelow(1000) / 1000))
        raise AssertionError("unreachable")

    async def _find_by_label(self, label: str) -> Instance | None:
        for attempt in range(5):
            try:
                return await self.vast.find_instance_by_label(label)
            except VastError as exc:
                if attempt == 4:
                    raise
                log.warning("label lookup failed (%s); retrying", exc)
                await self._sleep(0.5 * 2**attempt)
        return None

    def _create_request(self, label: str, image: str | None, disk_gb: int | None) -> CreateRequest:
        s = self._settings
        public_key = self._public_key() if self._public_key else None
        onstart = (
            onstart_script(public_key, s.vast.base_url, s.costs.orphan_timeout)
            if public_key
            else watchdog_script(s.vast.base_url, s.costs.orphan_timeout)
        )
        ports = [s.comfy.default_port] if s.comfy.expose_port else []
        return CreateRequest(
            image=image or s.vast.default_image,
            disk_gb=float(disk_gb or s.vast.default_disk_gb),
            onstart=onstart,
            label=label,
            env={"COMFY_PORT": str(s.comfy.default_port)},
            ssh=True,
            expose_ports=tuple(ports),
            runtype="ssh_direc ssh_proxy",
        )

    async def wait_running(
        self, server_id: int, *, progress: Progress = _no_progress
    ) -> ServerView:
        """Poll the instance until it runs, then record where to reach it."""
        async with self._sessions() as session:
            row = await session.get(Server, server_id)
            assert row is not None and row.provider_id
            instance_id = int(row.provider_id)
        deadline = asyncio.get_running_loop().time() + self.boot_timeout
        last_state = None
        while True:
            try:
                instance = await self._retry(
                    "show instance", lambda: self.vast.show_instance(instance_id)
                )
            except VastNotFound:
                await self._set(
                    server_id,
                    status=ServerStatus.DESTROYED,
                    message="The instance vanished while starting.",
                )
                raise ValidationFailed("The instance vanished while it was starting.") from None
            if instance.is_running and instance.ssh_endpoint:
                break
            if instance.is_failed:
                await self._destroy_instance(instance_id)
                await self._set(
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
                await self._destroy_instance(instance_id)
                await self._set(
                    server_id,
                    status=ServerStatus.ERROR,
                    message="The instance did not start in time.",
                )
                raise ValidationFailed(
                    f"The instance did not start within {self.boot_timeout / 60:.0f} minutes; "
                    "it was destroyed so it does not bill."
                )
            await self._sleep(self.poll_interval)
        await self._apply_instance(server_id, instance)
        view = await self._registry.get(server_id)
        await progress(f"Server {view.name} is running.")
        return view

    async def _apply_instance(self, server_id: int, instance: Instance) -> None:
        async with self._sessions.begin() as session:
            row = await session.get(Server, server_id)
            assert row is not None
            endpoint = instance.ssh_endpoint
            if endpoint:
                row.ssh_host, row.ssh_port = endpoint
            comfy = instance.comfy_endpoint
            if comfy and self._settings.comfy.expose_port:
                row.comfy_url = f"http://{comfy[0]}:{comfy[1]}"
            if instance.dph_total:
                row.price_per_hour = instance.dph_total
            was = row.status
            row.status = ServerStatus.RUNNING.value
            row.status_message = None
            row.is_launched = True
            if was != ServerStatus.RUNNING.value or row.running_since is None:
                row.running_since = self.clock()
                row.last_used_at = self.clock()
            await self._open_interval(session, row, "running")

    async def _set(
        self, server_id: int, *, status: ServerStatus, message: str | None = None
    ) -> None:
        async with self._sessions.begin() as session:
            row = await session.get(Server, server_id)
            if row is None:
                return
            row.status = status.value
            row.status_message = message
            if status in (ServerStatus.STOPPED, ServerStatus.DESTROYED, ServerStatus.ERROR):
                row.running_since = None
            # Billing follows the instance: booting bills like loading; while stopping or
            # destroying, the previous interval simply runs on until the final state.
            state = {
                ServerStatus.RUNNING: "running",
                ServerStatus.LOADING: "loading",
                ServerStatus.STARTING: "loading",
                ServerStatus.STOPPED: "stopped",
                ServerStatus.DESTROYED: "destroyed",
                ServerStatus.ERROR: "destroyed",
            }.get(status)
            if state is not None:
                await self._open_interval(session, row, state)

    async def _destroy_instance(self, instance_id: int) -> None:
        try:
            await self._retry("destroy", lambda: self.vast.destroy_instance(instance_id))
        except VastNotFound:
            pass

    # ------------------------------------------------------------------ life cycle

    async def start(
        self, actor: Actor, name: str, *, progress: Progress = _no_progress
    ) -> ServerView:
        server = await self._registry.get(name)
        self._require_vast(server, "start")
        async with self._lock(f"server:{server.id}"):
            if server.status == ServerStatus.RUNNING.value:
                raise ValidationFailed(f"Server '{server.name}' is already running.")
            if server.status == ServerStatus.DESTROYED.value:
                raise ValidationFailed(f"Server '{server.name}' was destroyed.")
            await self.check_budget(server.price_per_hour, "Starting this server")
            await self._set(server.id, status=ServerStatus.STARTING)
            instance_id = int(server.provider_id or 0)
            await self._retry("start", lambda: self.vast.start_instance(instance_id))
            await self._audit.record(
                actor, "server start", outcome=OUTCOME_OK, resource=server.name
            )
            return await self.wait_running(server.id, progress=progress)

    async def stop(self, actor: Actor, name: str, *, reason: str = "stopped") -> ServerView:
        server = await self._registry.get(name)
        self._require_vast(server, "stop")
        async with self._lock(f"server:{server.id}"):
            if server.status == ServerStatus.STOPPED.value:
                raise ValidationFailed(f"Server '{server.name}' is already stopped.")
            await self._set(server.id, status=ServerStatus.STOPPING)
            instance_id = int(server.provider_id or 0)
            await self._retry("stop", lambda: self.vast.stop_instance(instance_id))
            await self._set(server.id, status=ServerStatus.STOPPED, message=reason)
        await self._audit.record(
            actor,
            "server stop",
            outcome=OUTCOME_OK,
            resource=server.name,
            details={"reason": reason},
        )
        return await self._registry.get(server.id)

    async def destroy(self, actor: Actor, name: str, *, reason: str = "destroyed") -> ServerView:
        """Destroy the instance (Vast) or forget the server (ssh, direct); the row stays."""
        server = await self._registry.get(name)
        async with self._lock(f"server:{server.id}"):
            if server.status == ServerStatus.DESTROYED.value:
                raise ValidationFailed(f"Server '{server.name}' is already destroyed.")
            if server.provider == Provider.VAST.value and server.provider_id:
                await self._set(server.id, status=ServerStatus.DESTROYING)
                await self._destroy_instance(int(server.provider_id))
            await self._set(server.id, status=ServerStatus.DESTROYED, message=reason)
            # Free the name for reuse; the row keeps its history under a tombstone name.
            async with self._sessions.begin() as session:
                row = await session.get(Server, server.id)
                assert row is not None
                row.name = f"{row.name[:20]}~{row.id}"
        await self._audit.record(
            actor,
            "server destroy",
            outcome=OUTCOME_OK,
            resource=server.name,
            details={"reason": reason},
        )
        return await self._registry.get(server.id)

    async def set_autostop(self, actor: Actor, name: str, minutes: int) -> ServerView:
        if not 0 <= minutes <= 7 * 24 * 60:
            raise ValidationFailed("Autostop minutes must be between 0 (never) and 10080.")
        server = await self._registry.get(name)
        async with self._sessions.begin() as session:
            row = await session.get(Server, server.id)
            assert row is not None
            row.idle_timeout = minutes
        await self._audit.record(
            actor,
            "server autostop",
            outcome=OUTCOME_OK,
            resource=server.name,
            details={"minutes": minutes},
        )
        return await self._registry.get(server.id)

    def _require_vast(self, server: ServerView, what: str) -> None:
        if server.provider != Provider.VAST.value:
            kind = "a ComfyUI URL" if server.provider == Provider.DIRECT.value else "your own host"
            raise ValidationFailed(f"Server '{server.name}' is {kind}; the bot cannot {what} it.")
        if server.status == ServerStatus.DESTROYED.value:
            raise ValidationFailed(f"Server '{server.name}' was destroyed.")

    # ------------------------------------------------------------------ sync & autostop

    async def register_key(self) -> bool:
        """Register the bot's public key with the Vast.ai account (idempotent).

        Best effort: team keys cannot hold account SSH keys, and every instance also gets
        the key attached and installed by its onstart script.
        """
        if self._vast is None or self._public_key is None:
            return False
        try:
            await self._retry("add ssh key", lambda: self.vast.add_ssh_key(self._public_key()))
            return True
        except VastError as exc:
            log.warning("could not register the SSH key with Vast.ai: %s", exc)
            return False

    async def sync(self) -> None:
        """Reconcile Vast rows with the provider (vanished, stopped outside, new price)."""
        if self._vast is None:
            return
        async with self._sessions() as session:
            rows = (
                await session.scalars(
                    select(Server)
                    .where(Server.provider == Provider.VAST.value)
                    .where(
                        Server.status.not_in(
                            [ServerStatus.DESTROYED.value, ServerStatus.CREATING.value]
                        )
                    )
                    .where(Server.provider_id.is_not(None))
                )
            ).all()
            targets = [(r.id, int(r.provider_id or 0), r.status, r.price_per_hour) for r in rows]
        try:
            instances = {i.id: i for i in await self.vast.list_instances()}
        except VastError as exc:
            # An error is not "no instances": change nothing (vast.md pitfall 1).
            log.warning("sync skipped: listing instances failed: %s", exc)
            return
        for server_id, instance_id, status, price in targets:
            instance = instances.get(instance_id)
            if instance is None:
                log.warning("instance %s of server %s vanished", instance_id, server_id)
                await self._set(
                    server_id,
                    status=ServerStatus.DESTROYED,
                    message="The instance no longer exists on Vast.ai.",
                )
                continue
            if instance.is_running and status != ServerStatus.RUNNING.value:
                if status not in (ServerStatus.STOPPING.value,):
                    await self._apply_instance(server_id, instance)
            elif (
                instance.actual_status in ("stopped", "exited")
                and status == ServerStatus.RUNNING.value
            ):
                await self._set(
                    server_id,
                    status=ServerStatus.STOPPED,
                    message="Stopped outside the bot (or outbid).",
                )
            elif (
                instance.is_running
                and instance.dph_total
                and abs(instance.dph_total - price) > 1e-6
            ):
                async with self._sessions.begin() as session:
                    row = await session.get(Server, server_id)
                    assert row is not None
                    row.price_per_hour = instance.dph_total
                    await self._open_interval(session, row, "running")
            if instance.is_running and self.heartbeat is not None:
                try:
                    await self.heartbeat(await self._registry.get(server_id))
                except Exception as exc:  # a missed heartbeat only matters after many
                    log.info("heartbeat to server %s failed: %s", server_id, exc)

    async def _busy(self, server_id: int) -> bool:
        """Setup, downloads and queued or running jobs count as activity, never idle."""
        active = (
            (ComfyGeneration.id, ComfyGeneration.server_id,
             ComfyGeneration.status.in_(ACTIVE_JOB_STATES)),
            (ServerExecution.id, ServerExecution.server_id,
             ServerExecution.status.in_(["pending", "running"])),
            (ModelDownload.id, ModelDownload.server_id,
             ModelDownload.status.in_(["pending", "running"])),
        )
        async with self._sessions() as session:
            for row_id, server_col, is_active in active:
                stmt = select(row_id).where(server_col == server_id).where(is_active).limit(1)
                if (await session.scalars(stmt)).first() is not None:
                    return True
        return False

    async def keep_alive(self, actor: Actor, server_id: int) -> ServerView:
        await self._registry.touch(server_id)
        self._warned.pop(server_id, None)
        server = await self._registry.get(server_id)
        await self._audit.record(
            actor, "server keep-alive", outcome=OUTCOME_OK, resource=server.name
        )
        return server

    async def autostop_tick(self) -> list[str]:
        """Warn, then stop (or destroy) idle rented servers; enforce the lifetime cap.

        Returns the names of the servers acted on.
        """
        costs = self._settings.costs
        now = self.clock()
        acted: list[str] = []
        for server in await self._registry.list():
            if (
                server.provider != Provider.VAST.value
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
            if await self._busy(server.id):
                await self._registry.touch(server.id)
                self._warned.pop(server.id, None)
                continue
            last = server.last_used_at or server.running_since or server.created_at
            idle = now - last
            if idle >= dt.timedelta(minutes=timeout):
                await self._idle_action(server, f"idle for {timeout} minutes")
                acted.append(server.name)
            elif (
                costs.idle_warning
                and idle >= dt.timedelta(minutes=max(timeout - costs.idle_warning, 0))
                and server.id not in self._warned
                and server.last_channel_id
            ):
                self._warned[server.id] = now
                left = max(1, round((dt.timedelta(minutes=timeout) - idle).total_seconds() / 60))
                await self.events.idle_warning(server, server.last_channel_id, left)
        return acted

    async def _idle_action(self, server: ServerView, why: str) -> None:
        action = self._settings.costs.idle_action
        try:
            if action == "destroy":
                await self.destroy(SYSTEM, server.name, reason=why)
            else:
                await self.stop(SYSTEM, server.name, reason=why)
        except ComfyVastError as exc:
            log.warning("autostop of %s failed: %s", server.name, exc)
            return
        self._warned.pop(server.id, None)
        if server.last_channel_id:
            verb = "destroyed" if action == "destroy" else "stopped"
            await self.events.notice(
                server.last_channel_id, f"Server **{server.name}** was {verb}: {why}."
            )

