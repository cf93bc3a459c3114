"""A simulated team day: what three server policies cost and how long members wait.

    python -m bench.costsim [--seed N] [--scale K] [--quick] [--json PATH]

Runs the bot's real services (core/: the server service with its provider sync, idle
autostop and billing intervals, the pools' autoscaler, placement and the generation
runner; no Discord layer) against the fake Vast.ai (tests/fakevast, with its billing) and
one fake ComfyUI (tests/fakecomfy) per running instance, reached at the instance's public
port. Three policies, each in a process of its own, run at the same time on the same
day's demand (one seed):

- ``always-on``: one server, rented the evening before, running all day (autostop off).
- ``manual``: one server with the product's default idle autostop (30 min). Rented the
  evening before and stopped. When a member's /generate is refused because no server
  runs, an admin starts it with /server start ``--admin-delay`` seconds later (2 min).
- ``autoscaler``: a pool (min 0, max 4, target wait 60 s, idle stop 5 min, cool-down
  60 s) holding the same stopped server; the autoscaler starts it or rents more.

Members: each session is one member sending a few /generate (SDXL-like, 1024², 1 image)
a few seconds apart. A refused one ("No server is running", "Every server is busy") is
sent again by the member 30 s later (``--retry``); its wait counts from the first try.
Queue wait = first try -> ComfyUI starts the job (the row's ``started_at``), so cold
starts are in it.

Time is compressed: one process-wide factor ``--scale`` (default 180: the day takes 8
minutes). The services' clock (``build_services(clock=...)``), the fake Vast's clock and
every duration the bot waits on (maintenance every 30 s / sync every 60 s, boot polling,
retry backoff) run at that factor; so do the fakes' boot times and job times. The
bot's own processing time is multiplied by it too: that is the error of the method, and
the run prints it (bot-measured job time against the fake's, and the event loop's lag).

Spend comes from the fake Vast's billing (``FakeInstance.spent``: GPU while running,
storage from creation in every state), not from a formula here; /budget's figure (the
product's billing intervals) is printed beside it. "Idle" is GPU spend while a server
runs but its ComfyUI executes nothing; "ideal" is the GPU-seconds the fake ComfyUIs spent
executing jobs times the price of the instance they ran on. Under the table the idle
spend is broken down by cause (:func:`idle_causes`: the start's phases, gaps between jobs,
the tail before each stop by the stop's reason, night).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

POLICIES = ("always-on", "manual", "autoscaler")
# GPU seconds per job on each GPU, relative to an RTX 4090: a job is one /generate of an
# SDXL image at 1024² with a hires pass, ~30 s on a 4090 (the 3090 about half as fast).
IMAGE_SECONDS_4090 = 30.0
GPU_SPEED = {"RTX 4090": 1.0, "RTX 3090": 0.55, "RTX A6000": 0.6, "RTX 3060": 0.25}
STEPS = 4  # steps per job at the fake; its KSampler spreads the job time over them
IMAGE = "pytorch/pytorch:2.4.0-cuda12.1-cudnn9-runtime"  # ComfyUI on 8188, no setup run
DISK_GB = 40
# Sessions per hour for the whole team, by hour of the day (a busy morning and a busier
# afternoon, lunch, a quiet night with the odd job from another time zone).
SESSIONS_PER_HOUR = [0.3] * 7 + [6, 10] + [25, 30, 28] + [10] + [35, 40, 38, 30] + \
    [12, 6] + [2, 1, 0.5, 0.3, 0.3]
TEAM = 30
DAY = 24 * 3600.0
SETUP = 900.0  # the evening before: 15 simulated minutes to rent the first server


@dataclass
class Config:
    seed: int = 14
    scale: float = 180.0
    retry: float = 30.0
    admin_delay: float = 120.0
    boot_seconds: float = 150.0  # a fresh rental: pull the image, start the container
    restart_seconds: float = 45.0  # a stopped instance's container starting again
    comfy_start: float = 20.0  # ComfyUI's own start-up once the container runs
    pool_max: int = 4
    target_wait: int = 60
    pool_idle: int = 5
    cooldown: int = 60
    manual_idle: int = 30
    verbose: bool = False
    first_hour: int = 0  # --from-hour/--hours: a window of the day (for trying settings)
    hours: int = 24
    port_base: int = 21000
    max_generations: int = 5  # comfy.max_generations: jobs a server takes before refusing


# --------------------------------------------------------------------------- demand


@dataclass(frozen=True)
class Job:
    at: float  # simulated seconds after midnight
    user: int
    session: int
    n: int  # its place in the session


def demand(cfg: Config) -> list[Job]:
    """The day's /generate calls: Poisson sessions by hour, each a few images."""
    rng = random.Random(cfg.seed)
    jobs: list[Job] = []
    session = 0
    for hour, rate in enumerate(SESSIONS_PER_HOUR):
        t = hour * 3600.0
        while rate > 0:
            t += rng.expovariate(rate / 3600.0)
            if t >= (hour + 1) * 3600.0:
                break
            session += 1
            user = rng.randrange(TEAM)
            count = min(1 + int(rng.expovariate(1 / 2.5)), 10)  # mean ~3 jobs
            at = t
            for n in range(count):
                jobs.append(Job(at, user, session, n))
                at += rng.uniform(3.0, 20.0)  # a new prompt, a re-roll, a variation
    return sorted(jobs, key=lambda j: j.at)


