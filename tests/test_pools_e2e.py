"""Pools and the autoscaler end to end: the real bot, the fake Discord, the fake Vast.ai.

The pool's scheduler (:meth:`Autoscaler.tick`, run by the server maintenance loop every
30 s) is called by the tests directly, so each decision round happens when the test says.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from core.db.models import AuditLog, ComfyGeneration
from core.pools.drain import DRAIN_MINUTES
from core.pools.models import PoolDecision, PoolMember
from tests.conftest import BotEnv, _answered, eventually
from tests.fakevast import FakeVast
from tests.fakevast.server import make_offer
from tests.test_servers_vast_e2e import channel_texts, press, rent, vast_env


def offers() -> list[dict[str, Any]]:
    # Loopback addresses only: nothing in the tests may reach beyond this machine.
    return [
        make_offer(101, "RTX 4090", dph_base=0.40, public_ipaddr="127.0.0.1"),
        make_offer(102, "RTX 4090", dph_base=0.50, public_ipaddr="127.0.0.1"),
        make_offer(103, "RTX 4090", dph_base=0.30, public_ipaddr="127.0.0.1"),
        make_offer(104, "RTX 4090", dph_base=0.70, public_ipaddr="127.0.0.1"),
        make_offer(105, "RTX 4090", dph_base=0.80, public_ipaddr="127.0.0.1"),
        make_offer(201, "RTX 3090", dph_base=0.20, public_ipaddr="127.0.0.1"),
    ]


@contextlib.asynccontextmanager
async def pool_vast() -> AsyncIterator[FakeVast]:
    """The fake Vast of the pool tests: loopback offers, instances up in a blink."""
    fake = FakeVast(offers=offers(), clock=time.time, provision_seconds=0.05,
                    boot_seconds=0.1, restart_seconds=0.1, timeout_hang=1.5)
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


@pytest.fixture
async def vast() -> AsyncIterator[FakeVast]:
    async with pool_vast() as fake:
        yield fake


async def status_of(env: BotEnv, name: str) -> str | None:
    for server in await env.services.servers.list(include_destroyed=True):
        if server.name == name:
            return server.status
    return None


async def running(env: BotEnv, name: str) -> bool:
    return await status_of(env, name) == "running"


async def rent_running(env: BotEnv, gpu: str, name: str) -> None:
    await rent(env, {"gpu": gpu, "name": name})
    await eventually(lambda: running(env, name), timeout=20)


async def admin(env: BotEnv, sub: str, options: dict[str, Any]) -> str:
    interaction = await env.slash("pool", options, user=env.fake.admin, subcommand=sub)
    message = await env.fake.wait_for(lambda: _answered(interaction))
    return (message.content or "") + " ".join(e.get("description", "") + " ".join(
        f["value"] for f in e.get("fields", [])) for e in message.embeds)


async def queue_jobs(env: BotEnv, server: str, count: int) -> None:
    """Jobs waiting in the server's queue (rows as the runner leaves them once queued)."""
    view = await env.services.servers.get(server)
    async with env.services.sessions.begin() as session:
        for i in range(count):
            session.add(ComfyGeneration(server_id=view.id, user_id=7, prompt=f"p{i}",
                                        status="queued", parameters={}))


async def decisions(env: BotEnv) -> list[tuple[str, str | None, str]]:
    async with env.services.sessions() as session:
        rows = (await session.scalars(select(PoolDecision).order_by(PoolDecision.id))).all()
        return [(r.action, r.server_name, r.state) for r in rows]


async def audit(env: BotEnv, prefix: str) -> list[tuple[str, str, dict[str, Any]]]:
    async with env.services.sessions() as session:
        rows = (await session.scalars(select(AuditLog).order_by(AuditLog.id))).all()
        return [(r.action, r.outcome, r.details) for r in rows if r.action.startswith(prefix)]


