"""Scale pools up with demand: start stopped members, then rent from the template.

Each tick, for each pool: the expected wait is the pool's queued work (its active jobs)
divided by its measured throughput (ready servers / mean job time of its latest finished
jobs). When that passes the pool's target, or the pool is below its ``min``, it starts
stopped members (cheapest first), as many as the work still queued once a new server
would be up needs (the cold start is measured: the recent starts' and rents' own times),
then rents through the labelled rent path
(:mod:`core.servers.rental`, which never rents twice and whose rows a restart recovers).

Every decision is written (``pool_decisions``, state ``planned``) before it is acted on,
then audited and announced in the pool's channel. A restarted bot settles decisions a
dead process left planned: a rent whose server row exists is the rental path's to finish
(recovery adopts it by label) and joins the pool; a rent without a row never reached
Vast.ai (the row is written before the create) and is abandoned.

Demand is the members' active jobs plus the jobs waiting for the pool's next free server
(core.generation.waiting: a job no server had room for waits in the database instead of
being refused); a new waiting job pokes a tick at once, and each tick (and each member
that joins) places the waiting jobs that now fit.

Scale-down is the idle autostop, per member: placement packs jobs on the busiest server
with room, so the members demand does not need get no work. Each tick sets the idle
timeout of each running member: the pool's ``min`` cheapest never stop; as many others as
the last window's work kept busy (the most recently used first) keep the pool's
idle timeout (the hysteresis: a server that the recent rate of jobs will need again soon
is not stopped between two sessions); the surplus drains (core.pools.drain).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass

from core.audit import OUTCOME_ERROR, OUTCOME_OK, OUTCOME_REFUSED, SYSTEM, AuditService
from core.db.models import ServerStatus
from core.errors import BudgetExceeded, ComfyVastError, NotFound
from core.pools.drain import DEFAULT_JOB_SECONDS, set_idle_stops
from core.pools.models import ABANDONED, DONE, FAILED, REFUSED
from core.pools.service import PoolService
from core.pools.types import DecisionView, PoolStatus, PoolView
from core.servers.registry import ServerRegistry, ServerView
from core.servers.service import RentPlan, ServerService
from core.tasks import TaskRegistry
from core.vast import OfferQuery

log = logging.getLogger(__name__)

# How long a refused job counts as demand at most.
UNPLACED_MEMORY = dt.timedelta(hours=1)
# How many recent starts (and rents) the cold-start estimate averages.
COLD_START_SAMPLES = 5
# A rental's time until it runs before one was measured: Vast.ai's "boot time is typically
# 1-5 minutes depending on the Docker image size" (reference/vast.md, section 3).
RENT_SECONDS = 180.0
COMING = (ServerStatus.CREATING.value, ServerStatus.LOADING.value,
          ServerStatus.STARTING.value)

# Runs the pool's setup profile and model downloads on a new member (set by the wiring).
OnReady = Callable[[PoolView, ServerView], Awaitable[None]]
# Moves jobs waiting on the other servers to the new one; the ids moved (the wiring sets
# core.generation.rebalance.Rebalancer.to).
Rebalance = Callable[[ServerView, list[ServerView]], Awaitable[list[int]]]


@dataclass(frozen=True, slots=True)
class Load:
    ready: int
    coming: int
    queued: int
    job_seconds: float
    planned: frozenset[str] = frozenset()
    # Seconds until each server started or rented by a decision still in flight runs
    # (the action's measured cold start less the time since the decision).
    coming_in: tuple[float, ...] = ()

    @property
    def wait(self) -> float:
        """Seconds the last queued job would wait: queued work / throughput."""
        if self.queued == 0:
            return 0.0
        if self.ready == 0:
            return math.inf
        return self.queued * self.job_seconds / self.ready


class Autoscaler:
    def __init__(self, pools: PoolService, ops: ServerService, registry: ServerRegistry,
                 audit: AuditService) -> None:
        self._pools = pools
        self._store = pools.store
        self._ops = ops
        self._registry = registry
        self._audit = audit
        self._tasks = TaskRegistry("pools")
        self.on_ready: OnReady | None = None
        self.rebalance: Rebalance | None = None
        # One tick at a time: the maintenance loop and a command may both ask.
        self._lock = asyncio.Lock()
        # When jobs found no server with room (placement refused them): demand that no
        # member's queue shows, counted for each pool within its target wait. Keyed by the
        # job: a member who sends a refused job again (every 30 s, say) is still one job.
        self._unplaced: dict[Hashable, dt.datetime] = {}
        # Seconds the latest starts and rents of this process took until the server ran
        # (a cold start): a server that would come up after the queue is worked off anyway
        # only costs. None measured yet: taken as instant, as before any was measured.
        self.ready_seconds: dict[str, list[float]] = {"start": [], "rent": []}
        # Jobs waiting for a pool's next free server, by pool name, and a call that places
        # those that fit now (core.generation.waiting; set by the wiring).
        self.waiting: Callable[[str], int] | None = None
        self.place_waiting: Callable[[], None] | None = None
        self._poked_again = False

    def poke(self) -> None:
        """A job began to wait for a pool: decide now, not at the next maintenance tick
        (up to 30 s later, all of it added to the member's wait)."""
        self._poked_again = True
        if "poke" not in self._tasks:
            self._tasks.spawn(self._poked(), key="poke", name="pools-poke")

    async def _poked(self) -> None:
        while self._poked_again:  # pokes during a tick: one more tick after it
            self._poked_again = False
            try:
                await self.tick()
            except Exception:
                log.exception("a poked pool tick failed")

    def note_unplaced(self, job: Hashable | None = None) -> None:
        now = self._ops.clock()
        self._unplaced = {k: t for k, t in self._unplaced.items() if now - t < UNPLACED_MEMORY}
        self._unplaced[object() if job is None else job] = now

    # ------------------------------------------------------------------ measuring

    async def load(self, pool: PoolView, members: list[ServerView]) -> Load:
        busy = await self._registry.active_jobs()
        # Decisions in flight count as coming capacity: a start whose server still says
        # stopped, a rent whose server row does not exist yet (or a restart's leftovers).
        in_flight = await self._store.planned()
        planned = frozenset(
            d.server_name or "" for pool_id, d in in_flight if pool_id == pool.id
        )
        names = {s.name for s in members}
        coming = sum(
            1 for s in members
            if not s.is_ready and (s.status in COMING or s.name in planned)
        ) + sum(1 for name in planned if name not in names)
        now = self._ops.clock()
        job_seconds = await self._store.job_seconds([s.id for s in members], now)
        recent = dt.timedelta(seconds=pool.target_wait)
        refused = sum(1 for t in self._unplaced.values() if now - t < recent)
        waiting = self.waiting(pool.name) if self.waiting is not None else 0
        coming_in = tuple(
            max(0.0, self.cold_start(d.action) - (now - d.created_at).total_seconds())
            for pool_id, d in in_flight if pool_id == pool.id
        )
        return Load(
            ready=sum(1 for s in members if s.is_ready), coming=coming,
            queued=sum(busy.get(s.id, 0) for s in members) + refused + waiting,
            job_seconds=job_seconds or DEFAULT_JOB_SECONDS, planned=planned,
            coming_in=coming_in,
        )

    async def status(self, name: str) -> PoolStatus:
        pool = await self._store.get(name)
        members = await self._pools.members(pool)
        load = await self.load(pool, members)
        return PoolStatus(pool, tuple(members), load.queued, load.job_seconds, load.wait,
                          tuple(await self._store.decisions(pool.id, 5)))

    # ------------------------------------------------------------------ the tick

    async def tick(self) -> list[DecisionView]:
        """Settle what a dead process left planned, then scale each pool once."""
        async with self._lock:
            await self.settle()
            made: list[DecisionView] = []
            for pool in await self._store.pools():
                try:
                    made += await self._scale(pool)
                except Exception:
                    log.exception("scaling pool %s failed; retrying next tick", pool.name)
        if self.place_waiting is not None:
            self.place_waiting()  # a server that came up since may take waiting jobs
        return made

    async def settle(self) -> None:
        for pool_id, decision in await self._store.planned():
            if ("decision", decision.id) in self._tasks:
                continue  # this process is carrying it out
            try:
                server = await self._registry.get(decision.server_name or "")
            except NotFound:
                server = None
            if server is None:
                # Never began: a rent writes its row before asking Vast.ai anything.
                await self._store.settle(decision.id, ABANDONED, "the bot restarted first")
                continue
            pool = next((p for p in await self._store.pools() if p.id == pool_id), None)
            if pool is not None:
                await self._store.add_member(pool.id, server.id, pool.idle_timeout)
            # The server's own recovery (creating/starting rows) finishes the operation.
            await self._store.settle(decision.id, DONE, f"recovered: {server.status}")

    def cold_start(self, action: str) -> float:
        """Seconds a ``start`` or ``rent`` takes until the server runs (recent mean;
        before any was measured, a start is taken as instant and a rent as RENT_SECONDS)."""
        seen = self.ready_seconds[action]
        if not seen:
            return RENT_SECONDS if action == "rent" else 0.0
        return sum(seen) / len(seen)

    def _timed(self, action: str, began: dt.datetime) -> None:
        seen = self.ready_seconds[action]
        seen.append((self._ops.clock() - began).total_seconds())
        del seen[:-COLD_START_SAMPLES]

    async def _scale(self, pool: PoolView) -> list[DecisionView]:
        members = await self._pools.members(pool)
        await set_idle_stops(self._store, pool, members, self._ops.clock())
        load = await self.load(pool, members)
        have = load.ready + load.coming
        stopped = sorted(
            (s for s in members
             if s.status == ServerStatus.STOPPED.value and s.name not in load.planned),
            key=lambda s: (s.price_per_hour, s.id),
        )
        if load.wait > pool.target_wait:
            wanted = _wanted(pool, load, self.cold_start("start" if stopped else "rent"))
            jobs = "1 job" if load.queued == 1 else f"{load.queued} jobs"
            why = (f"{jobs} would wait ~{_secs(load.wait)} "
                   f"(target {pool.target_wait} s)")
            if wanted == 0 and have < pool.min_servers:
                wanted = pool.min_servers
            elif wanted == 0:
                log.info("pool %s: %s, but a new server would be up after the queue "
                         "is worked off", pool.name, why)
                return []
        elif have < pool.min_servers:
            wanted, why = pool.min_servers, f"below the pool's minimum of {pool.min_servers}"
        else:
            return []
        wanted = min(max(wanted, pool.min_servers), pool.max_servers)
        need = wanted - have
        if need <= 0:
            return []
        now = self._ops.clock()
        recent = await self._store.decisions(pool.id, 1)
        if recent and now - recent[0].created_at < dt.timedelta(seconds=pool.cooldown):
            log.info("pool %s: %s, but in cool-down", pool.name, why)
            return []
        made: list[DecisionView] = []
        committed = 0.0  # $/h of this round's earlier actions, for the budget check
        for server in stopped[:need]:
            decision = await self._decide(pool, "start", server.name, server.price_per_hour,
                                          committed, why)
            if decision.state != REFUSED:
                committed += server.price_per_hour
                self._spawn(pool, decision, self._start(pool, decision))
            made.append(decision)
            if decision.state == REFUSED:
                return made
        short = need - len(made)
        for _ in range(_rents(pool, load, len(made), short, self.cold_start("rent"))):
            decision, plan = await self._decide_rent(pool, committed, why)
            made.append(decision)
            if plan is None:
                return made
            committed += plan.offer.price_per_hour
            self._spawn(pool, decision, self._rent(pool, decision, plan))
        return made

    async def _decide(self, pool: PoolView, action: str, server: str | None, price: float,
                      committed: float, why: str) -> DecisionView:
        """Check the budget, write the decision (planned or refused), audit, announce."""
        now = self._ops.clock()
        try:
            await self._ops.check_budget(price + committed, f"Pool {pool.name}: {action}")
        except BudgetExceeded as exc:
            decision = await self._store.plan(pool.id, action, f"{why}; {exc}", server, now,
                                              state=REFUSED)
            await self._record(pool, decision, OUTCOME_REFUSED,
                               f"not scaling up ({action}): over the monthly budget")
            return decision
        decision = await self._store.plan(pool.id, action, why, server, now)
        verb = "starting" if action == "start" else "renting"
        await self._record(pool, decision, OUTCOME_OK,
                           f"{verb} **{decision.server_name}** (${price:.3f}/h): {why}")
        return decision

    async def _decide_rent(self, pool: PoolView, committed: float,
                           why: str) -> tuple[DecisionView, RentPlan | None]:
        query = OfferQuery(gpu_name=pool.gpu, max_price_per_hour=pool.max_price,
                           min_disk_gb=pool.disk_gb)
        plan: RentPlan | None
        try:
            plan = await self._ops.plan(query)
        except BudgetExceeded:
            plan = None
            price = 0.0
        except ComfyVastError as exc:
            decision = await self._store.plan(pool.id, "rent", f"{why}; {exc}", None,
                                              self._ops.clock(), state=REFUSED)
            await self._record(pool, decision, OUTCOME_REFUSED, f"cannot rent: {exc}")
            return decision, None
        else:
            price = plan.offer.price_per_hour
        if plan is None:
            # The cheapest offer alone passes the budget: refused with the budget's words.
            cheapest = await self._ops.offers(query)
            price = min((o.price_per_hour for o in cheapest), default=0.0)
        decision = await self._decide(pool, "rent", None, price, committed, why)
        return decision, (plan if decision.state != REFUSED else None)

    async def _record(self, pool: PoolView, decision: DecisionView, outcome: str,
                      line: str) -> None:
        await self._audit.record(
            SYSTEM, f"pool scale-up {decision.action}", outcome=outcome, resource=pool.name,
            details={"decision": decision.id, "server": decision.server_name,
                     "reason": decision.reason},
        )
        if pool.channel_id:
            await self._ops.events.notice(pool.channel_id, f"Pool **{pool.name}**: {line}.")

    # ------------------------------------------------------------------ acting

    def _spawn(self, pool: PoolView, decision: DecisionView, work: Awaitable[None]) -> None:
        async def run() -> None:
            try:
                await work
            except ComfyVastError as exc:
                await self._store.settle(decision.id, FAILED, str(exc))
                await self._audit.record(
                    SYSTEM, f"pool scale-up {decision.action}", outcome=OUTCOME_ERROR,
                    resource=pool.name,
                    details={"decision": decision.id, "server": decision.server_name,
                             "error": str(exc)},
                )
                if pool.channel_id:
                    await self._ops.events.notice(
                        pool.channel_id,
                        f"Pool **{pool.name}**: {decision.action} of "
                        f"**{decision.server_name}** failed: {exc}",
                    )

        self._tasks.spawn(run(), key=("decision", decision.id),
                          name=f"pool-{pool.name}-{decision.id}")

    async def _start(self, pool: PoolView, decision: DecisionView) -> None:
        assert decision.server_name is not None
        began = self._ops.clock()
        server = await self._ops.start(SYSTEM, decision.server_name)
        self._timed("start", began)
        await self._joined(pool, decision, server)

    async def _rent(self, pool: PoolView, decision: DecisionView, plan: RentPlan) -> None:
        assert decision.server_name is not None
        began = self._ops.clock()
        server = await self._ops.rent(SYSTEM, plan, decision.server_name, image=pool.image,
                                      disk_gb=pool.disk_gb)
        self._timed("rent", began)
        await self._store.add_member(pool.id, server.id, pool.idle_timeout)
        await self._joined(pool, decision, server)

    async def _joined(self, pool: PoolView, decision: DecisionView, server: ServerView) -> None:
        if self.on_ready is not None and (pool.profile or pool.models):
            await self.on_ready(pool, server)
        await self._store.settle(decision.id, DONE, f"{server.name} is {server.status}")
        if self.place_waiting is not None:
            self.place_waiting()  # jobs waiting for the pool take it first
        if pool.channel_id:
            await self._ops.events.notice(
                pool.channel_id, f"Pool **{pool.name}**: **{server.name}** is ready."
            )
        moved = await self.share_queue(pool, server)
        if moved and pool.channel_id:
            await self._ops.events.notice(
                pool.channel_id,
                f"Pool **{pool.name}**: {len(moved)} queued jobs moved to **{server.name}**.",
            )

    async def share_queue(self, pool: PoolView, server: ServerView) -> list[int]:
        """Jobs waiting on the pool's other ready servers move to ``server``."""
        if self.rebalance is None:
            return []
        others = [s for s in await self._pools.members(pool) if s.is_ready and s.id != server.id]
        try:
            return await self.rebalance(server, others)
        except Exception:  # the jobs stay where they are
            log.exception("moving queued jobs to %s failed", server.name)
            return []

    async def close(self) -> None:
        await self._tasks.close()


def _wanted(pool: PoolView, load: Load, boot: float) -> int:
    """Servers the queue needs, counting the cold start: by the time a new server
    runs, the ready ones have worked off part of the queue, and so have the servers on
    their way that are up before it (from when each is up); only what is left then, if
    it would still wait past the target, asks for more. (Without the servers on their
    way, a session's third job, a cool-down after its first had started a server, started
    a second one that came up when the first had worked off the session.)"""
    early = [boot - r for r in load.coming_in if r <= boot]
    left = load.queued * load.job_seconds - load.ready * boot - sum(early)
    working = load.ready + len(early)
    if working and left / working <= pool.target_wait:
        return 0
    return math.ceil(max(left, 0.0) / pool.target_wait)


def _rents(pool: PoolView, load: Load, started: int, short: int, boot: float) -> int:
    """Rentals of the ``short`` servers the stopped members did not cover: a rental
    is up only after the rent time, by when the members just started work too; only
    what is left of the queue then, past the target, asks for one (a burst that the
    started members work off never rents a server that bills on for its disk)."""
    if short <= 0:
        return 0
    # Below the pool's minimum: rent up to it whatever the queue.
    floor = max(0, pool.min_servers - (load.ready + load.coming + started))
    later = Load(ready=load.ready + load.coming + started, coming=0, queued=load.queued,
                 job_seconds=load.job_seconds)
    left = later.queued * later.job_seconds - later.ready * boot
    if later.ready and left / later.ready <= pool.target_wait:
        return min(short, floor)
    queue = math.ceil(max(left, 0.0) / pool.target_wait) - later.ready
    return min(short, max(floor, queue, 0))


def _secs(seconds: float) -> str:
    return "forever (no server is ready)" if math.isinf(seconds) else f"{seconds:.0f} s"