# --------------------------------------------------------------------------- clock


class SimClock:
    """Simulated time running ``scale`` times faster than the machine's."""

    def __init__(self, scale: float, start: dt.datetime) -> None:
        self.scale = scale
        self.start = start
        self._m0 = time.monotonic()
        self._wall0 = time.time()

    def elapsed(self) -> float:
        return (time.monotonic() - self._m0) * self.scale

    def now(self) -> dt.datetime:
        return self.start + dt.timedelta(seconds=self.elapsed())

    def epoch(self) -> float:
        return self.start.timestamp() + self.elapsed()

    def from_wall(self, wall: float) -> float:
        """A time.time() reading as simulated seconds since the start."""
        return (wall - self._wall0) * self.scale

    def real(self, seconds: float) -> float:
        return seconds / self.scale

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(seconds, 0.0) / self.scale)

    async def until(self, at: float) -> None:
        await self.sleep(at - self.elapsed())


# --------------------------------------------------------------------------- the hosts


class ComfyHosts:
    """What runs inside each fake Vast instance: a fake ComfyUI on the instance's public
    8188 port from ``comfy_start`` seconds after the container runs until it stops; its
    KSampler takes the instance's GPU's time per image."""

    def __init__(self, vast: Any, clock: SimClock, cfg: Config) -> None:
        self.vast = vast
        self.clock = clock
        self.cfg = cfg
        self.live: dict[int, Any] = {}  # instance id -> FakeComfy
        self.starting: dict[int, asyncio.Task[None]] = {}
        self.ready: dict[int, asyncio.Event] = {}
        self.every: list[tuple[int, Any]] = []  # (instance id, FakeComfy) ever started
        # Each instance's spells of running at Vast (GPU billed), simulated epoch seconds:
        # running (Vast's running_since), comfy (its ComfyUI answers), ready (the bot's
        # readiness wait returned), end (stopped); for the idle breakdown.
        self.spans: dict[int, list[dict[str, float | None]]] = {}

    def event(self, instance_id: int) -> asyncio.Event:
        return self.ready.setdefault(instance_id, asyncio.Event())

    async def run(self) -> None:
        while True:
            self.vast._tick()  # time passes at the fake (boots finish, billing runs)
            for inst in list(self.vast.instances.values()):
                port = (inst.ports or {}).get("8188/tcp")
                up = inst.actual_status == "running" and port is not None
                spans = self.spans.setdefault(inst.id, [])
                if up and (not spans or spans[-1]["end"] is not None):
                    spans.append({"running": inst.running_since, "comfy": None,
                                  "ready": None, "end": None})
                elif not up and spans and spans[-1]["end"] is None:
                    spans[-1]["end"] = self.vast.now()
                if up and inst.id not in self.live and inst.id not in self.starting:
                    self.starting[inst.id] = asyncio.create_task(self._boot(inst, int(port)))
                elif not up and (inst.id in self.live or inst.id in self.starting):
                    await self._halt(inst.id)
            await asyncio.sleep(0.005)

    async def _boot(self, inst: Any, port: int) -> None:
        from tests.conftest import MODELS
        from tests.fakecomfy import FakeComfy

        await self.clock.sleep(self.cfg.comfy_start)
        seconds = IMAGE_SECONDS_4090 / GPU_SPEED[inst.offer["gpu_name"]]
        comfy = FakeComfy(models=MODELS, sample_seconds=self.clock.real(seconds),
                          previews=False, output_size=(64, 64), port=port)
        await comfy.start()
        self.live[inst.id] = comfy
        self.every.append((inst.id, comfy))
        if self.spans.get(inst.id) and self.spans[inst.id][-1]["comfy"] is None:
            self.spans[inst.id][-1]["comfy"] = self.clock.epoch()
        self.starting.pop(inst.id, None)
        self.event(inst.id).set()

    async def _halt(self, instance_id: int) -> None:
        task = self.starting.pop(instance_id, None)
        if task is not None:
            task.cancel()
        self.event(instance_id).clear()
        comfy = self.live.pop(instance_id, None)
        if comfy is not None:
            await comfy.stop()  # a stopped container's processes are gone

    async def comfy_ready(self, server: Any, _endpoint: Any, _progress: Any) -> None:
        """The product's hook (core.remote.Remote.wait_comfy asks over SSH): wait until the
        instance's ComfyUI answers."""
        await asyncio.wait_for(self.event(int(server.provider_id)).wait(),
                               self.clock.real(600))
        spans = self.spans.get(int(server.provider_id))
        if spans and spans[-1]["ready"] is None:
            spans[-1]["ready"] = self.clock.epoch()

    def executions(self) -> dict[int, list[tuple[float, float]]]:
        """Per instance, the (start, end) of each prompt its ComfyUIs executed (simulated
        epoch seconds), in order."""
        found: dict[int, list[tuple[float, float]]] = {}
        base = self.clock.start.timestamp()
        for instance_id, comfy in self.every:
            for entry in comfy.history.values():
                stamps = {event: data["timestamp"] for event, data in
                          entry.get("status", {}).get("messages", [])}
                if "execution_start" in stamps and "execution_success" in stamps:
                    found.setdefault(instance_id, []).append(
                        (base + self.clock.from_wall(stamps["execution_start"] / 1000),
                         base + self.clock.from_wall(stamps["execution_success"] / 1000)))
        return {k: sorted(v) for k, v in found.items()}

    def started(self) -> dict[str, float]:
        """Prompt id -> time.time() when a fake ComfyUI began executing it."""
        found: dict[str, float] = {}
        for _, comfy in self.every:
            for prompt_id, entry in comfy.history.items():
                for event, data in entry.get("status", {}).get("messages", []):
                    if event == "execution_start":
                        found[prompt_id] = data["timestamp"] / 1000
        return found

    def busy_seconds(self) -> dict[int, float]:
        """Simulated seconds each instance's ComfyUI spent executing prompts."""
        busy: dict[int, float] = {}
        for instance_id, comfy in self.every:
            for entry in comfy.history.values():
                stamps = {event: data["timestamp"] for event, data in
                          entry.get("status", {}).get("messages", [])}
                if "execution_start" in stamps and "execution_success" in stamps:
                    span = (stamps["execution_success"] - stamps["execution_start"]) / 1000
                    busy[instance_id] = busy.get(instance_id, 0.0) + span * self.clock.scale
        return busy

    async def close(self) -> None:
        for instance_id in list(self.live) + list(self.starting):
            await self._halt(instance_id)