async def test_pool_commands(fake_discord: Any, tmp_path: Path, vast: FakeVast) -> None:
    env = await vast_env(fake_discord, tmp_path, vast)
    try:
        text = await admin(env, "create", {"name": "Render", "gpu": "RTX 4090",
                                           "max_price": 0.6, "max": 3, "target_wait": 90})
        assert "Pool created" in text and "**render**: RTX 4090 ≤ $0.60/h, 0–3 servers" in text
        # Bad input: a clear sentence, nothing changes.
        text = await admin(env, "create", {"name": "render", "gpu": "RTX 4090"})
        assert "exists already" in text
        text = await admin(env, "create", {"name": "x", "gpu": "RTX 4090",
                                           "models": "file:///etc/passwd"})
        assert "https://" in text
        text = await admin(env, "set", {"name": "render", "setting": "min", "value": 5})
        assert "min cannot be above its max" in text
        text = await admin(env, "set", {"name": "render", "setting": "idle_timeout",
                                        "value": 7})
        assert "idle stop 7 min" in text
        await rent_running(env, "RTX 3090", "old")
        text = await admin(env, "add-server", {"name": "render", "server": "old"})
        assert "**old** joined pool **render**" in text and "7 idle minutes" in text
        assert (await env.services.servers.get("old")).idle_timeout == 7
        text = await admin(env, "status", {"name": "render"})
        assert "old: running" in text and "0 jobs" in text
        # /budget groups the spend by pool (core.stats' pool hook, wired to the pools).
        asked = await env.slash("budget", {}, user=env.fake.admin)
        budget = await env.fake.wait_for(lambda: _answered(asked))
        fields = {f["name"]: f["value"] for f in budget.embeds[0].get("fields", [])}
        assert "**render**" in fields["Per pool (month, rate now)"]
        text = await admin(env, "list", {})
        assert "**render**" in text and "x" not in text.split("**render**")[0]
        # A member cannot run /pool.
        refused = await env.slash("pool", {}, user=env.fake.member, subcommand="list",
                                force=True)  # past the hidden command, as a raw client
        message = await env.fake.wait_for(lambda: _answered(refused))
        assert "admin" in (message.content or "").lower()
        # Remove asks first; Cancel keeps the pool.
        interaction = await env.slash("pool", {"name": "render"}, user=env.fake.admin,
                                      subcommand="remove")
        await press(env, interaction, "Cancel")
        await env.fake.wait_for(lambda: any(
            "Nothing was removed" in (m.content or "") for m in interaction.followups()))
        assert [p.name for p in await env.services.pools.store.pools()] == ["render"]
        interaction = await env.slash("pool", {"name": "render"}, user=env.fake.admin,
                                      subcommand="remove")
        await press(env, interaction, "Remove")
        await env.fake.wait_for(lambda: any(
            "removed" in (m.content or "") for m in interaction.followups()))
        assert await env.services.pools.store.pools() == []
        assert await running(env, "old")  # its servers stay
        actions = [(a, o) for a, o, _ in await audit(env, "pool")]
        # The refused ones are audited as refused or failed; the member's try too.
        assert ("pool list", "refused") in actions and ("pool create", "error") in actions
        assert ("pool remove", "ok") in actions and ("pool add-server", "ok") in actions
    finally:
        await env.stop()


async def warm_and_two_stopped(env: BotEnv, max_servers: int) -> None:
    """Pool "gpu" (RTX 4090, target wait 60 s) of three members: "warm" running, "cold"
    and "colder" stopped (offers 103, 101, 102: $0.30, $0.40, $0.50)."""
    await admin(env, "create", {"name": "gpu", "gpu": "RTX 4090", "max": max_servers,
                                "target_wait": 60})
    for name in ("warm", "cold", "colder"):
        await rent_running(env, "RTX 4090", name)
    for name in ("warm", "cold", "colder"):
        await admin(env, "add-server", {"name": "gpu", "server": name})
    for name in ("colder", "cold"):
        await env.slash("server", {"server": name}, user=env.fake.admin, subcommand="stop")
        await eventually(lambda n=name: _is(env, n, "stopped"), timeout=20)


