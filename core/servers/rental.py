"""Renting a Vast.ai instance: the plan to confirm, then an idempotent, labelled create.

Each request carries a unique label, and after an answer that may hide a success (timeout,
5xx, dropped connection) the instance is looked up by that label before anything is tried
again, so one request never rents twice. A taken offer falls back to the next cheapest.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass

from core.audit import OUTCOME_ERROR, OUTCOME_OK, Actor
from core.db.models import Provider, Server, ServerStatus
from core.errors import ComfyVastError, NotFound, ValidationFailed
from core.providers.vast import LABEL_PREFIX, Launch, launch_plan, transient
from core.servers.billing import Billing
from core.servers.boot import BootWait
from core.servers.context import CREATE_BACKOFF, Progress, ServerContext, no_progress, spread
from core.servers.pending import MessageRef
from core.servers.registry import ServerView
from core.servers.state import ServerStates
from core.servers.validation import validate_name
from core.vast import (
    CreateRequest,
    Instance,
    InsufficientCredit,
    Offer,
    OfferQuery,
    OfferUnavailable,
    VastAuthError,
    VastError,
)

log = logging.getLogger(__name__)

MAX_OFFER_TRIES = 3


@dataclass(frozen=True, slots=True)
class RentPlan:
    """What the confirmation shows: the offer, the alternatives, and the month so far."""

    offer: Offer
    query: OfferQuery
    month_spend: float
    budget: float | None


class Rental:
    def __init__(
        self, ctx: ServerContext, billing: Billing, states: ServerStates, boot: BootWait
    ) -> None:
        self._ctx = ctx
        self._billing = billing
        self._states = states
        self._boot = boot

    async def offers(self, query: OfferQuery) -> list[Offer]:
        return await self._ctx.retry("search", lambda: self._ctx.vast.search_offers(query))

    async def plan(self, query: OfferQuery, *, offer_id: int | None = None) -> RentPlan:
        """Pick the offer to confirm: the given id, else the cheapest match."""
        offers = await self.offers(query)
        if offer_id is not None:
            match = [o for o in offers if o.id == offer_id]
            if not match:
                match = [
                    o
                    for o in await self._ctx.vast.search_offers(OfferQuery(limit=200))
                    if o.id == offer_id
                ]
            if not match:
                raise NotFound(f"Offer {offer_id} is not available (any more).")
            offer = match[0]
        elif offers:
            offer = min(offers, key=lambda o: o.price_per_hour)
        else:
            raise NotFound("No offer matches these constraints; relax the GPU, price or region.")
        spent = await self._billing.check_budget(offer.price_per_hour, "Renting this server")
        return RentPlan(offer, query, spent, self._ctx.settings.costs.monthly_budget)

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
        """Rent and boot; ``message`` is where a restart reports the outcome if this
        process dies before it could (the row and the record are written first)."""
        ctx = self._ctx
        name = validate_name(name)
        await ctx.registry.ensure_name_free(name)
        _ = ctx.vast  # refuses before any row is written when Vast.ai is not configured
        await self._billing.check_budget(plan.offer.price_per_hour, "Renting this server")
        label = f"{LABEL_PREFIX}:{name}:{secrets.token_hex(4)}"
        launch = self._launch(image)
        async with ctx.sessions.begin() as session:
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
                disk=float(disk_gb or ctx.settings.vast.default_disk_gb),
                # The image decides ComfyUI's port, path and setup profile (vastai/comfy:
                # 18188 and fast; other images: the default port and profile).
                comfy_port=launch.comfy_port,
                comfy_path=launch.comfy_path,
                setup_profile=launch.profile,
                ssh_user="root",
                created_by=actor.user_id,
                last_channel_id=actor.channel_id,
            )
            session.add(row)
            await session.flush()
            server_id = row.id
            await ctx.pending.add(session, server_id, "create", message)
        ctx.claim(server_id)
        try:
            return await self._rent(actor, plan, name, server_id, label, image, disk_gb, progress)
        finally:
            ctx.release(server_id)
            await ctx.pending.take(server_id)

    async def _rent(
        self,
        actor: Actor,
        plan: RentPlan,
        name: str,
        server_id: int,
        label: str,
        image: str | None,
        disk_gb: int | None,
        progress: Progress,
    ) -> ServerView:
        ctx = self._ctx
        vast = ctx.vast
        try:
            instance_id, offer = await self._create_with_fallback(
                plan, label, image, disk_gb, progress
            )
        except ComfyVastError as exc:
            await self._states.set(server_id, status=ServerStatus.ERROR, message=str(exc))
            await ctx.audit.record(
                actor,
                "server create",
                outcome=OUTCOME_ERROR,
                resource=name,
                details={"error": str(exc)},
            )
            raise
        async with ctx.sessions.begin() as session:
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
            await self._billing.open_interval(session, row, "loading")
        await ctx.audit.record(
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
        if ctx.public_key is not None:
            try:
                await vast.attach_ssh_key(instance_id, ctx.public_key())
            except VastError as exc:  # onstart also installs the key
                log.warning("attaching the SSH key to %s failed: %s", instance_id, exc)
        await progress(f"Instance {instance_id} rented; waiting for it to start…")
        return await self._boot.wait_running(server_id, progress=progress, first_boot=True)

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
                await self._billing.check_budget(offer.price_per_hour, "Renting the next offer")
                await progress(
                    f"Offer {previous.id} was taken; trying offer {offer.id} "
                    f"({offer.gpu_name}, ${offer.price_per_hour:.3f}/h)."
                )
        raise ValidationFailed("No offer could be rented.")

    async def _create_once(self, offer: Offer, request: CreateRequest, label: str) -> int:
        """Create, never twice: after an ambiguous failure, look for our label first."""
        vast = self._ctx.vast
        for attempt in range(1, 5):
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
                if attempt == 4:
                    raise
                await self._ctx.sleep(spread(CREATE_BACKOFF, attempt))
        raise AssertionError("unreachable")

    async def _find_by_label(self, label: str) -> Instance | None:
        for attempt in range(5):
            try:
                return await self._ctx.vast.find_instance_by_label(label)
            except VastError as exc:
                if attempt == 4:
                    raise
                log.warning("label lookup failed (%s); retrying", exc)
                # Plain doubling without jitter: one lookup per create, nothing to spread.
                await self._ctx.sleep(0.5 * 2**attempt)
        return None

    def _launch(self, image: str | None) -> Launch:
        public_key = self._ctx.public_key() if self._ctx.public_key else None
        return launch_plan(image or self._ctx.settings.vast.default_image, self._ctx.settings,
                           public_key)

    def _create_request(self, label: str, image: str | None, disk_gb: int | None) -> CreateRequest:
        launch = self._launch(image)
        return CreateRequest(
            image=launch.image,
            disk_gb=float(disk_gb or self._ctx.settings.vast.default_disk_gb),
            onstart=launch.onstart,
            label=label,
            env=launch.env,
            ssh=True,
            expose_ports=launch.expose_ports,
            runtype="ssh_direc ssh_proxy",
        )