NIGHT = ((0.0, 8 * 3600.0), (19 * 3600.0, 24 * 3600.0))  # quiet hours, for the breakdown


def idle_causes(spans: dict[int, list[dict[str, float | None]]],
                runs: dict[int, list[tuple[float, float]]], stops: dict[int, list[str]],
                price: dict[int, float], window: tuple[float, float],
                midnight: float) -> dict[str, float]:
    """GPU dollars billed while nothing executed, by cause: each running spell at Vast
    split into its start (Vast running -> ComfyUI answers -> the bot's readiness wait
    returns -> the first job executes), the gaps between jobs, and the tail after the last
    job until the stop (labelled by the stop's reason: the drain's 2 minutes, the pool's
    idle timeout or the hold). Idle time in the quiet hours is counted as night."""
    lo, hi = window
    causes: dict[str, float] = {}

    def add(cause: str, a: float | None, b: float | None, rate: float) -> None:
        if a is None or b is None:
            return
        a, b = max(a, lo), min(b, hi)
        if b <= a:
            return
        night = sum(max(0.0, min(b, midnight + n1) - max(a, midnight + n0))
                    for n0, n1 in NIGHT)
        for label, seconds in (("night (19:00-08:00), any cause", night),
                               (cause, b - a - night)):
            if seconds > 0:
                causes[label] = causes.get(label, 0.0) + seconds * rate / 3600

    for iid, spells in spans.items():
        rate = price.get(iid, 0.0)
        reasons = iter(stops.get(iid, []))
        for spell in spells:
            a, end = spell["running"], spell["end"]
            reason = next(reasons, "stopped") if end is not None else None
            b = end if end is not None else hi
            inside = [(x, y) for x, y in runs.get(iid, []) if a is not None and a <= x <= b]
            if not inside:
                add("started, no job ran before its stop", a, b, rate)
                continue
            comfy = spell["comfy"] or inside[0][0]
            ready = min(spell["ready"] or comfy, inside[0][0])
            add("start: Vast running -> ComfyUI answers", a, comfy, rate)
            add("start: ComfyUI answers -> bot sees it ready", comfy, max(comfy, ready), rate)
            add("start: bot ready -> first job executes", max(comfy, ready), inside[0][0], rate)
            for (_, y0), (x1, _) in zip(inside, inside[1:], strict=False):
                gap = "between jobs, gap <= 150 s" if x1 - y0 <= 150 else \
                    "between jobs, gap > 150 s (kept warm)"
                add(gap, y0, x1, rate)
            tail = f"after the last job until the stop ({reason})" if reason else \
                "after the last job, still running at the window's end"
            add(tail, inside[-1][1], b, rate)
    return causes


def offers(policy_index: int, port_base: int = 21000) -> list[dict[str, Any]]:
    from tests.fakevast.server import make_offer

    # Loopback only; each policy's fake hands out its own range of host ports (below the
    # kernel's ephemeral range) so the three runs' ComfyUIs never collide.
    base = port_base + 1000 * policy_index
    prices = [("RTX 4090", 0.38), ("RTX 4090", 0.40), ("RTX 4090", 0.42), ("RTX 4090", 0.45),
              ("RTX 4090", 0.50), ("RTX 4090", 0.55), ("RTX 3090", 0.22)]
    return [
        make_offer(500 + i, gpu, dph_base=price, public_ipaddr="127.0.0.1",
                   direct_port_start=base + 20 * i, direct_port_end=base + 20 * i + 19)
        for i, (gpu, price) in enumerate(prices)
    ]