async def test_burst_starts_stopped_then_rents_within_max_and_cooldown(
    fake_discord: Any, tmp_path: Path, vast: FakeVast
) -> None:
    env = await vast_env(fake_discord, tmp_path, vast)
    try:
        await warm_and_two_stopped(env, 4)
        autoscaler = env.services.autoscaler
        assert await autoscaler.tick() == []  # nothing queued: nothing to do

        # 20 jobs at the default 60 s each on one server: ~1200 s against a 60 s target;
        # the pool may grow to 4: the stopped members start (cheapest first), then one
        # is rented from the template (what is left when a rental would be up, taken as
        # RENT_SECONDS before one was measured, still needs it).
        await queue_jobs(env, "warm", 20)
        made = await autoscaler.tick()
        rented = f"gpu-{made[-1].id}"
        assert [(d.action, d.server_name) for d in made] == [
            ("start", "cold"), ("start", "colder"), ("rent", rented)]
        # Servers on their way count: without a cool-down, the next round adds nothing.
        await admin(env, "set", {"name": "gpu", "setting": "cooldown", "value": 0})
        assert await autoscaler.tick() == []
        await admin(env, "set", {"name": "gpu", "setting": "cooldown", "value": 300})
        for name in ("cold", "colder", rented):
            await eventually(lambda n=name: running(env, n), timeout=20)
        await eventually(lambda: _states(env, ["done", "done", "done"]), timeout=20)
        new = await env.services.servers.get(rented)
        assert new.gpu == "RTX 4090" and new.price_per_hour == pytest.approx(0.70, abs=0.1)
        assert new.idle_timeout == 15  # the pool's idle autostop
        async with env.services.sessions() as session:
            members = set((await session.scalars(select(PoolMember.server_id))).all())
        assert new.id in members
        labels = [i.label for i in vast.instances.values()]
        assert sum(1 for label in labels if label.startswith(f"comfyvast:{rented}:")) == 1

        # Audited with the reason, announced in the pool's channel in one line each.
        entries = await audit(env, "pool scale-up")
        assert [(a, o) for a, o, _ in entries] == [
            ("pool scale-up start", "ok"), ("pool scale-up start", "ok"),
            ("pool scale-up rent", "ok")]
        assert "20 jobs would wait ~1200 s (target 60 s)" in entries[0][2]["reason"]
        await env.fake.wait_for(lambda: any(
            f"**{rented}** is ready" in t for t in channel_texts(env)))
        texts = channel_texts(env)
        ups = [t for t in texts if t.startswith("Pool **gpu**: st") or "renting" in t]
        assert [t.split("**")[3] for t in ups] == ["cold", "colder", rented]
        assert all("20 jobs would wait ~1200 s (target 60 s)." in t for t in ups)
        assert any(f"Pool **gpu**: renting **{rented}**" in t for t in texts)

        # Still a long queue, but in the cool-down: nothing new.
        assert await autoscaler.tick() == []
        # Past the cool-down the pool is at its max (4 of 4): nothing new either.
        await admin(env, "set", {"name": "gpu", "setting": "cooldown", "value": 0})
        assert await autoscaler.tick() == []
        assert len(await decisions(env)) == 3
    finally:
        await env.stop()


async def test_budget_refuses_the_rent(fake_discord: Any, tmp_path: Path,
                                       vast: FakeVast) -> None:
    env = await vast_env(fake_discord, tmp_path, vast, costs={"monthly_budget": 0.8})
    try:
        await admin(env, "create", {"name": "gpu", "gpu": "RTX 4090", "max": 3})
        await rent_running(env, "RTX 4090", "warm")  # $0.30
        await rent_running(env, "RTX 4090", "cold")  # $0.40
        for name in ("warm", "cold"):
            await admin(env, "add-server", {"name": "gpu", "server": name})
        await env.slash("server", {"server": "cold"}, user=env.fake.admin, subcommand="stop")
        await eventually(lambda: _is(env, "cold", "stopped"), timeout=20)
        count = len(vast.instances)
        await queue_jobs(env, "warm", 10)
        # The start fits ($0.40 + the month so far); a rent on top ($0.50) passes $0.80.
        made = await env.services.autoscaler.tick()
        assert [(d.action, d.state) for d in made] == [("start", "planned"),
                                                        ("rent", "refused")]
        await eventually(lambda: running(env, "cold"), timeout=20)
        assert len(vast.instances) == count  # nothing rented
        entries = await audit(env, "pool scale-up rent")
        assert [o for _, o, _ in entries] == ["refused"]
        assert "monthly budget" in entries[0][2]["reason"]
        await env.fake.wait_for(lambda: any(
            "Pool **gpu**: not scaling up (rent): over the monthly budget" in t
            for t in channel_texts(env)))
    finally:
        await env.stop()


async def test_restart_mid_scale_up_rents_once(fake_discord: Any, tmp_path: Path,
                                               vast: FakeVast) -> None:
    env = await vast_env(fake_discord, tmp_path, vast)
    settings = env.services.settings
    try:
        await admin(env, "create", {"name": "gpu", "gpu": "RTX 4090", "max": 2})
        await rent_running(env, "RTX 4090", "warm")
        await admin(env, "add-server", {"name": "gpu", "server": "warm"})
        await queue_jobs(env, "warm", 10)
        hold = vast.hold_after("PUT /api/v0/asks/")
        [decision] = await env.services.autoscaler.tick()
        await __import__("asyncio").wait_for(hold.arrived.wait(), 30)
    finally:
        # The bot goes away the moment Vast.ai has rented, before it reads the answer.
        await env.stop()
        hold.release()
    rented = decision.server_name
    assert await decisions_in(settings, tmp_path) == [("rent", rented, "planned")]

    env = await vast_env(fake_discord, tmp_path, vast)
    try:
        # The rental path's recovery adopts the instance by its label...
        await eventually(lambda: running(env, rented), timeout=30)
        # ...and the autoscaler counts it: a long queue, no cool-down, no second rent.
        await admin(env, "set", {"name": "gpu", "setting": "cooldown", "value": 0})
        await queue_jobs(env, "warm", 10)
        assert await env.services.autoscaler.tick() == []
        assert await decisions(env) == [("rent", rented, "done")]
        every = [*vast.instances.values(), *vast.destroyed.values()]
        assert [i.label.split(":")[1] for i in every if i.label.startswith("comfyvast:gpu-")] \
            == [rented]
        status = await env.services.autoscaler.status("gpu")
        assert {s.name for s in status.servers} == {"warm", rented}
    finally:
        await env.stop()


async def decisions_in(settings: Any, tmp_path: Path) -> list[tuple[str, str | None, str]]:
    import sqlite3

    db = settings.database.url.split("///", 1)[1]
    with sqlite3.connect(db) as conn:
        return [tuple(r) for r in conn.execute(
            "SELECT action, server_name, state FROM pool_decisions ORDER BY id")]


async def _is(env: BotEnv, name: str, status: str) -> bool:
    return await status_of(env, name) == status


async def _states(env: BotEnv, wanted: list[str]) -> bool:
    return [s for _, _, s in await decisions(env)] == wanted


async def test_queued_jobs_move_to_a_server_that_comes_up(
    fake_discord: Any, tmp_path: Path, comfy: Any
) -> None:
    """Jobs waiting in one ComfyUI's queue share a new pool member; none runs twice."""
    from tests.conftest import MODELS, add_server, bot_settings, start_bot
    from tests.fakecomfy import FakeComfy
    from tests.test_generation_e2e import finished_row, generate, job_row

    env = await start_bot(fake_discord, bot_settings(
        tmp_path, fake_discord, limits={"user_concurrent_jobs": 10}))
    second = FakeComfy(models=MODELS, step_delay=0.01, output_size=(64, 64))
    await second.start()
    try:
        await add_server(env, "busy", comfy.url)
        comfy.pause_sampling()
        # Queued before the pool existed (a pool's jobs queue at most PACK_DEPTH deep in a
        # ComfyUI; the rest wait in the pool's queue, test_pools_wait_e2e).
        for i in range(5):
            await generate(env, {"prompt": f"job {i}", "steps": 3})
        await admin(env, "create", {"name": "p", "gpu": "RTX 4090"})
        await admin(env, "add-server", {"name": "p", "server": "busy"})
        first = await job_row(env, 1)
        await comfy.wait_running(first.comfy_prompt_id, timeout=10)
        await env.fake.wait_for(lambda: len(comfy.pending_prompt_ids) == 4)
        waiting = {(await job_row(env, i)).comfy_prompt_id: i for i in range(2, 6)}

        await add_server(env, "fresh", second.url)
        view = await env.services.servers.get("fresh")
        await admin(env, "add-server", {"name": "p", "server": "fresh"})
        pool = await env.services.pools.store.get("p")
        moved = await env.services.autoscaler.share_queue(pool, view)
        # Four waiting, two servers: the two queued last move; the running one stays.
        assert moved == [5, 4]
        for job_id in moved:
            row = await finished_row(env, job_id)
            assert row.status == "completed" and row.server_id == view.id
        assert sorted(waiting[p] for p in comfy.pending_prompt_ids) == [2, 3]
        assert len(second.history) == 2  # each moved job ran once, on the new server
        comfy.resume_sampling()
        for job_id in (1, 2, 3):
            row = await finished_row(env, job_id)
            assert row.status == "completed" and row.server_id != view.id
        assert len(comfy.history) == 3  # the moved ones never ran on the old server
    finally:
        comfy.resume_sampling()
        await second.stop()
        await env.stop()