# --------------------------------------------------------------------------- one policy


@dataclass
class Result:
    policy: str
    spend: float = 0.0  # fake Vast billing over the day
    spend_gpu: float = 0.0
    spend_storage: float = 0.0
    idle: float = 0.0  # GPU spend while running with nothing executing
    ideal: float = 0.0
    budget_view: float = 0.0  # /budget (the product's billing intervals) over the day
    jobs: int = 0
    done: int = 0
    failed: int = 0
    refusals: int = 0
    waits: list[float] = field(default_factory=list)
    refused_waits: list[float] = field(default_factory=list)  # jobs refused at first
    waits_at: list[tuple[float, float]] = field(default_factory=list)  # (first try, wait)
    gpu_seconds: float = 0.0
    nominal_seconds: float = 0.0
    bot_job_seconds: float = 0.0
    bot_timed: int = 0  # jobs whose row has both times
    servers_used: int = 0
    starts: int = 0
    decisions: list[str] = field(default_factory=list)
    loop_lag_p95: float = 0.0  # simulated seconds
    failures: dict[str, int] = field(default_factory=dict)
    idle_causes: dict[str, float] = field(default_factory=dict)  # $ by cause
    failed_jobs: list[dict[str, Any]] = field(default_factory=list)  # JSON only
    start_seconds: list[float] = field(default_factory=list)  # Vast running -> bot ready
    # Each running spell (JSON only): instance, running/ready/end (simulated s after
    # midnight), the prompts it executed, the stop's reason.
    spells: list[dict[str, Any]] = field(default_factory=list)
    real_seconds: float = 0.0


class Admin:
    """The manual policy's admin: starts the stopped server ``delay`` s after a refusal."""

    def __init__(self, ops: Any, registry: Any, name: str, clock: SimClock,
                 delay: float) -> None:
        self.ops, self.registry, self.name = ops, registry, name
        self.clock, self.delay = clock, delay
        self.task: asyncio.Task[None] | None = None
        self.starts = 0

    def refused(self) -> None:
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._start())

    async def _start(self) -> None:
        from core.audit import Actor

        view = await self.registry.get(self.name)
        if view.status != "stopped":
            return
        await self.clock.sleep(self.delay)
        self.starts += 1
        await self.ops.start(Actor(user_id=1, is_admin=True), self.name)