async def finished_jobs(env: BotEnv, server: str, count: int, seconds: float) -> None:
    """Jobs the server finished lately, each ``seconds`` long (the measured job time)."""
    import datetime as dt

    view = await env.services.servers.get(server)
    now = dt.datetime.now(dt.UTC)
    async with env.services.sessions.begin() as session:
        for i in range(count):
            done = now - dt.timedelta(minutes=i + 1)
            session.add(ComfyGeneration(
                server_id=view.id, user_id=7, prompt=f"done {i}", status="completed",
                parameters={}, started_at=done - dt.timedelta(seconds=seconds),
                completed_at=done))


async def test_measured_job_time_decides_how_many(fake_discord: Any, tmp_path: Path,
                                                  vast: FakeVast) -> None:
    env = await vast_env(fake_discord, tmp_path, vast)
    try:
        await warm_and_two_stopped(env, 5)
        # Jobs take 10 s here: 10 queued wait ~100 s on one server, so two servers do
        # (at the 60 s default it would take ten: both stopped ones and two rentals).
        await finished_jobs(env, "warm", 5, 10.0)
        await queue_jobs(env, "warm", 10)
        text = await admin(env, "status", {"name": "gpu"})
        assert "10 jobs, ~10 s each, expected wait 100 s" in text
        made = await env.services.autoscaler.tick()
        assert [(d.action, d.server_name) for d in made] == [("start", "cold")]
        assert "10 jobs would wait ~100 s (target 60 s)" in made[0].reason
        await eventually(lambda: running(env, "cold"), timeout=20)
        assert await status_of(env, "colder") == "stopped"
    finally:
        await env.stop()


async def test_below_min_starts_one_without_jobs(fake_discord: Any, tmp_path: Path,
                                                 vast: FakeVast) -> None:
    env = await vast_env(fake_discord, tmp_path, vast)
    try:
        await admin(env, "create", {"name": "gpu", "gpu": "RTX 4090", "min": 1})
        await rent_running(env, "RTX 4090", "only")
        await admin(env, "add-server", {"name": "gpu", "server": "only"})
        await rent_running(env, "RTX 4090", "extra")
        await admin(env, "add-server", {"name": "gpu", "server": "extra"})
        assert await env.services.autoscaler.tick() == []  # running: at least the minimum
        # The minimum's cheapest member never idle-stops; the other one does, and with no
        # recent demand it is surplus: it drains (minutes idle, not the pool's 15).
        assert (await env.services.servers.get("only")).idle_timeout == 0
        assert (await env.services.servers.get("extra")).idle_timeout == DRAIN_MINUTES
        await env.slash("server", {"server": "extra"}, user=env.fake.admin, subcommand="stop")
        await eventually(lambda: _is(env, "extra", "stopped"), timeout=20)
        await env.slash("server", {"server": "only"}, user=env.fake.admin, subcommand="stop")
        await eventually(lambda: _is(env, "only", "stopped"), timeout=20)
        made = await env.services.autoscaler.tick()
        # Below the minimum: the cheapest stopped member starts ("only", $0.30 < $0.40).
        assert [(d.action, d.server_name, d.reason) for d in made] == [
            ("start", "only", "below the pool's minimum of 1")]
        await eventually(lambda: running(env, "only"), timeout=20)
        await env.services.autoscaler.tick()
        assert (await env.services.servers.get("only")).idle_timeout == 0
    finally:
        await env.stop()