async def run_policy(policy: str, cfg: Config, workdir: Path) -> Result:
    from sqlalchemy import select

    from core.audit import SYSTEM, Actor
    from core.config import load_settings
    from core.db.models import ComfyGeneration
    from core.errors import ComfyVastError
    from core.generation.types import GenerationRequest
    from core.pools.service import Template
    from core.services import build_services
    from core.vast import OfferQuery
    from tests.fakevast import FakeVast

    started_real = time.monotonic()
    index = POLICIES.index(policy)
    midnight = dt.datetime(2026, 12, 7, tzinfo=dt.UTC)
    window = cfg.first_hour * 3600.0
    span = cfg.hours * 3600.0
    clock = SimClock(cfg.scale, midnight + dt.timedelta(seconds=window - SETUP))
    vast = FakeVast(offers=offers(index, cfg.port_base), clock=clock.epoch, credit=1000.0,
                    provision_seconds=10.0, boot_seconds=cfg.boot_seconds,
                    restart_seconds=cfg.restart_seconds, timeout_hang=5.0)
    await vast.start()
    hosts = ComfyHosts(vast, clock, cfg)
    host_task = asyncio.create_task(hosts.run())
    idle = 0 if policy == "always-on" else cfg.manual_idle
    settings = load_settings(
        data_dir=workdir / "data",
        database={"url": f"sqlite+aiosqlite:///{workdir}/sim.db"},
        vast={"api_key": vast.api_key, "base_url": vast.base_url, "request_timeout": 10},
        # The waits the bot times itself, on the simulated clock too.
        comfy={"expose_port": True, "max_generations": cfg.max_generations,
               "failover_after": clock.real(20.0),
               "job_timeout": clock.real(1800.0)},
        costs={"idle_timeout": idle, "idle_warning": 0},
        # Per-member limits throttle members, not servers; off so waits are the servers'.
        limits={"user_jobs_per_minute": 1000, "user_concurrent_jobs": 1000},
    )
    svc = await build_services(settings, clock=clock.now)
    ops = svc.server_ops
    ops.heartbeat = None  # no SSH server behind the fake instances
    ops.comfy_ready = hosts.comfy_ready
    ops.poll_interval = clock.real(5.0)
    ops._sleep = clock.sleep  # retry backoff, simulated
    result = Result(policy)
    lags: list[float] = []

    async def probe() -> None:
        while True:
            t = time.monotonic()
            await asyncio.sleep(0.05)
            lags.append((time.monotonic() - t - 0.05) * cfg.scale)

    probe_task = asyncio.create_task(probe())
    admin: Admin | None = None
    monitor_task: asyncio.Task[None] | None = None
    try:
        plan = await ops.plan(OfferQuery(gpu_name="RTX 4090", min_disk_gb=DISK_GB))
        first = await ops.rent(SYSTEM, plan, "team-0", image=IMAGE, disk_gb=DISK_GB)
        if policy == "autoscaler":
            await svc.pools.create(
                SYSTEM, "team", Template(gpu="RTX 4090", max_price=0.6, image=IMAGE,
                                         disk_gb=DISK_GB),
                min_servers=0, max_servers=cfg.pool_max, target_wait=cfg.target_wait,
                idle_timeout=cfg.pool_idle, cooldown=cfg.cooldown)
            await svc.pools.add_server(SYSTEM, "team", first.name)
        if policy != "always-on":
            await ops.stop(SYSTEM, first.name)
        if policy == "manual":
            admin = Admin(ops, svc.servers, first.name, clock, cfg.admin_delay)
        ops.tick_sleep = clock.sleep  # maintenance periods on the simulated clock
        ops.start_maintenance(sync_every=60, autostop_every=30)
        await clock.until(SETUP)
        vast._tick()
        spent0 = sum(i.spent for i in vast.instances.values())
        budget0 = await ops.month_spend()
        day_start = clock.epoch()

        jobs = [j for j in demand(cfg) if window <= j.at < window + span]
        result.jobs = len(jobs)
        tried: dict[int, float] = {}  # job id -> first try (simulated s since midnight)
        keys: dict[int, tuple[int, int]] = {}
        refused: set[tuple[int, int]] = set()  # jobs refused at least once

        async def member(job: Job) -> None:
            await clock.until(SETUP + job.at - window)
            actor = Actor(user_id=1000 + job.user, guild_id=1, channel_id=10)
            req = GenerationRequest(actor=actor, prompt=f"session {job.session} #{job.n}",
                                    steps=STEPS, width=1024, height=1024)
            while True:
                try:
                    view = await svc.generation.submit(req)
                except ComfyVastError as exc:
                    result.refusals += 1
                    refused.add((job.session, job.n))
                    if admin is not None and "No server is running" in str(exc):
                        admin.refused()
                    await clock.sleep(cfg.retry)
                    continue
                tried[view.id] = job.at
                keys[view.id] = (job.session, job.n)
                svc.generation.start(view.id)
                return

        members = [asyncio.create_task(member(j)) for j in jobs]

        async def monitor() -> None:
            while True:
                await clock.sleep(3600)
                states = [s.status for s in await svc.servers.list()]
                async with svc.sessions() as session:
                    found = (await session.scalars(select(ComfyGeneration))).all()
                counts: dict[str, int] = {}
                for r in found:
                    counts[r.status] = counts.get(r.status, 0) + 1
                errors = {r.error_message for r in found if r.error_message}
                print(f"[{policy}] {clock.now():%H:%M} tried {len(tried)}/{len(jobs)} "
                      f"refused {result.refusals} servers {states} "
                      f"lag p95 {sorted(lags)[int(len(lags) * .95)] if lags else 0:.1f} {counts} "
                      f"{list(errors)[:3]}",
                      file=sys.stderr, flush=True)

        monitor_task = asyncio.create_task(monitor()) if cfg.verbose else None
        await clock.until(SETUP + span)
        vast._tick()
        spent1 = {i.id: i.spent for i in vast.instances.values()}
        budget1 = await ops.month_spend()
        day_end = clock.epoch()
        # Late jobs finish (their wait counts; the spend after midnight does not).
        await asyncio.wait_for(asyncio.gather(*members), clock.real(3600))
        deadline = time.monotonic() + clock.real(3600)

        while time.monotonic() < deadline:
            async with svc.sessions() as session:
                rows = (await session.scalars(select(ComfyGeneration))).all()
            if rows and all(r.status in ("completed", "failed", "cancelled") for r in rows):
                break
            await asyncio.sleep(0.2)
        servers = {s.id: s for s in await svc.servers.list(include_destroyed=True)}
        result.spend = sum(spent1.values()) - spent0
        result.budget_view = budget1 - budget0
        length = day_end - day_start
        storage = 0.0
        gpu_rate: dict[int, float] = {}
        for inst in [*vast.instances.values(), *vast.destroyed.values()]:
            lived = min(day_end, inst.last_billed) - max(day_start, inst.created_at)
            storage += inst.storage_per_hour * max(0.0, min(lived, length)) / 3600
            gpu_rate[inst.id] = inst.gpu_per_hour
        result.spend_storage = storage
        result.spend_gpu = result.spend - storage
        # GPU-seconds executed, per instance, as the fake ComfyUIs timed them.
        busy = hosts.busy_seconds()
        result.gpu_seconds = sum(busy.values())
        busy_gpu = sum(busy[i] * gpu_rate[i] / 3600 for i in busy)
        every = {i.id: i for i in [*vast.instances.values(), *vast.destroyed.values()]}
        result.ideal = sum(busy[i] * every[i].dph_total / 3600 for i in busy)
        result.idle = max(0.0, result.spend_gpu - busy_gpu)
        result.servers_used = len(servers)
        began = hosts.started()  # prompt id -> when a ComfyUI began it (wall clock)
        for row in rows:
            server = servers.get(row.server_id or 0)
            wall = began.get(row.comfy_prompt_id or "")
            if row.status != "completed" or wall is None or server is None:
                result.failed += 1
                why = f"{row.status}: {(row.error_message or '')[:80]}"
                result.failures[why] = result.failures.get(why, 0) + 1
                result.failed_jobs.append({
                    "id": row.id, "server": server.provider_id if server else None,
                    "error": row.error_message, "tried": tried.get(row.id),
                    **{k: (getattr(row, k) - midnight).total_seconds()
                       for k in ("created_at", "started_at", "completed_at")
                       if getattr(row, k) is not None}})
                continue
            result.done += 1
            start = clock.from_wall(wall) + window - SETUP  # simulated s after midnight
            result.waits.append(start - tried[row.id])
            result.waits_at.append((tried[row.id], start - tried[row.id]))
            if keys[row.id] in refused:
                result.refused_waits.append(start - tried[row.id])
            inst = every.get(int(server.provider_id or 0))
            gpu = inst.offer["gpu_name"] if inst is not None else "RTX 4090"
            result.nominal_seconds += IMAGE_SECONDS_4090 / GPU_SPEED[gpu]
            if row.completed_at is not None and row.started_at is not None:
                result.bot_job_seconds += (row.completed_at - row.started_at).total_seconds()
                result.bot_timed += 1
        result.starts = sum(1 for r in vast.requests
                            if r.method == "PUT" and (r.body or {}).get("state") == "running")
        from core.db.models import AuditLog
        async with svc.sessions() as session:
            audits = (await session.scalars(select(AuditLog).where(
                AuditLog.action == "server stop").order_by(AuditLog.id))).all()
        by_name = {s.name: int(s.provider_id or 0) for s in servers.values()}
        stops: dict[int, list[str]] = {}
        for a in audits:
            iid = by_name.get(a.resource or "")
            if iid is not None:
                stops.setdefault(iid, []).append(str((a.details or {}).get("reason", "")))
        result.idle_causes = idle_causes(
            hosts.spans, hosts.executions(), stops, gpu_rate, (day_start, day_end),
            midnight.timestamp())
        runs = hosts.executions()
        at = midnight.timestamp()
        for iid, spells in hosts.spans.items():
            reasons = iter(stops.get(iid, []))
            for sp in spells:
                end = sp["end"]
                inside = [(x - at, y - at) for x, y in runs.get(iid, [])
                          if sp["running"] is not None and sp["running"] <= x
                          and (end is None or x <= end)]
                result.spells.append({
                    "instance": iid, **{k: (v - at if v is not None else None)
                                        for k, v in sp.items()},
                    "runs": inside, "reason": next(reasons, "") if end is not None else ""})
        result.start_seconds = [
            sp["ready"] - sp["running"] for spells in hosts.spans.values() for sp in spells
            if sp["ready"] is not None and sp["running"] is not None
            and day_start <= sp["running"] < day_end]
        for pool in await svc.pools.store.pools():
            result.decisions = [f"{d.action} {d.server_name} {d.state}: {d.reason}"
                                for d in await svc.pools.store.decisions(pool.id, 1000)]
    finally:
        probe_task.cancel()
        if monitor_task is not None:
            monitor_task.cancel()
        await svc.close()
        host_task.cancel()
        await hosts.close()
        await vast.stop()
    lags.sort()
    result.loop_lag_p95 = lags[int(len(lags) * 0.95)] if lags else 0.0
    result.real_seconds = time.monotonic() - started_real
    return result


# --------------------------------------------------------------------------- bounds


def bounds(cfg: Config) -> str:
    """What the demand allows at best, without the bot (``--bound``): FIFO on ``c``
    servers with no overhead at all, (a) all warm through the window, (b) with a
    clairvoyant that stops a server in every gap it can (one at least as long as a start
    from stopped) and has it ready again exactly when the next job comes.

    A start from stopped takes ``restart_seconds + comfy_start`` (65 s) but bills only
    ``comfy_start`` (20 s) of GPU: Vast bills the GPU while the instance runs, not while
    it loads (vast.md, "Billing per state"; the fake Vast bills the same way). A gap
    shorter than a start is billed whole: the server has to stay warm through it."""
    import heapq

    lo, hi = cfg.first_hour * 3600.0, (cfg.first_hour + cfg.hours) * 3600.0
    jobs = [j.at for j in demand(cfg) if lo <= j.at < hi]
    busy = len(jobs) * IMAGE_SECONDS_4090
    latency, billed = cfg.restart_seconds + cfg.comfy_start, cfg.comfy_start
    lines = ["| servers | warm all along: wait p50 / p95 | idle share | clairvoyant stop/start: "
             "idle share | × ideal |", "|---|---|---|---|---|"]
    for c in range(1, 6):
        free, waits = [lo] * c, []
        for t in jobs:
            start = max(t, heapq.heappop(free))
            waits.append(start - t)
            heapq.heappush(free, start + IMAGE_SECONDS_4090)
        # Clairvoyant, packed (the first free server in a fixed order takes the job).
        until, last, idle = [-math.inf] * c, [False] * c, 0.0
        for t in jobs:
            ready = [i for i in range(c) if until[i] <= t]
            i = ready[0] if ready else min(range(c), key=lambda k: until[k])
            start = max(t, until[i])
            gap = start - until[i]
            idle += (gap if gap < latency else billed) if last[i] else billed
            last[i], until[i] = True, start + IMAGE_SECONDS_4090
        warm_idle = 1 - busy / (c * (hi - lo))
        lines.append(f"| {c} | {pct(waits, .5):.0f} s / {pct(waits, .95):.0f} s | "
                     f"{100 * warm_idle:.0f} % | {100 * idle / (idle + busy):.0f} % | "
                     f"{(idle + busy) / busy:.2f}× |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- report


def pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(math.ceil(q * len(ordered))) - 1)]