async def test_a_job_waits_and_starts_a_pool_at_zero(fake_discord: Any, tmp_path: Path,
                                                     vast: FakeVast) -> None:
    """Nothing running: /generate is not refused, the job waits for the pool's server, and
    that demand starts it at once (a poke, not the next maintenance tick)."""
    env = await vast_env(fake_discord, tmp_path, vast)
    try:
        await admin(env, "create", {"name": "gpu", "gpu": "RTX 4090"})
        await rent_running(env, "RTX 4090", "cold")
        await admin(env, "add-server", {"name": "gpu", "server": "cold"})
        await env.slash("server", {"server": "cold"}, user=env.fake.admin, subcommand="stop")
        await eventually(lambda: _is(env, "cold", "stopped"), timeout=20)
        assert await env.services.autoscaler.tick() == []  # no demand, min 0: stays off
        interaction = await env.slash("generate", {"prompt": "a cat"})
        reply = await env.fake.wait_for(lambda: _answered(interaction))
        # Kept, not refused: the reply is job #1's public status message.
        assert not reply.ephemeral and reply.embeds[0]["title"].endswith("job #1"), reply
        await eventually(lambda: _states(env, ["done"]), timeout=20)
        assert await decisions(env) == [("start", "cold", "done")]
        (reason,) = [d.reason for d in await env.services.pools.store.decisions(1)]
        assert reason == "1 job would wait ~forever (no server is ready) (target 60 s)"
        await eventually(lambda: running(env, "cold"), timeout=20)
    finally:
        await env.stop()


async def test_a_job_sent_again_counts_once(fake_discord: Any, tmp_path: Path,
                                            vast: FakeVast) -> None:
    """A member who sends a refused job again is one job of demand, not one per try (a job
    for a checkpoint no pool is known to have is refused, not kept waiting)."""
    env = await vast_env(fake_discord, tmp_path, vast)
    try:
        await admin(env, "create", {"name": "gpu", "gpu": "RTX 4090", "max": 3})
        for name in ("cold", "colder"):
            await rent_running(env, "RTX 4090", name)
            await admin(env, "add-server", {"name": "gpu", "server": name})
            await env.slash("server", {"server": name}, user=env.fake.admin,
                            subcommand="stop")
            await eventually(lambda n=name: _is(env, n, "stopped"), timeout=20)
        for _ in range(3):  # refused each time: nothing runs
            interaction = await env.slash("generate", {"prompt": "a cat",
                                                       "model": "rare.safetensors"})
            reply = await env.fake.wait_for(lambda i=interaction: _answered(i))
            assert "No server is running" in (reply.content or "")
        # One job at the default 60 s against a 60 s target: one server, not three.
        made = await env.services.autoscaler.tick()
        assert [(d.action, d.server_name) for d in made] == [("start", "cold")]
        assert made[0].reason.startswith("1 job would wait")
        await eventually(lambda: running(env, "cold"), timeout=20)
    finally:
        await env.stop()


async def test_no_start_that_would_come_up_after_the_queue(
    fake_discord: Any, tmp_path: Path, vast: FakeVast
) -> None:
    """Cold starts count: a server that would be up only once the ready ones have worked
    off the queue is not started; a queue still long by then starts enough for the rest."""
    env = await vast_env(fake_discord, tmp_path, vast)
    try:
        await warm_and_two_stopped(env, 5)
        autoscaler = env.services.autoscaler
        autoscaler.ready_seconds["start"] = [120.0]  # this pool's starts took 2 minutes
        await finished_jobs(env, "warm", 5, 10.0)
        # 15 jobs of 10 s: ~150 s on one server, 30 s of it left when a start is up.
        await queue_jobs(env, "warm", 15)
        assert await autoscaler.tick() == []
        # 30 jobs: 180 s of work left after 2 minutes, three servers' worth at 60 s.
        await queue_jobs(env, "warm", 15)
        made = await autoscaler.tick()
        assert [(d.action, d.server_name) for d in made] == [("start", "cold"),
                                                             ("start", "colder")]
        for name in ("cold", "colder"):
            await eventually(lambda n=name: running(env, n), timeout=20)
        await eventually(lambda: _states(env, ["done", "done"]), timeout=20)
        # Each start's own time joins the estimate (the fake boots in a fraction of 1 s).
        seen = autoscaler.ready_seconds["start"]
        assert len(seen) == 3 and all(0 < s < 30 for s in seen[1:])
    finally:
        await env.stop()