def table(results: list[Result], cfg: Config) -> str:
    def row(label: str, cell: Any) -> str:
        return f"| {label} | " + " | ".join(cell(r) for r in results) + " |"

    names = " | ".join(r.policy for r in results)
    what = ("one simulated day" if cfg.hours == 24 else
            f"{cfg.first_hour:02d}:00-{(cfg.first_hour + cfg.hours) % 24:02d}:00")
    lines = [f"| {what}, seed {cfg.seed} | {names} |",
             "|---|" + "---|" * len(results)]
    lines += [
        row("total spend (fake Vast billing)", lambda r: f"${r.spend:.2f}"),
        row("of which GPU / storage", lambda r: f"${r.spend_gpu:.2f} / ${r.spend_storage:.2f}"),
        row("idle share of spend (GPU billed, nothing executing)",
            lambda r: f"{100 * r.idle / r.spend:.1f} %" if r.spend else "–"),
        row("queue wait p50 / p95 (cold starts included)",
            lambda r: f"{pct(r.waits, .5):.0f} s / {pct(r.waits, .95):.0f} s"),
        row("queue wait max", lambda r: f"{max(r.waits, default=0):.0f} s"),
        row("ideal (GPU-seconds used × price)",
            lambda r: f"${r.ideal:.2f} ({r.gpu_seconds / 3600:.2f} GPU-h)"),
        row("cost against the ideal", lambda r: f"{r.spend / r.ideal:.2f}×" if r.ideal else "–"),
        row("jobs done / failed (of submitted)",
            lambda r: f"{r.done} / {r.failed} (of {r.jobs})"),
        row("jobs refused at first try / their wait p50",
            lambda r: f"{len(r.refused_waits)} / {pct(r.refused_waits, .5):.0f} s"),
        row("refused tries (member sent it again)", lambda r: str(r.refusals)),
        row("servers used / starts at Vast", lambda r: f"{r.servers_used} / {r.starts}"),
        row("/budget over the day (product's intervals)", lambda r: f"${r.budget_view:.2f}"),
        row("compression error: bot-measured / fake job time",
            lambda r: f"{r.bot_job_seconds / r.bot_timed / (r.gpu_seconds / r.done):.2f}×"
            if r.bot_timed and r.done else "–"),
        row("compression error: fake job time / nominal",
            lambda r: f"{r.gpu_seconds / r.nominal_seconds:.2f}×" if r.nominal_seconds else "–"),
        row("compression error: event-loop lag p95 (simulated)",
            lambda r: f"{r.loop_lag_p95:.1f} s"),
    ]
    return "\n".join(lines)


def breakdown(results: list[Result]) -> str:
    causes = sorted({c for r in results for c in r.idle_causes},
                    key=lambda c: -max(r.idle_causes.get(c, 0.0) for r in results))
    lines = ["| idle cause | " + " | ".join(r.policy for r in results) + " |",
             "|---|" + "---|" * len(results)]
    for cause in causes:
        cells = []
        for r in results:
            cost = r.idle_causes.get(cause, 0.0)
            cells.append(f"${cost:.2f} ({100 * cost / r.spend:.1f} %)" if r.spend else "–")
        lines.append(f"| {cause} | " + " | ".join(cells) + " |")
    lines.append("| sum (the idle row above: GPU spend - busy) | " + " | ".join(
        f"${sum(r.idle_causes.values()):.2f} (${r.idle:.2f})" for r in results) + " |")
    lines.append("| starts: Vast running -> bot ready, p50 / max | " + " | ".join(
        f"{pct(r.start_seconds, .5):.0f} s / {max(r.start_seconds, default=0):.0f} s "
        f"({len(r.start_seconds)})" for r in results) + " |")
    return "\n".join(lines)


def verdict(r: Result) -> list[str]:
    idle = r.idle / r.spend if r.spend else math.inf
    ratio = r.spend / r.ideal if r.ideal else math.inf
    p95 = pct(r.waits, .95)
    checks = [
        (f"idle spend {100 * idle:.1f} % of total", "< 10 %", idle < 0.10),
        (f"p95 wait {p95:.0f} s with cold starts", "< 90 s", p95 < 90),
        (f"total {ratio:.2f}× the ideal", "≤ 1.3×", ratio <= 1.3),
    ]
    return [f"{'PASS' if ok else 'FAIL'}  autoscaler: {what} (target {target})"
            for what, target, ok in checks]


def parse(argv: list[str] | None = None) -> tuple[argparse.Namespace, Config]:
    ap = argparse.ArgumentParser(prog="python -m bench.costsim", description=__doc__.split(
        "\n")[0])
    ap.add_argument("--seed", type=int, default=Config.seed)
    ap.add_argument("--scale", type=float, default=None,
                    help="simulated seconds per real second (default 180; 720 with --quick)")
    ap.add_argument("--quick", action="store_true",
                    help="about 2 minutes: the working day only (09:00-17:00) at 240×")
    ap.add_argument("--pool-idle", type=int, default=Config.pool_idle)
    ap.add_argument("--target-wait", type=int, default=Config.target_wait)
    ap.add_argument("--cooldown", type=int, default=Config.cooldown)
    ap.add_argument("--pool-max", type=int, default=Config.pool_max)
    ap.add_argument("--admin-delay", type=float, default=Config.admin_delay)
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--from-hour", type=int, default=0,
                    help="simulate only a window of the day: its first hour")
    ap.add_argument("--hours", type=int, default=24, help="the window's length in hours")
    ap.add_argument("--max-generations", type=int, default=5,
                    help="comfy.max_generations (jobs queued per server before refusing)")
    ap.add_argument("--port-base", type=int, default=21000,
                    help="host ports for the fake ComfyUIs: 3000 from here")
    ap.add_argument("--verbose", action="store_true", help="one line per simulated hour")
    ap.add_argument("--bound", action="store_true",
                    help="only print what the demand allows at best (no bot, instant)")
    ap.add_argument("--policy", choices=POLICIES, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    cfg = Config(seed=args.seed, pool_idle=args.pool_idle, target_wait=args.target_wait,
                 cooldown=args.cooldown, pool_max=args.pool_max, admin_delay=args.admin_delay,
                 verbose=args.verbose, first_hour=args.from_hour, hours=args.hours,
                 port_base=args.port_base, max_generations=args.max_generations)
    # Quick: a shorter window, not a stronger compression: at 720× the bot's own time
    # (×720) swamps the 30-s jobs and the queue never drains.
    cfg.scale = args.scale or (240.0 if args.quick else 180.0)
    if args.quick:
        cfg.first_hour, cfg.hours = 9, 8
    return args, cfg


def main(argv: list[str] | None = None) -> None:
    args, cfg = parse(argv)
    logging.basicConfig(level=logging.ERROR)
    if args.policy:  # one policy, in this process (the parent runs three of these)
        with tempfile.TemporaryDirectory(prefix="costsim-") as tmp:
            result = asyncio.run(run_policy(args.policy, cfg, Path(tmp)))
        assert args.json is not None
        args.json.write_text(json.dumps(asdict(result)))
        return
    if args.bound:
        print(bounds(cfg))
        return
    start, span = cfg.first_hour * 3600, cfg.hours * 3600
    jobs = [j for j in demand(cfg) if start <= j.at < start + span]
    print(f"costsim: seed {cfg.seed}, {len(jobs)} jobs in {len({j.session for j in jobs})} "
          f"sessions, {cfg.hours} simulated hours from {cfg.first_hour:02d}:00 at "
          f"{cfg.scale:g}× ({span / cfg.scale / 60:.1f} min); three policies in parallel "
          "processes", flush=True)
    with tempfile.TemporaryDirectory(prefix="costsim-") as tmp:
        procs = []
        for policy in POLICIES:
            out = Path(tmp) / f"{policy}.json"
            # The parent's options first: the child's --json (the last one) wins.
            cmd = [sys.executable, "-m", "bench.costsim",
                   *(argv if argv is not None else sys.argv[1:]),
                   "--policy", policy, "--json", str(out)]
            procs.append((out, subprocess.Popen(cmd, env=os.environ.copy())))
        results = []
        for out, proc in procs:
            if proc.wait() != 0:
                raise SystemExit(f"a policy run failed ({proc.args})")
            results.append(Result(**json.loads(out.read_text())))
    print()
    print(table(results, cfg))
    print()
    auto = next(r for r in results if r.policy == "autoscaler")
    for line in verdict(auto):
        print(line)
    print("\nidle GPU spend by cause ($, share of the policy's total spend):")
    print(breakdown(results))
    print(f"\nautoscaler decisions ({len(auto.decisions)}):")
    for line in auto.decisions[-12:]:
        print("  " + line)
    print("\nreal time per policy: " + ", ".join(
        f"{r.policy} {r.real_seconds:.0f} s" for r in results))
    if args.json:
        args.json.write_text(json.dumps({"config": asdict(cfg), "results": [
            {**asdict(r), "wait_p50": pct(r.waits, .5), "wait_p95": pct(r.waits, .95)}
            for r in results]}, indent=2))


if __name__ == "__main__":
    main()
